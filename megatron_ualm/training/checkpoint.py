"""Training checkpoints: atomic, self-verifying, and loadable at another TP/PP/DP layout.

A week-long run on many nodes is killed, preempted and requeued many times; a checkpoint
must never be lost and never be half-loaded. On disk::

    <experiment_dir>/checkpoints/
        latest                      "iter_0000200\\n" (advisory; written tmp+fsync+rename)
        iter_0000100/               one complete checkpoint
            __0_0.distcp ...        megatron dist checkpoint (torch_dist): model, optimizer,
            .metadata  common.pt    scheduler, per-rank RNG states
            metadata.json
            train_state.json        TrainState (iteration, consumed_rows, trainer extras)
            config.yaml             the resolved run config (megatron_ualm.config.save_config)
            COMPLETE                written last: manifest of every file (size; sha256 of the
                                    small ones), layout, contents
        iter_0000200/
        iter_0000300.tmp-<nonce>/   a save in progress, or one killed mid-way: never loaded,
                                    removed by the next save

Why it is safe:
* A save writes into ``iter_N.tmp-<nonce>/``; only after every rank finished (barrier) does
  rank 0 fsync the files, write ``COMPLETE`` and rename the directory into place (a single
  atomic rename on POSIX file systems). A kill at any earlier moment leaves a ``.tmp-`` dir
  that nothing reads.
* A checkpoint is *valid* only if ``COMPLETE`` parses and every file it lists exists with the
  listed size (and checksum for small files). ``find_latest_checkpoint`` takes the newest
  valid one and names every invalid one it skips; a checkpoint the user names explicitly is
  refused with the list of problems instead of being loaded.
* Older checkpoints are deleted only after the new one is complete, never the one ``latest``
  names, and by renaming to ``*.trash-*`` first so a kill during deletion cannot leave a
  half-deleted directory that still looks like a checkpoint.
* ``latest`` is a convenience for humans and tools; discovery scans the directories, so a
  kill between the rename and the ``latest`` update loses nothing.

Resharding: model and optimizer go through megatron-core ``dist_checkpointing`` (torch_dist
format). Sharded tensors are stored by global key and offset, so a checkpoint written at one
TP/PP/DP layout loads at another. The distributed optimizer is saved as
``fully_reshardable`` by default (see ``save_checkpoint``). RNG states are per rank
(``ShardedObject`` keyed by the (pp, tp, cp, dp) grid); they are restored only at the same
layout, otherwise the fresh seeding is kept and a warning says resume is not bit-exact.

Safety of loading: ``common.pt`` and sharded objects are read by megatron with
``torch.load(weights_only=True)`` (torch >= 2.6 default; we check them with
``torch.serialization.get_unsafe_globals_in_checkpoint`` before megatron does), and
torch-DCP's ``.metadata`` pickle is first replayed through an unpickler that only admits
torch.distributed.checkpoint metadata classes. Our own metadata is JSON/YAML.

Megatron quirks (megatron-core 0.16):
* the torch_dist writer needs ``psutil``; without it the writer subprocess dies and the save
  *hangs* — ``save_checkpoint`` checks for it first;
* the writer starts a ``multiprocessing`` Manager with the *spawn* method on the first save,
  which re-imports ``__main__``: scripts that save need an ``if __name__ == "__main__":`` guard;
* ``DistributedDataParallel.sharded_state_dict`` prefixes every key with ``module.``; model
  chunks are unwrapped (DDP, Float16Module) before their state is taken;
* the distributed optimizer cannot produce a state dict before its first step (saving
  refuses with a message; loading gives a fresh one megatron's own zero-gradient dummy step);
* without apex/TE, loading the distributed optimizer (fully_reshardable / model-space)
  fails with ``KeyError: 'step'``, and once that is avoided all parameters share one Adam
  ``step`` tensor that torch increments once per parameter — both are worked around in
  ``_load_optimizer_state`` (instance-level, no global patching), and the exact-resume test
  catches either.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint",
    "find_latest_checkpoint", "resolve_checkpoint", "verify_checkpoint", "read_manifest",
    "apply_retention", "checkpoints_dir", "checkpoint_name", "COMPLETE_MARKER", "LATEST_FILE",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FORMAT = "megatron_ualm.checkpoint"
MANIFEST_VERSION = 1
# Files up to this size get a sha256 in the manifest (metadata, common state, json, yaml).
# Bulk tensor files are checked by size only: hashing tens of GB on every resume is too slow.
HASH_LIMIT_BYTES = 16 * 2**20
DEFAULT_OPTIMIZER_SHARDING = "fully_reshardable"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_RE = re.compile(r"^iter_\d{7,}\.(tmp|trash)-[0-9a-f]+$")
_RNG_KEY = "rng_state"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the fix."""


