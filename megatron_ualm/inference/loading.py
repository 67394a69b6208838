"""Load what generation needs from a checkpoint: the model, its tokenizer and its codec.

``--checkpoint`` may be
* a Megatron checkpoint directory (``iter_NNNNNNN``), a checkpoints directory or an
  experiment directory (the newest valid checkpoint is taken, ``training.checkpoint.
  resolve_checkpoint``), with the ``config.yaml`` saved in it;
* an exported HF directory (``ualm_config.json`` beside the HF ``config.json`` and
  safetensors): read through ``convert.load_ualm_from_hf``.

Tokenizer and codec: an explicit path wins; then the run config's ``paths.tokenizer`` /
``paths.codec``; then the checkpoint directory itself when it holds a ``tokenizer.json``.
A config without a codec path means the demo's tiny random codec (shape from the model).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def _find_config(path: str) -> Optional[str]:
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        cfg = os.path.join(candidate, "config.yaml")
        if os.path.isfile(cfg):
            return cfg
    return None


def load_model(checkpoint: str, device: torch.device, precision: str):
    """-> (UALMModel in eval mode on ``device``, UALMConfig or None).

    Megatron checkpoints need ``megatron_ualm.training.checkpoint`` and exported HF
    directories ``megatron_ualm.convert.load_ualm_from_hf``."""
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
    if os.path.isfile(os.path.join(checkpoint, "ualm_config.json")):  # an exported HF directory
        from megatron_ualm.convert import load_ualm_from_hf
        model, cfg = load_ualm_from_hf(checkpoint, precision=precision)
        return model.to(device).eval(), cfg

    from megatron_ualm.config import load_config
    from megatron_ualm.training.checkpoint import load_checkpoint, resolve_checkpoint
    path = resolve_checkpoint(checkpoint)
    cfg_path = _find_config(str(path))
    if cfg_path is None:
        raise FileNotFoundError(f"no config.yaml in or above {path}")
    cfg = load_config(cfg_path)
    cfg.model.recompute = "none"
    model = UALMModel(cfg.model, transformer_config_from(cfg.model, None, precision,
                                                         use_cpu_initialization=device.type == "cpu"))
    load_checkpoint(path, [model], load_optimizer=False, load_rng=False)
    return model.to(device).eval(), cfg


def load_tokenizer_for(checkpoint: str, cfg, explicit: Optional[str] = None):
    from megatron_ualm.data.tokenizer import load_tokenizer
    path = explicit or getattr(getattr(cfg, "paths", None), "tokenizer", None)
    if path is None and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        path = checkpoint
    if path is None:
        raise ValueError("no tokenizer: pass tokenizer=<local HF tokenizer dir> (the run config has none)")
    return load_tokenizer(path)


def load_codec_for(cfg, model_cfg, device: torch.device, explicit: Optional[str] = None):
    """The codec named explicitly or by the config; the demo's tiny codec otherwise."""
    from megatron_ualm.audio.codec import Codec, save_tiny_codec
    path = explicit or getattr(getattr(cfg, "paths", None), "codec", None)
    if path is None or path == "tiny":
        logger.warning("no codec path: decoding with the tiny random demo codec")
        tmp = tempfile.mkdtemp(prefix="ualm_tiny_codec_")
        path = save_tiny_codec(tmp, model_cfg.num_codebooks, model_cfg.codebook_size)
    codec = Codec(path, device=str(device))
    if (codec.num_codebooks, codec.codebook_size) != (model_cfg.num_codebooks, model_cfg.codebook_size):
        raise ValueError(f"codec {path} has {codec.num_codebooks} x {codec.codebook_size} codes; the model "
                         f"{model_cfg.num_codebooks} x {model_cfg.codebook_size}")
    return codec
