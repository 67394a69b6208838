"""Audio-encoder weights for the converters: found in a local HF directory, checked against
the encoder class the model builds, read lazily.

Accepted directories (``kind`` from ``EncoderConfig``):
* ``qwen2_5_omni``: an encoder saved alone (``Qwen2_5OmniAudioEncoder.save_pretrained``,
  model_type ``qwen2_5_omni_audio_encoder``), or a whole Qwen2.5-Omni model (model_type
  ``qwen2_5_omni``: tensors ``thinker.audio_tower.*``, config ``thinker_config.audio_config``;
  or a thinker alone: ``audio_tower.*``, ``audio_config``).
* ``whisper``: a Whisper model (``model.encoder.*`` or ``encoder.*``) or a ``WhisperEncoder``
  saved alone; config is a ``WhisperConfig``. Or AF-Whisper: an Audio Flamingo 3 model
  (model_type ``audioflamingo3``: tensors ``audio_tower.*``, config ``audio_config``) or its
  encoder alone (``audioflamingo3_encoder``), its config mapped onto a ``WhisperConfig``.
Without a directory the model's own tiny random encoder is used (``random_init``: tests, demos).
``write_encoder_dir`` writes the encoder alone in HF layout, one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Callable, Optional

import torch
from torch import Tensor

from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.convert.hf_io import HFCheckpoint, TensorSpec, read_config, write_sharded


@dataclass
class EncoderWeights:
    """names/shapes/dtypes of the encoder tensors (HF names, no prefix) and a reader."""
    config: object                       # the transformers config of the encoder alone
    width: int                           # output width (the adapter's input)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    get: Callable[[str], Tensor]
    source: str                          # where the weights came from (for the report)
    close: Callable[[], None] = lambda: None


def _classes(kind: str):
    if kind == "qwen2_5_omni":
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder
        return Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniAudioEncoder
    if kind == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder
        return WhisperConfig, WhisperEncoder
    raise ConversionError(f"encoder kind {kind!r} not in ('qwen2_5_omni', 'whisper', 'none')")


def _width(kind: str, config) -> int:
    return config.output_dim if kind == "qwen2_5_omni" else config.d_model


def _locate(kind: str, directory: str) -> tuple[dict, str]:
    """(encoder config dict, tensor-name prefix) of an encoder directory."""
    cfg = read_config(directory)
    model_type = cfg.get("model_type")
    if kind == "qwen2_5_omni":
        if model_type == "qwen2_5_omni_audio_encoder":
            return cfg, ""
        if model_type == "qwen2_5_omni" and "audio_config" in cfg.get("thinker_config", {}):
            return cfg["thinker_config"]["audio_config"], "thinker.audio_tower."
        if model_type == "qwen2_5_omni_thinker" and "audio_config" in cfg:
            return cfg["audio_config"], "audio_tower."
    elif kind == "whisper" and model_type in ("audioflamingo3", "audioflamingo3_encoder"):
        audio = cfg.get("audio_config") if model_type == "audioflamingo3" else cfg
        if not isinstance(audio, dict):
            raise ConversionError(f"{directory}/config.json: model_type 'audioflamingo3' without audio_config; "
                                  "the config is incomplete: download or copy it again")
        return _af_whisper_config(audio), "audio_tower." if model_type == "audioflamingo3" else ""
    elif kind == "whisper" and model_type == "whisper":
        with HFCheckpoint(directory) as ckpt:
            names = ckpt.names
        for prefix in ("model.encoder.", "encoder."):
            if any(n.startswith(prefix) for n in names):
                return cfg, prefix
        return cfg, ""
    raise ConversionError(f"{directory}/config.json: model_type {model_type!r} is not a {kind} audio encoder "
                          "(expected a Qwen2.5-Omni model/thinker/audio encoder, or a Whisper / Audio Flamingo 3 model, as "
                          "--encoder says); pass the right --encoder or --encoder-path")


# AudioFlamingo3EncoderConfig field -> WhisperConfig field (the tensors already have Whisper's names)
_AF_WHISPER_FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "encoder_layers",
                      "num_attention_heads": "encoder_attention_heads", "intermediate_size": "encoder_ffn_dim",
                      "layerdrop": "encoder_layerdrop"}
_AF_WHISPER_KEPT = ("num_mel_bins", "max_source_positions", "activation_function", "scale_embedding", "dropout",
                    "attention_dropout", "activation_dropout", "initializer_range")


def _af_whisper_config(audio: dict) -> dict:
    """The WhisperConfig fields of an AF-Whisper (Audio Flamingo 3) encoder config: its
    weights are a Whisper encoder's (run here as ``WhisperEncoder``, without AF3's pooling)."""
    out = {new: audio[old] for old, new in _AF_WHISPER_FIELDS.items() if old in audio}
    out.update({k: audio[k] for k in (*_AF_WHISPER_FIELDS.values(), *_AF_WHISPER_KEPT) if k in audio})
    return {"model_type": "whisper", **out}


def open_encoder(kind: str, path: Optional[str], tiny: Optional[dict] = None,
                 window_seconds: float = 30.0, seed: int = 0) -> EncoderWeights:
    """The encoder weights to put into a UALM checkpoint. Refuses missing, extra or
    mis-shaped tensors (compared with the encoder class built from the config on the meta
    device, so nothing is allocated)."""
    config_cls, model_cls = _classes(kind)
    if path is None:
        from megatron_ualm.model.audio_encoder import build_hf_encoder
        torch.manual_seed(seed)
        model, width = build_hf_encoder(kind, None, tiny, window_seconds)
        state = model.state_dict()
        return EncoderWeights(model.config, width, {k: tuple(v.shape) for k, v in state.items()},
                              {k: v.dtype for k, v in state.items()}, state.__getitem__,
                              f"random tiny {kind} encoder (seed {seed})")
    cfg_dict, prefix = _locate(kind, path)
    cfg_dict = {k: v for k, v in cfg_dict.items() if k not in ("architectures", "transformers_version")}
    config = config_cls(**cfg_dict)
    with torch.device("meta"):
        reference = model_cls._from_config(config)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    buffers = {k for k, _ in reference.named_buffers()}
    ckpt = HFCheckpoint(path, prefix)
    found = {n: ckpt.shape(n) for n in ckpt.names}
    missing = sorted(set(expected) - set(found))
    extra = sorted(n for n in set(found) - set(expected) if n not in buffers)
    wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
    if missing or extra or wrong:
        ckpt.close()
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                 "shape mismatch " + ", ".join(f"{n}: {found[n]} vs {expected[n]}" for n in wrong[:5]) if wrong else ""]
        raise ConversionError(f"{path}: the {kind} encoder tensors (prefix {prefix!r}) do not match its config: "
                              + "; ".join(p for p in parts if p) + "; pass the directory of a matching encoder")
    names = [n for n in expected]
    return EncoderWeights(config, _width(kind, config), {n: expected[n] for n in names},
                          {n: ckpt.dtype(n) for n in names}, ckpt.get, f"{path} (tensors {prefix or ''}*)",
                          ckpt.close)


def write_encoder_dir(directory: str, encoder: EncoderWeights, dtype: Optional[torch.dtype] = None,
                      max_shard_bytes: int = 1 << 62, on_tensor: Optional[Callable[[str], None]] = None) -> list[str]:
    """The encoder alone in HF layout (config.json + safetensors, sharded above
    ``max_shard_bytes``), so ``from_pretrained(directory)`` builds it; one tensor is read and
    written at a time. Returns the weight files written."""
    os.makedirs(directory)
    encoder.config.save_pretrained(directory)
    specs = [TensorSpec(n, s, dtype or encoder.dtypes[n]) for n, s in encoder.shapes.items()]
    tensors = ((n, encoder.get(n).to(dtype) if dtype else encoder.get(n)) for n in encoder.shapes)
    return write_sharded(directory, specs, tensors, max_shard_bytes, on_tensor)
