"""A local Qwen2.5 HF directory -> the initial UALM checkpoint (model only, training layout).

    <output>/config.yaml                                resolved UALMConfig (checkpoint.load set)
    <output>/audio_encoder/{config.json,model.safetensors}   the encoder alone (when there is one)
    <output>/checkpoints/latest                         "0"
    <output>/checkpoints/iter_0000000/                  torch_dist checkpoint + config.yaml +
                                                        train_state.json + COMPLETE

What is mapped (``layout`` has the names):
* decoder layers: QKV fused per query group, gate/up fused as [gate; up], norms and
  projections copied; every tensor keeps its dtype (``dtype`` casts everything).
* vocabulary: text row t -> unified row 256 + t, in the input table and the head; a tied
  HF model (no ``lm_head.weight``) gives the head a copy of ``embed_tokens`` (untied).
* new rows -- the 256 special slots, the K codebook blocks and the TP padding rows of both
  tables -- and the K-1 stream embeddings: i.i.d. normal(0, ``model.init_method_std``) drawn
  in float32 from ``torch.Generator().manual_seed(seed)`` in the order embedding (special,
  audio + padding), head (special, audio + padding), stream embeddings -- the same draws as
  ``hf_adapter.hf_to_ualm`` -- then cast; row 0 (``<|pad|>``) of the input table is zero.
* audio adapter: weight normal(0, std) from the same generator (after the stream
  embeddings), bias zero. Encoder: copied from ``encoder_path`` (or ``model.encoder.path``);
  the model's random tiny encoder only with ``model.encoder.random_init`` (tests, demos): a
  real encoder kind without a path is refused.

The vocabulary is padded to a multiple of 128 * ``tensor_parallel``; the checkpoint loads
at any TP/PP (megatron reshards on load; the tables allow a different padding).
Nothing is held beyond one decoder layer (plus the two vocabulary tables, one at a time).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional

import torch
from torch import Tensor

from megatron_ualm.config import ConfigError, UALMConfig, save_config, validate
from megatron_ualm.convert import ckpt_layout as L
from megatron_ualm.convert.dist_format import ObjectPiece, TensorPiece, write_dist_checkpoint
from megatron_ualm.convert.encoder_weights import EncoderWeights, open_encoder, write_encoder_dir
from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.convert.hf_io import HFCheckpoint, read_config
from megatron_ualm.convert.layout import (
    ADAPTER, EMBEDDING, ENCODER_PREFIX, FINAL_NORM, HEAD, STREAMS, extra_state_keys, hf_shapes,
    hf_to_ualm_layer, layer_suffixes, stacked_key, ualm_layer_shapes,
)
from megatron_ualm.convert.output import Report, atomic_output_dir, check_output_dir, progress
from megatron_ualm.formats.vocab import NUM_SPECIAL_SLOTS, PAD, UnifiedVocab
from megatron_ualm.model.hf_adapter import qwen2_shape
from megatron_ualm.model.ualm_model import TP_VOCAB_MULTIPLE, padded_vocab

ENCODER_DIR = "audio_encoder"


def check_qwen2(hf_config: Mapping, directory: str) -> None:
    """Refuse anything but a plain Qwen2 causal LM the UALM decoder reproduces."""
    where = os.path.join(directory, "config.json")
    archs = hf_config.get("architectures") or []
    if hf_config.get("model_type") != "qwen2" or (archs and "Qwen2ForCausalLM" not in archs):
        raise ConversionError(f"{where}: model_type {hf_config.get('model_type')!r}, architectures {archs}: "
                              "only Qwen2 / Qwen2.5 causal LMs (model_type 'qwen2', Qwen2ForCausalLM) "
                              "can be converted")
    if hf_config.get("use_sliding_window"):
        raise ConversionError(f"{where}: use_sliding_window=true is not implemented by the UALM decoder")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConversionError(f"{where}: RoPE scaling {rope} is not implemented by the UALM decoder "
                              "(only plain RoPE); remove rope_scaling or convert another model")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {hf_config.get('hidden_act')!r}; Qwen2 uses 'silu'")


def check_tensor_parallel(shape: Mapping, tp: int, where: str) -> None:
    for name, hf_name in (("num_attention_heads", "num_attention_heads"), ("num_query_groups", "num_key_value_heads")):
        n = shape[name]
        if tp < 1 or n % tp:
            allowed = [k for k in range(1, n + 1) if n % k == 0]
            raise ConversionError(f"tensor parallel size {tp} does not divide {hf_name}={n} of {where}; "
                                  f"allowed sizes: {allowed}")


def check_hf_tensors(ckpt: HFCheckpoint, expected: Mapping[str, tuple], tied: bool) -> list[str]:
    """Refuse missing, unexpected or mis-shaped tensors; returns the names dropped on purpose."""
    names = set(ckpt.names)
    dropped = ["lm_head.weight"] if tied and "lm_head.weight" in names else []
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected) - set(dropped))
    wrong = sorted(n for n in set(expected) & names if tuple(ckpt.shape(n)) != tuple(expected[n]))
    where = ckpt.directory
    if missing:
        raise ConversionError(f"{where}: {len(missing)} tensors the Qwen2 config requires are missing, e.g. "
                              f"{missing[:6]}; the checkpoint is incomplete or does not match config.json")
    if extra:
        raise ConversionError(f"{where}: {len(extra)} tensors are not part of a Qwen2ForCausalLM with this "
                              f"config, e.g. {extra[:6]}; convert a plain Qwen2 causal LM (or fix config.json)")
    if wrong:
        detail = ", ".join(f"{n}: {tuple(ckpt.shape(n))} (config says {tuple(expected[n])})" for n in wrong[:4])
        raise ConversionError(f"{where}: shape mismatch: {detail}; config.json does not describe these weights")
    return dropped


def resolve_model_config(cfg: UALMConfig, hf_config: Mapping, qkv_bias: bool) -> UALMConfig:
    """Fill ``cfg.model``'s shape from the HF config (it wins over YAML/overrides) and validate."""
    for key, value in qwen2_shape(hf_config).items():
        setattr(cfg.model, key, value)
    cfg.model.qkv_bias = qkv_bias
    if cfg.model.kv_channels == cfg.model.hidden_size // cfg.model.num_attention_heads:
        cfg.model.kv_channels = None  # the default rule gives the same width
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"the resolved config is invalid: {e}") from None
    return cfg