@dataclass
class TrainState:
    """The trainer's small JSON state, saved as ``train_state.json``.

    iteration: optimizer steps done. consumed_rows: training sequences (packed rows) consumed,
    all data-parallel ranks together. skipped_iterations: steps skipped by the NaN policy.
    extra: anything else JSON-able the trainer needs to resume (e.g. data-loader position);
    it must be the same on every rank (rank 0's is kept).
    """
    iteration: int = 0
    consumed_rows: int = 0
    skipped_iterations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        try:
            return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"TrainState is not JSON-serialisable ({exc}); keep only "
                                  "str/int/float/bool/None/lists/dicts in TrainState.extra") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "train_state.json") -> "TrainState":
        try:
            data = json.loads(text)
            return cls(iteration=int(data["iteration"]), consumed_rows=int(data["consumed_rows"]),
                       skipped_iterations=int(data.get("skipped_iterations", 0)),
                       extra=dict(data.get("extra", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{source}: not a valid TrainState ({exc})") from exc


# --- paths ----------------------------------------------------------------------------------

def checkpoints_dir(experiment_dir: str | os.PathLike) -> Path:
    """Where an experiment keeps its checkpoints: ``<experiment_dir>/checkpoints``."""
    return Path(experiment_dir) / "checkpoints"


def checkpoint_name(iteration: int) -> str:
    """``iter_0000100`` for iteration 100 (zero-padded so names sort by iteration)."""
    return f"iter_{int(iteration):07d}"


def _iteration_of(path: Path) -> Optional[int]:
    m = _ITER_RE.match(path.name)
    return int(m.group(1)) if m else None


def _iter_dirs(root: Path) -> list[Path]:
    """Checkpoint-named directories under root, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _iteration_of(p) is not None]
    return sorted(found, key=lambda p: _iteration_of(p), reverse=True)


# --- small-file durability ------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling + fsync + rename, so readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- manifest and verification --------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``COMPLETE`` marker of a checkpoint directory (raises CheckpointError)."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        manifest = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {COMPLETE_MARKER} marker (the save did not finish)") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{marker}: unreadable marker ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{marker}: not a {MANIFEST_FORMAT} marker")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{marker}: manifest version {manifest.get('version')} is not "
                              f"supported (this code reads version {MANIFEST_VERSION})")
    return manifest


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems that make ``path`` unloadable; an empty list means it is complete and intact."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    for rel, info in sorted(manifest.get("files", {}).items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = f.stat().st_size
        if size != info.get("size"):
            problems.append(f"{rel}: {size} bytes on disk, {info.get('size')} in the manifest "
                            "(truncated or overwritten)")
        elif info.get("sha256") and _sha256(f) != info["sha256"]:
            problems.append(f"{rel}: checksum differs from the manifest (corrupted)")
    if not manifest.get("files"):
        problems.append("manifest lists no files")
    return problems


def _build_manifest(path: Path, iteration: int, layout: dict, contents: dict,
                    optimizer_metadata: Optional[dict]) -> dict:
    files = {}
    for f in _list_files(path):
        rel = f.relative_to(path).as_posix()
        if rel == COMPLETE_MARKER:
            continue
        size = f.stat().st_size
        files[rel] = {"size": size, "sha256": _sha256(f) if size <= HASH_LIMIT_BYTES else None}
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "iteration": iteration,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layout": layout, "contents": contents, "optimizer_metadata": optimizer_metadata,
        "files": files,
    }


# --- discovery ------------------------------------------------------------------------------

def find_latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest valid checkpoint directory under ``root`` (a checkpoints dir), or None.

    Every newer directory that is skipped (no marker, truncated file, bad checksum) is named
    in a warning with its problems. ``.tmp-`` directories of unfinished saves are ignored.
    """
    for path in _iter_dirs(Path(root)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Turn what a user passed (``checkpoint.load``) into one valid checkpoint directory.

    Accepts a checkpoint directory (``.../iter_0000100``), a checkpoints directory (newest
    valid one is taken) or an experiment directory (its ``checkpoints/``). An explicitly named
    checkpoint that is incomplete or corrupt is refused, never silently replaced.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / COMPLETE_MARKER).exists() or _iteration_of(path) is not None:
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(
                f"refusing to load {path}: " + "; ".join(problems) + ". Load an older checkpoint "
                f"(e.g. the parent directory {path.parent} picks the newest valid one) or delete it.")
        return path
    root = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
    found = find_latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{root}: no complete checkpoint (iter_NNNNNNN/ with a valid "
                              f"{COMPLETE_MARKER} marker) found")
    return found


# --- parallel layout and collectives --------------------------------------------------------

def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _broadcast(obj: Any) -> Any:
    """Rank 0's value on every rank (so all ranks act on one decision)."""
    if not _dist_on() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _dist_on():
        dist.barrier()


def _layout() -> dict:
    from megatron.core import parallel_state as ps
    return {
        "world_size": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
    }


def _require_runtime() -> None:
    from megatron.core import parallel_state as ps
    if not _dist_on() or not ps.model_parallel_is_initialized():
        raise CheckpointError("torch.distributed / megatron parallel state is not initialised; "
                              "call megatron_ualm.runtime.init_runtime() first")


# --- model chunks and state dicts -----------------------------------------------------------

def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The megatron module inside DDP / Float16Module wrappers (their sharded keys get a
    ``module.`` prefix otherwise, which would tie checkpoints to the wrapping)."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel
    from megatron.core.transformer.module import Float16Module
    wrappers = (_BaseDataParallel, Float16Module, torch.nn.parallel.DistributedDataParallel)
    while isinstance(chunk, wrappers):
        chunk = chunk.module
    return chunk


def _model_keys(n_chunks: int) -> list[str]:
    # Megatron-LM's naming, so its tools read our checkpoints; tensors are matched by their
    # global sharded keys, so a different number of chunks (VPP) still loads.
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _rng_sharded_object(layout: dict, data: Any):
    """Per-rank RNG state as one shard of a (pp, tp, cp, dp) grid of objects."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    shape = (layout["pp"], layout["tp"], layout["cp"], layout["dp"])
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_context_parallel_rank(), ps.get_data_parallel_rank())
    return ShardedObject(_RNG_KEY, data, shape, offset, replica_id=0)


def _capture_rng() -> dict:
    """Every RNG a training step may draw from, in weights_only-loadable types."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "tracker": {k: v.detach().cpu().clone() for k, v in get_cuda_rng_tracker().get_states().items()},
    }
    return state


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _optimizer_metadata(sharding: str) -> dict:
    # Megatron-LM's choices: "fully_reshardable" lets the distributed optimizer state load at
    # any TP/PP/DP (it gathers over DP on save); "dp_reshardable" is faster but DP-only.
    return {"distrib_optim_sharding_type": sharding, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def _inner_distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if isinstance(o, DistributedOptimizer)]


def _prepare_optimizer_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer the state entries loading needs.

    megatron-core 0.16 quirk: without apex/TE, ``DistributedOptimizer.sharded_state_dict``
    reads the Adam ``step`` from the inner torch optimizer's state, which exists only after a
    first step. Megatron's own remedy (used for its FSDP format) is a zero-gradient dummy step;
    every value it creates is then overwritten by the loaded state.
    """
    for opt in _inner_distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` with work-arounds for two megatron-core 0.16 bugs.

    Without apex/TE, ``DistributedOptimizer.load_state_dict`` first puts the Adam ``step`` into
    every inner state, then the fully-reshardable / model-space loaders copy the saved tensors
    over *every* key of that state, including ``step``, which they never provide -> KeyError.
    For the duration of the load each distributed optimizer gets (as an instance attribute, not
    a global patch) a setter that keeps the already-restored ``step``.
    """
    patched = []
    for opt in _inner_distributed_optimizers(optimizer):
        original = opt._set_main_param_and_optimizer_states

        def keep_step(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            current = _opt.optimizer.state.get(main_param, {})
            if "step" in current and "step" not in tensors:
                tensors = {**tensors, "step": current["step"]}
            _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = keep_step
        patched.append(opt)
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method
    # Second 0.16 bug on the same path: one `step` tensor is shared by every parameter's
    # state, and torch Adam increments it in place once per parameter, so the bias correction
    # after resume would be wrong. Give each parameter its own copy.
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        for param_state in getattr(inner, "state", {}).values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()


def _build_sharded_state_dict(chunks: Sequence[torch.nn.Module], optimizer, scheduler,
                              rng: Optional[Any], layout: dict, is_loading: bool,
                              optimizer_metadata: Optional[dict]) -> dict:
    state = {key: _unwrap(c).sharded_state_dict() for key, c in zip(_model_keys(len(chunks)), chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=dict(optimizer_metadata or {}))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        state[_RNG_KEY] = _rng_sharded_object(layout, rng)
    return state


def _save_strategy(fully_parallel: bool):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel and ps.get_data_parallel_world_size(with_context_parallel=True) > 1:
        # Spread the writing of replicated shards over the data-parallel ranks instead of
        # letting DP rank 0 write them all.
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper)
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, ps.get_data_parallel_group(with_context_parallel=True))
    return strategy


# --- save -----------------------------------------------------------------------------------

def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    train_state: Optional[TrainState] = None,
    config=None,
    *,
    keep_last: Optional[int] = None,
    save_rng: bool = True,
    optimizer_sharding: str = DEFAULT_OPTIMIZER_SHARDING,
    fully_parallel: bool = True,
) -> Path:
    """Write ``<root>/iter_<iteration>/`` atomically; call on every rank together.

    Args:
        root: the checkpoints directory (``checkpoints_dir(cfg.checkpoint.experiment_dir)``).
        iteration: optimizer steps done; names the directory (``iter_0000100``).
        model_chunks: this rank's model chunks (one per virtual pipeline stage), megatron
            modules possibly wrapped in mcore DDP / Float16Module.
        optimizer: megatron optimizer (incl. distributed/chained), after >= 1 step; None for a
            model-only checkpoint (e.g. written by the HF -> Megatron converter).
        scheduler: ``OptimizerParamScheduler`` or None.
        train_state: rank 0's copy is written as ``train_state.json``; None:
            ``TrainState(iteration)``. Its iteration must equal ``iteration``.
        config: the resolved ``UALMConfig``, written as ``config.yaml``; None: not written.
        keep_last: after the save, keep only this many newest valid checkpoints (None: all).
        save_rng: also save every rank's RNG states (python, numpy, torch, CUDA, TP tracker).
        optimizer_sharding: distributed-optimizer format ("fully_reshardable" loads at any
            layout; "dp_reshardable" is faster to write but loads only at the same TP/PP).
        fully_parallel: spread the writes of replicated shards over data-parallel ranks.

    Returns the final directory. If a valid checkpoint of that iteration already exists it is
    kept and nothing is written (e.g. a preemption save right after a periodic one).
    Raises CheckpointError on every rank if the save could not be completed; the previous
    checkpoints are untouched in that case.
    """
    from megatron.core import dist_checkpointing
    _require_runtime()
    try:
        import psutil  # noqa: F401  megatron's torch_dist writer hangs without it
    except ImportError:
        raise CheckpointError("megatron-core's torch_dist checkpoint writer needs psutil "
                              "(without it the save hangs); pip install psutil") from None
    root = Path(root)
    train_state = train_state if train_state is not None else TrainState(iteration=iteration)
    if train_state.iteration != iteration:
        raise CheckpointError(f"save_checkpoint: iteration={iteration} but "
                              f"train_state.iteration={train_state.iteration}")
    state_json = train_state.to_json()  # fail before any collective if it cannot be written
    final = root / checkpoint_name(iteration)
    layout = _layout()

    # Rank 0 decides (one view of the file system for all ranks) and prepares the tmp dir.
    decision = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists() and not verify_checkpoint(final):
            decision = {"skip": True}
        else:
            _remove_stale(root)
            nonce = uuid.uuid4().hex[:12]
            tmp = root / f"{final.name}.tmp-{nonce}"
            tmp.mkdir()
            decision = {"skip": False, "tmp": str(tmp), "nonce": nonce}
    decision = _broadcast(decision)
    if decision["skip"]:
        if _rank() == 0:
            logger.info("checkpoint %s already exists and is complete; not saving again", final)
        return final
    tmp = Path(decision["tmp"])

    if optimizer is not None and any(not o.optimizer.state for o in _inner_distributed_optimizers(optimizer)):
        raise CheckpointError("the distributed optimizer has no state before its first step; save "
                              "with optimizer=None (model only) or after a training step")
    optimizer_metadata = _optimizer_metadata(optimizer_sharding) if optimizer is not None else None
    rng = _capture_rng() if save_rng else None
    state = _build_sharded_state_dict(model_chunks, optimizer, scheduler, rng, layout,
                                      is_loading=False, optimizer_metadata=optimizer_metadata)
    start = time.monotonic()
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy(fully_parallel))
    _barrier()  # every rank's files are closed (and fsynced by the writer) before we seal

    error = None
    if _rank() == 0:
        try:
            contents = {"model": True, "optimizer": optimizer is not None,
                        "scheduler": scheduler is not None, "rng": save_rng}
            _seal(tmp, final, root, iteration, state_json, config, layout, contents,
                  optimizer_metadata, decision["nonce"])
            if keep_last is not None:
                apply_retention(root, keep_last)
            logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - start)
        except Exception as exc:  # every rank must learn of it, or they would wait forever
            error = f"finishing checkpoint {final} failed: {type(exc).__name__}: {exc}"
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)
    return final


