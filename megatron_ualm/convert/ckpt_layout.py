"""The training checkpoint layout (``megatron_ualm.training.checkpoint_files``), as the converters
write and read it.

    <experiment>/config.yaml                    resolved run config (written by hf_to_megatron)
    <experiment>/checkpoints/latest             "iter_0000000"
    <experiment>/checkpoints/iter_0000000/      torch_dist files + config.yaml + train_state.json
                                                + COMPLETE (the trainer's manifest, written last)

The converter writes the same manifest the trainer's ``save_checkpoint`` writes (contents:
model only), so ``load_checkpoint(path, chunks, optimizer, load_optimizer=False)`` and the
trainer's ``checkpoint.load`` accept it, and uses the trainer's verification when reading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from megatron_ualm.convert.errors import ConversionError
from megatron_ualm.training import checkpoint_files as train_ckpt
from megatron_ualm.training.preflight import resolve_named_checkpoint

CHECKPOINTS = "checkpoints"
LATEST = train_ckpt.LATEST_FILE
COMPLETE = train_ckpt.COMPLETE_MARKER
TRAIN_STATE = train_ckpt.TRAIN_STATE_FILE
CONFIG = train_ckpt.CONFIG_FILE
iter_dir_name = train_ckpt.checkpoint_name


def seal(experiment_dir: str, iteration: int, tensor_parallel: int, extra: Optional[dict] = None) -> None:
    """Add train_state.json and the COMPLETE manifest (last) to a converted checkpoint and
    point ``checkpoints/latest`` at it. The dist checkpoint and config.yaml must be there."""
    root = Path(experiment_dir) / CHECKPOINTS
    path = root / iter_dir_name(iteration)
    state = train_ckpt.TrainState(iteration=iteration, extra=dict(extra or {}))
    (path / TRAIN_STATE).write_text(state.to_json() + "\n")
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    layout = {"world_size": 1, "tp": tensor_parallel, "pp": 1, "cp": 1, "dp": 1, "vpp": None}
    contents = {"model": True, "optimizer": False, "scheduler": False, "rng": False}
    manifest = train_ckpt.build_manifest(path, iteration, layout, contents, None)
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path / COMPLETE)
    (root / LATEST).write_text(path.name + "\n")


def resolve_complete(path: str) -> str:
    """A complete, verified checkpoint directory from an iter_XXXXXXX, checkpoints or
    experiment directory; a partial or damaged one is refused with its problems."""
    return str(resolve_named_checkpoint(os.path.abspath(path), "--checkpoint", ConversionError))


def iteration_of(iter_dir: str) -> Optional[int]:
    base = os.path.basename(os.path.normpath(iter_dir))
    return int(base[5:]) if base.startswith("iter_") and base[5:].isdigit() else None