def _randn(n: int, hidden: int, std: float, gen: torch.Generator) -> Tensor:
    return torch.randn(n, hidden, generator=gen, dtype=torch.float32) * std


def new_weights(vocab: UnifiedVocab, hidden: int, std: float, seed: int, adapter_width: Optional[int]) -> dict:
    """Every newly initialised row/tensor, float32, in the documented draw order."""
    gen = torch.Generator().manual_seed(seed)
    tail = vocab.padded_size - vocab.audio_start
    out = {"embedding": (_randn(NUM_SPECIAL_SLOTS, hidden, std, gen), _randn(tail, hidden, std, gen)),
           "head": (_randn(NUM_SPECIAL_SLOTS, hidden, std, gen), _randn(tail, hidden, std, gen)),
           "streams": _randn(vocab.num_codebooks - 1, hidden, std, gen)}
    out["embedding"][0][PAD] = 0
    if adapter_width is not None:
        out["adapter"] = (_randn(hidden, adapter_width, std, gen), torch.zeros(hidden))
    return out


def _table(special: Tensor, text: Tensor, tail: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.cat([special.to(dtype), text.to(dtype), tail.to(dtype)])


def _encoder_source(enc_cfg, encoder_path: Optional[str]) -> Optional[str]:
    """The encoder directory to copy, or None for the random tiny encoder (asked for explicitly)."""
    if encoder_path is not None and enc_cfg.random_init:
        raise ConversionError(f"--encoder-path {encoder_path} given but model.encoder.random_init=true asks for a "
                              "random encoder; drop one of them (model.encoder.random_init=false)")
    source = encoder_path or enc_cfg.path
    if source is None and not enc_cfg.random_init:
        raise ConversionError(f"model.encoder.kind={enc_cfg.kind} but no encoder weights: set model.encoder.path "
                              "(or --encoder-path) to a local encoder directory (checkpoints_convert/"
                              "prepare_pretrained.py --encoder lays out pretrained/qwen2.5-omni-audio-encoder), or "
                              "model.encoder.random_init=true for a random tiny encoder, or --encoder none")
    return source


def _encoder_group(name: str) -> str:
    m = re.match(r"(.*?layers\.\d+)\.", name)
    return "encoder." + (m.group(1) if m else "rest")


def convert_hf_to_megatron(hf_dir: str, output: str, cfg: Optional[UALMConfig] = None, *,
                           encoder_path: Optional[str] = None, tensor_parallel: Optional[int] = None,
                           dtype: Optional[torch.dtype] = None, seed: int = 0, overwrite: bool = False,
                           show_progress: Optional[bool] = None) -> Report:
    """Convert ``hf_dir`` into a UALM checkpoint at ``output`` (see the module docstring).

    cfg: the run config whose non-shape fields (codebooks, encoder kind, init std, ...) to
    use; model shapes are taken from ``hf_dir/config.json``. encoder_path: local encoder
    directory (``encoder_weights``); None uses ``cfg.model.encoder.path``. tensor_parallel:
    the TP size the vocabulary is padded for (default ``cfg.parallel.tensor_parallel``).
    dtype: cast every tensor (default: keep the HF dtypes). Returns the report.
    """
    cfg = cfg or UALMConfig()
    output = check_output_dir(output, overwrite)
    hf_config = read_config(hf_dir)
    check_qwen2(hf_config, hf_dir)
    shape = qwen2_shape(hf_config)
    tp = tensor_parallel or cfg.parallel.tensor_parallel
    check_tensor_parallel(shape, tp, os.path.join(hf_dir, "config.json"))
    cfg.parallel.tensor_parallel = tp
    report = Report(f"HF -> Megatron: {hf_dir} -> {output}")
    ckpt = HFCheckpoint(hf_dir)
    encoder: Optional[EncoderWeights] = None
    try:
        qkv_bias = "model.layers.0.self_attn.q_proj.bias" in ckpt.names
        tied = bool(hf_config.get("tie_word_embeddings", False)) or "lm_head.weight" not in ckpt.names
        dropped = check_hf_tensors(ckpt, hf_shapes(shape, qkv_bias, tied), tied)
        cfg = resolve_model_config(cfg, hf_config, qkv_bias)
        m = cfg.model
        vocab = padded_vocab(m, tp)
        H, nl = m.hidden_size, m.num_layers
        enc_cfg = m.encoder
        if enc_cfg.kind != "none":
            source = _encoder_source(enc_cfg, encoder_path)
            encoder = open_encoder(enc_cfg.kind, source, enc_cfg.tiny, enc_cfg.window_seconds, seed)
            enc_cfg.path = os.path.join(output, ENCODER_DIR) if source else None
        new = new_weights(vocab, H, m.init_method_std, seed, encoder.width if encoder else None)
        text_dtype = dtype or ckpt.dtype("model.embed_tokens.weight")
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        head_src = "model.embed_tokens.weight" if tied else "lm_head.weight"

        pieces: list[TensorPiece] = []

        def whole(key, shp, dt, produce, group):
            pieces.append(TensorPiece(key, tuple(shp), (0,) * len(shp), tuple(shp), dt, produce, group))

        whole(EMBEDDING, (vocab.padded_size, H), text_dtype,
              lambda: _table(new["embedding"][0], ckpt.get("model.embed_tokens.weight"),
                             new["embedding"][1], text_dtype), "embedding")
        layer_shapes = ualm_layer_shapes(shape, qkv_bias)
        for i in range(nl):
            for suffix in layer_suffixes(qkv_bias):
                s = layer_shapes[suffix]
                dt = dtype or ckpt.dtype(f"model.layers.{i}.input_layernorm.weight" if "norm" in suffix else
                                         f"model.layers.{i}.self_attn.o_proj.weight")
                pieces.append(TensorPiece(
                    stacked_key(suffix), (nl, *s), (i,) + (0,) * len(s), (1, *s), dt,
                    lambda i=i, suffix=suffix: cast(hf_to_ualm_layer(ckpt.get, i, suffix, shape)).unsqueeze(0),
                    f"layer.{i}"))
        whole(FINAL_NORM, (H,), dtype or ckpt.dtype("model.norm.weight"),
              lambda: cast(ckpt.get("model.norm.weight")), "head")
        whole(STREAMS, (vocab.num_codebooks - 1, H), text_dtype, lambda: new["streams"].to(text_dtype), "head")
        whole(HEAD, (vocab.padded_size, H), text_dtype,
              lambda: _table(new["head"][0], ckpt.get(head_src), new["head"][1], text_dtype), "head")
        if encoder is not None:
            for name, s in encoder.shapes.items():
                dt = dtype or encoder.dtypes[name]
                whole(ENCODER_PREFIX + name, s, dt, lambda name=name: cast(encoder.get(name)), _encoder_group(name))
            adapter_dtype = dtype or text_dtype
            for key, value in zip(ADAPTER, new["adapter"]):
                whole(key, tuple(value.shape), adapter_dtype, lambda v=value: v.to(adapter_dtype), "encoder.adapter")
        objects = [ObjectPiece(k, None, "objects") for k in extra_state_keys(nl)]

        for p in pieces:
            n = 1
            for d in p.shape:
                n *= d
            cat = ("decoder layers" if p.key.startswith("decoder.layers.") else
                   "audio encoder" if p.key.startswith(ENCODER_PREFIX) else
                   "adapter" if p.key in ADAPTER else "embedding/head/norm")
            report.tensor(cat, n)

        iter_name = L.iter_dir_name(0)
        final_iter = os.path.join(output, L.CHECKPOINTS, iter_name)
        cfg.checkpoint.load = final_iter
        cfg.paths.backbone = os.path.abspath(hf_dir)
        with atomic_output_dir(output, overwrite) as tmp:
            if encoder is not None and enc_cfg.path is not None:
                write_encoder_dir(os.path.join(tmp, ENCODER_DIR), encoder, dtype)
            iter_dir = os.path.join(tmp, L.CHECKPOINTS, iter_name)
            bar = progress(len(pieces), "hf -> megatron", show_progress)
            write_dist_checkpoint(iter_dir, pieces, objects,
                                  common={},
                                  on_piece=lambda p: bar.update(1))
            bar.close()
            save_config(cfg, os.path.join(iter_dir, L.CONFIG))
            save_config(cfg, os.path.join(tmp, L.CONFIG))
            L.seal(tmp, 0, tp, extra={"converted_from": os.path.abspath(hf_dir), "seed": seed})
    finally:
        ckpt.close()
        if encoder is not None:
            encoder.close()

    std = m.init_method_std
    report.line("layers", f"{nl} x {len(layer_suffixes(qkv_bias))} tensors (QKV fused per query group, "
                          f"fc1 = [gate; up]), dtype {text_dtype}")
    report.line("text rows", f"{m.text_vocab_size} rows -> unified [{vocab.text_offset}, {vocab.audio_start}) "
                             f"of embedding and head" + (" (head copied from embed_tokens: tied model untied)"
                                                        if tied else ""))
    report.line("new rows", f"special [0, {NUM_SPECIAL_SLOTS}) + audio [{vocab.audio_start}, {vocab.size}) = "
                            f"{NUM_SPECIAL_SLOTS + vocab.size - vocab.audio_start} rows per table: normal(0, {std}), "
                            f"seed {seed}; <|pad|> row 0 of the input table = 0")
    report.line("padding", f"{vocab.padded_size - vocab.size} rows (vocab {vocab.size} -> {vocab.padded_size}, "
                           f"multiple of {TP_VOCAB_MULTIPLE} x TP {tp}), normal(0, {std})")
    report.line("streams", f"{vocab.num_codebooks - 1} x {H} stream embeddings normal(0, {std}) "
                           f"(K={vocab.num_codebooks}, C={vocab.codebook_size})")
    if encoder is not None:
        report.line("encoder", f"{enc_cfg.kind}, {len(encoder.shapes)} tensors from {encoder.source}; "
                               f"adapter {H} x {encoder.width} normal(0, {std}), bias 0")
    if dropped:
        report.note(f"dropped {dropped} (tie_word_embeddings=true: HF ignores it too)")
    report.line("output", os.path.join(output, L.CHECKPOINTS, iter_name) + "  (+ config.yaml)")
    return report
