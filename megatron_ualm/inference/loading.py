"""Load what generation needs from a checkpoint: the model, its tokenizer and its codec.

``--checkpoint`` may be
* a Megatron checkpoint directory (``iter_NNNNNNN``), a checkpoints directory or an
  experiment directory (the newest valid checkpoint is taken, ``training.checkpoint.
  resolve_checkpoint``), with the ``config.yaml`` saved in it;
* an exported HF directory (``ualm_config.json`` beside the HF ``config.json`` and
  safetensors): read through ``convert.load_ualm_from_hf``.

:func:`open_checkpoint` finds the checkpoint and reads its config without touching a
weight, so a wrong checkpoint, tokenizer or codec path is reported before the model is
built (:func:`load_model`). Every such mistake raises a ``UserError`` naming the path.

Tokenizer and codec: an explicit path wins; then, for an export, its ``text_tokenizer/``
copy; then the run config's ``paths.tokenizer`` / ``paths.codec``; then a Megatron checkpoint
directory itself when it holds a ``tokenizer.json``.
A config without a codec path means the demo's tiny random codec (shape from the model).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from megatron_ualm.errors import UserError

if TYPE_CHECKING:
    from megatron_ualm.config import UALMConfig

logger = logging.getLogger(__name__)


@dataclass
class CheckpointSource:
    """A checkpoint found and its run config read; no weight loaded yet."""
    given: str          # what the user passed as --checkpoint
    path: str           # the directory the weights load from
    cfg: UALMConfig
    hf_export: bool     # an exported HF directory (else a Megatron checkpoint)


def _find_config(path: str) -> Optional[str]:
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        cfg = os.path.join(candidate, "config.yaml")
        if os.path.isfile(cfg):
            return cfg
    return None


def open_checkpoint(checkpoint: str) -> CheckpointSource:
    """Resolve ``checkpoint`` (see the module docstring) and read its run config."""
    from megatron_ualm.config import load_config
    from megatron_ualm.training.preflight import resolve_named_checkpoint

    if not os.path.isdir(checkpoint):
        raise UserError(f"--checkpoint: {checkpoint} is not a directory; pass a Megatron checkpoint, checkpoints "
                        "or experiment directory, or a directory exported by checkpoints_convert/megatron_to_hf.py")
    if os.path.isfile(os.path.join(checkpoint, "ualm_config.json")):  # an exported HF directory
        from megatron_ualm.convert.hf_io import HFCheckpoint
        from megatron_ualm.convert.megatron_to_hf import read_export_config
        doc, cfg = read_export_config(checkpoint)
        with HFCheckpoint(checkpoint), HFCheckpoint(checkpoint, files=[doc["extras_file"]]):
            pass  # every safetensors header reads
        return CheckpointSource(checkpoint, checkpoint, cfg, hf_export=True)
    path = str(resolve_named_checkpoint(checkpoint, "--checkpoint"))
    cfg_path = _find_config(path)
    if cfg_path is None:
        raise UserError(f"--checkpoint: no config.yaml in or above {path}; copy the run's config.yaml there")
    return CheckpointSource(checkpoint, path, load_config(cfg_path), hf_export=False)


def load_model(source: CheckpointSource, device: torch.device, precision: str):
    """The UALMModel of ``source`` in eval mode on ``device``.

    Megatron checkpoints need ``megatron_ualm.training.checkpoint`` and exported HF
    directories ``megatron_ualm.convert.load_ualm_from_hf``."""
    from megatron_ualm.model.transformer_config import transformer_config_from
    from megatron_ualm.model.ualm_model import UALMModel

    if source.hf_export:
        from megatron_ualm.convert import load_ualm_from_hf
        model, _ = load_ualm_from_hf(source.path, precision=precision)
        return model.to(device).eval()

    from megatron_ualm.training.checkpoint import load_checkpoint
    source.cfg.model.recompute = "none"
    model = UALMModel(source.cfg.model, transformer_config_from(source.cfg.model, None, precision,
                                                                use_cpu_initialization=device.type == "cpu"))
    load_checkpoint(source.path, [model], load_optimizer=False, load_rng=False)
    return model.to(device).eval()


def _local_dir(path: str, key: str, what: str) -> str:
    if not os.path.isdir(path):
        arg = key.split(".")[-1]
        raise UserError(f"{key}: {path} is not a directory; pass {arg}=DIR, a local {what} directory "
                        "(nothing is downloaded)")
    return path


def load_tokenizer_for(source: CheckpointSource, explicit: Optional[str] = None):
    from megatron_ualm.data.tokenizer import load_tokenizer
    key = "tokenizer" if explicit else "paths.tokenizer"
    path = explicit or source.cfg.paths.tokenizer
    if source.hf_export:  # its tokenizer.json holds unified ids; text_tokenizer/ the text ids
        from megatron_ualm.convert.hf_chat import TEXT_TOKENIZER_DIR
        bundled = os.path.join(source.given, TEXT_TOKENIZER_DIR)
        if not explicit and os.path.isfile(os.path.join(bundled, "tokenizer.json")):
            path = bundled
    elif path is None and os.path.isfile(os.path.join(source.given, "tokenizer.json")):
        path = source.given
    if path is None:
        raise UserError("tokenizer: the run config names none; pass tokenizer=<local HF tokenizer dir>")
    return load_tokenizer(_local_dir(path, key, "HF tokenizer"))


def load_codec_for(source: CheckpointSource, device: torch.device, explicit: Optional[str] = None):
    """The codec named explicitly or by the config; the demo's tiny codec otherwise."""
    from megatron_ualm.audio.codec import Codec, save_tiny_codec
    model_cfg = source.cfg.model
    key = "codec" if explicit else "paths.codec"
    path = explicit or source.cfg.paths.codec
    if path is None or path == "tiny":
        logger.warning("no codec path: decoding with the tiny random demo codec")
        tmp = tempfile.mkdtemp(prefix="ualm_tiny_codec_")
        path = save_tiny_codec(tmp, model_cfg.num_codebooks, model_cfg.codebook_size)
    codec = Codec(_local_dir(path, key, "HF XcodecModel"), device=str(device))
    if (codec.num_codebooks, codec.codebook_size) != (model_cfg.num_codebooks, model_cfg.codebook_size):
        raise UserError(f"{key}: {path} has {codec.num_codebooks} x {codec.codebook_size} codes, the model "
                        f"{model_cfg.num_codebooks} x {model_cfg.codebook_size}; pass the model's codec")
    return codec