def _seal(tmp: Path, final: Path, root: Path, iteration: int, state_json: str, config,
          layout: dict, contents: dict, optimizer_metadata: Optional[dict], nonce: str) -> None:
    """Rank 0: add our files, fsync, write COMPLETE last, rename into place, update latest."""
    (tmp / TRAIN_STATE_FILE).write_text(state_json + "\n")
    if config is not None:
        from megatron_ualm.config import save_config
        save_config(config, str(tmp / CONFIG_FILE))
    for f in _list_files(tmp):  # data must be on disk before the marker claims it is
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in {f.parent for f in _list_files(tmp)} | {tmp}:
        _fsync_dir(d)
    manifest = _build_manifest(tmp, iteration, layout, contents, optimizer_metadata)
    _write_atomic(tmp / COMPLETE_MARKER, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    trash = None
    if final.exists():  # an invalid leftover of the same iteration: replace it
        trash = root / f"{final.name}.trash-{nonce}"
        logger.warning("replacing invalid checkpoint %s: %s", final, "; ".join(verify_checkpoint(final)))
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST_FILE, final.name + "\n")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Delete ``.tmp-``/``.trash-`` dirs left by killed saves/deletions (rank 0, before a save)."""
    for p in root.iterdir():
        if p.is_dir() and _TMP_RE.match(p.name):
            logger.warning("removing unfinished checkpoint directory %s (a save or deletion "
                           "was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)


def _latest_target(root: Path) -> Optional[Path]:
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return root / name if name else None


def apply_retention(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete checkpoints older than the ``keep_last`` newest valid ones; returns the deleted.

    Never deletes the one ``latest`` names, any newer than the kept ones, or directories
    without a ``COMPLETE`` marker (they may be a user's copy in progress).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    marked = [p for p in _iter_dirs(root) if (p / COMPLETE_MARKER).exists()]
    valid = [p for p in marked if not verify_checkpoint(p)]
    if len(valid) <= keep_last:
        return []
    kept = valid[:keep_last]
    oldest_kept = _iteration_of(kept[-1])
    protected = set(kept) | {_latest_target(root)}
    deleted = []
    for p in marked:
        if p in protected or _iteration_of(p) >= oldest_kept:
            continue
        trash = root / f"{p.name}.trash-{uuid.uuid4().hex[:12]}"
        os.replace(p, trash)  # from here on nothing mistakes it for a checkpoint
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(p)
        logger.info("deleted old checkpoint %s (keep_last=%d)", p, keep_last)
    return deleted


# --- load -----------------------------------------------------------------------------------

# torch.distributed.checkpoint's .metadata is a plain pickle; before megatron unpickles it we
# replay it with an unpickler that admits only these classes/functions (and fails otherwise).
_DCP = "torch.distributed.checkpoint"
_METADATA_ALLOWED = {
    *((f"{_DCP}.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not is_dtype and (module, name) not in _METADATA_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _check_safe_to_unpickle(path: Path) -> None:
    """Refuse a checkpoint whose pickled files reference anything but plain data classes."""
    meta = path / ".metadata"
    if meta.exists():
        try:
            _MetadataUnpickler(io.BytesIO(meta.read_bytes())).load()
        except Exception as exc:
            raise CheckpointError(f"{meta}: refusing to unpickle ({exc}); this file was not "
                                  "written by torch.distributed.checkpoint") from exc
    for f in path.rglob("*.pt"):
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        if unsafe:
            raise CheckpointError(f"{f}: holds objects that weights_only loading refuses "
                                  f"({', '.join(unsafe)}); not loading it")


def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    strict: bool = True,
    load_optimizer: bool = True,
    load_rng: bool = True,
) -> TrainState:
    """Load a checkpoint into this rank's model chunks (and optimizer, scheduler, RNG).

    Call on every rank together, after building model chunks *and* optimizer at the current
    layout (any TP/PP/DP; it need not match the saved one).

    Args:
        path: a checkpoint dir, a checkpoints dir or an experiment dir (see
            ``resolve_checkpoint``); a corrupt explicitly named checkpoint is refused.
        model_chunks: as for ``save_checkpoint``.
        optimizer, scheduler: restored when given and ``load_optimizer``.
        strict: every model tensor must be in the checkpoint and vice versa (False: missing
            ones keep their current values, e.g. new heads on a converted backbone).
        load_optimizer: False for fine-tuning / initialising from a converted model-only
            checkpoint: optimizer and scheduler start fresh (the optimizer's fp32 main params
            are refreshed from the loaded model params).
        load_rng: restore RNG states (only possible at the saved layout; otherwise a warning).

    Returns the saved TrainState (for fine-tuning the trainer usually resets its iteration).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    _require_runtime()

    resolved = None
    if _rank() == 0:  # one rank decides which directory all ranks load
        try:
            p = resolve_checkpoint(path)
            _check_safe_to_unpickle(p)
            resolved = {"path": str(p)}
        except CheckpointError as exc:
            resolved = {"error": str(exc)}
    resolved = _broadcast(resolved)
    if "error" in resolved:
        raise CheckpointError(resolved["error"])
    ckpt = Path(resolved["path"])
    manifest = read_manifest(ckpt)
    contents = manifest["contents"]

    with_optimizer = optimizer is not None and load_optimizer
    if with_optimizer and not contents.get("optimizer"):
        raise CheckpointError(f"{ckpt} holds no optimizer state (a model-only checkpoint, e.g. "
                              "converted from HF); load it with load_optimizer=False")
    layout = _layout()
    saved_layout = manifest["layout"]
    same_layout = all(saved_layout.get(k) == layout[k] for k in ("tp", "pp", "cp", "dp"))
    with_rng = load_rng and contents.get("rng") and same_layout
    if load_rng and contents.get("rng") and not same_layout and _rank() == 0:
        logger.warning("checkpoint %s was saved at tp=%s pp=%s cp=%s dp=%s, now tp=%s pp=%s cp=%s "
                       "dp=%s: RNG states are not restored, so resuming is not bit-exact",
                       ckpt, *(saved_layout.get(k) for k in ("tp", "pp", "cp", "dp")),
                       *(layout[k] for k in ("tp", "pp", "cp", "dp")))
    with_scheduler = scheduler is not None and with_optimizer and contents.get("scheduler")

    if with_optimizer:
        _prepare_optimizer_for_loading(optimizer)
    state = _build_sharded_state_dict(
        model_chunks, optimizer if with_optimizer else None,
        scheduler if with_scheduler else None, {} if with_rng else None, layout,
        is_loading=True, optimizer_metadata=manifest.get("optimizer_metadata"))
    # Missing = in the checkpoint but not asked for (skipped optimizer/RNG): always fine.
    # Unexpected = asked for but absent: an error when strict.
    handling = StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.RETURN_UNEXPECTED
    result = dist_checkpointing.load(state, str(ckpt), strict=handling)
    loaded = result if strict else result[0]
    if not strict and result[2] and _rank() == 0:
        logger.warning("%s lacks %d requested tensors; they keep their current values: %s",
                       ckpt, len(result[2]), ", ".join(sorted(result[2])[:20]))

    for key, chunk in zip(_model_keys(len(model_chunks)), model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if with_optimizer:
        _load_optimizer_state(optimizer, loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main params follow the loaded weights
    if with_scheduler:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if with_rng:
        _restore_rng(loaded[_RNG_KEY])

    train_state = TrainState.from_json((ckpt / TRAIN_STATE_FILE).read_text(),
                                       str(ckpt / TRAIN_STATE_FILE))
    if _rank() == 0:
        logger.info("loaded checkpoint %s (iteration %d%s%s)", ckpt, train_state.iteration,
                    "" if with_optimizer else ", model only", "" if with_rng else ", fresh RNG")
    return train_state
