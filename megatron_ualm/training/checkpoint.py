"""Training checkpoints: atomic, self-verifying, and loadable at another TP/PP/DP layout.

This module holds the megatron state (sharded state dicts, RNG, optimizer quirks) and the
save/load orchestration across ranks; the on-disk layout, the ``COMPLETE`` manifest,
verification, discovery, retention and why a kill never loses a checkpoint are in
``megatron_ualm.training.checkpoint_files`` (its names are re-exported here).

Resharding: model and optimizer go through megatron-core ``dist_checkpointing`` (torch_dist
format). Sharded tensors are stored by global key and offset, so a checkpoint written at one
TP/PP/DP layout loads at another. The distributed optimizer is saved as
``fully_reshardable`` by default (see ``save_checkpoint``). RNG states are per rank
(``ShardedObject`` keyed by the (pp, tp, cp, dp) grid); they are restored only at the same
layout, otherwise the fresh seeding is kept and a warning says resume is not bit-exact.

Fit: before megatron reads a tensor, ``load_checkpoint`` refuses a checkpoint whose shape
settings (its ``config.yaml``) or tensor shapes differ from the model's, in one line naming
both values (``checkpoint_shapes``; megatron itself would load vocabulary tables of another
layout with shifted rows). Only the TP padding may differ, and with ``expand_vocab`` the
number of text rows may grow.

Megatron quirks (megatron-core 0.16; the optimizer-loading ones are worked around in
``megatron_ualm/mcore_compat.py`` with the other version differences):
* the torch_dist writer needs ``psutil``; without it the writer subprocess dies and the save
  *hangs* — ``save_checkpoint`` checks for it first;
* the writer starts a ``multiprocessing`` Manager with the *spawn* method on the first save,
  which re-imports ``__main__``: scripts that save need an ``if __name__ == "__main__":`` guard;
* every save goes through megatron's asynchronous request (``mcore_compat.start_sharded_save``):
  executed at once for a synchronous save, or run by a process forked from the rank
  (``AsyncSaves``, after the GPU tensors were copied to host memory); either way each rank's
  writer hashes its files right after writing them (``checkpoint_files.write_rank_digests``);
* ``DistributedDataParallel.sharded_state_dict`` prefixes every key with ``module.``; model
  chunks are unwrapped (DDP, Float16Module) before their state is taken;
* the distributed optimizer cannot produce a state dict before its first step (saving
  refuses with a message; loading gives a fresh one megatron's own zero-gradient dummy step);
* without apex/TE, loading the distributed optimizer (fully_reshardable / model-space)
  fails with ``KeyError: 'step'``, and once that is avoided all parameters share one Adam
  ``step`` tensor that torch increments once per parameter — both are worked around in
  ``mcore_compat.load_optimizer_state`` (instance-level, no global patching), and the exact-resume test
  catches either.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_ualm.mcore_compat import (inner_distributed_optimizers, load_optimizer_state, prepare_optimizer_for_loading,
                                        start_sharded_save)
from megatron_ualm.procutil import die_with_parent
from megatron_ualm.runtime.helper_processes import shield_helper, start_checkpoint_writer_queue
from megatron_ualm.training.checkpoint_files import (  # re-exported: callers import them from here
    COMPLETE_MARKER, CONFIG_FILE, LATEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SHA256_CHUNK_BYTES,
    TRAIN_STATE_FILE, CheckpointError, TrainState, apply_retention, build_manifest,
    check_safe_to_unpickle, checkpoint_name, checkpoints_dir, find_latest_checkpoint, has_checkpoint,
    read_manifest, remove_stale, resolve_checkpoint, seal_checkpoint, verify_checkpoint, write_rank_digests,
)
from megatron_ualm.training.checkpoint_shapes import (
    VOCAB_TABLES, VocabExpansion, check_layout, check_tensor_shapes, saved_model_config, saved_tensor_shapes,
)

__all__ = [
    "CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint", "AsyncSaves",
    "find_latest_checkpoint", "has_checkpoint", "resolve_checkpoint", "verify_checkpoint", "read_manifest",
    "apply_retention", "checkpoints_dir", "checkpoint_name", "COMPLETE_MARKER", "LATEST_FILE",
]

logger = logging.getLogger(__name__)

DEFAULT_OPTIMIZER_SHARDING = "fully_reshardable"
_RNG_KEY = "rng_state"


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

class AsyncSaves:
    """Checkpoints still being written in the background (``checkpoint.async_save``).

    ``save_checkpoint(..., async_saves=saves)`` returns once megatron's writer has taken a
    copy of the state (GPU tensors copied to host memory, then a forked writer process per
    rank) and training goes on; the files go to the ``.tmp-`` directory meanwhile. When every
    rank's writer has ended, the save is finished like a synchronous one: rank 0 gathers the
    checksums into ``COMPLETE`` and renames the directory into place. Until then the previous
    checkpoint is the newest one, so a kill at any moment loses only the one in flight.

    Create one per run on every rank; every method is a collective (all ranks, same point).
    ``poll`` finishes the saves whose writers are done (call it once per step while
    ``pending``); ``wait`` blocks until all are done (before the next save, at the end of
    training, before a preemption exit); ``abort`` kills the writers after an error.
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
        self._queue = AsyncCallsQueue(persistent=False)  # a forked writer process per save
        self._paths: dict[int, Path] = {}  # call index -> the checkpoint it will complete

    @property
    def pending(self) -> list[Path]:
        """The checkpoint directories whose saves are not finished yet, oldest first."""
        return list(self._paths.values())

    def schedule(self, request, final: Path) -> None:
        """Start writing ``request`` (an ``AsyncRequest`` that completes ``final``)."""
        self._paths[self._queue.schedule_async_request(request)] = final

    def _finish(self, blocking: bool) -> list[Path]:
        if not self._paths:
            return []
        try:
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException:  # megatron has dropped the failed save from its queue: so do we
            active = {call.idx for call in self._queue.async_calls}
            self._paths = {i: p for i, p in self._paths.items() if i in active}
            raise
        return [self._paths.pop(i) for i in done]

    def poll(self) -> list[Path]:
        """Finish the saves whose writers have ended on every rank; returns their directories."""
        return self._finish(blocking=False)

    def wait(self) -> list[Path]:
        """Block until every pending save is finished; returns their directories."""
        return self._finish(blocking=True)

    def abort(self) -> None:
        """Kill the writers of unfinished saves: their ``.tmp-`` directories are never loaded
        and the next save removes them. For error paths, where ranks may not meet again."""
        for call in self._queue.async_calls:
            call.async_caller.close(abort=True)
        self._queue.async_calls.clear()
        self._paths.clear()


def _write_rank_files(write, directory: str, rank: int, checksums: bool, hash_threads: Optional[int],
                      trainer_pid: int, *args, **kwargs) -> None:
    """megatron's writer of this rank's files, then (``checksums``) their digests while they
    are still in the page cache. Runs in the rank for a synchronous save; for an asynchronous
    one in a process forked from it, which like the rank's other helpers outlives a preemption
    signal to the whole job step (the rank waits for it before exiting) and dies with the rank,
    and so do the processes megatron forks from it to write each file."""
    if os.getpid() != trainer_pid:
        gc.disable()  # as in megatron's writer: collecting the rank's CUDA tensors here would fail
        shield_helper(trainer_pid)
        os.register_at_fork(after_in_child=functools.partial(die_with_parent, os.getpid()))
    write(*args, **kwargs)
    if checksums:
        write_rank_digests(directory, rank, hash_threads)


def _seal_on_rank0(tmp: Path, final: Path, root: Path, iteration: int, state_json: str, config,
                   layout: dict, contents: dict, optimizer_metadata: Optional[dict], nonce: str,
                   keep_last: Optional[int], checksums: bool, hash_threads: Optional[int],
                   started: float) -> None:
    """The last step of a save, on every rank once every rank's files are written: rank 0 seals
    the directory (``seal_checkpoint``) and applies retention; all ranks raise if it failed."""
    error = None
    if _rank() == 0:
        try:
            seal_checkpoint(tmp, final, root, iteration, state_json, config, layout, contents,
                            optimizer_metadata, nonce, checksums, hash_threads)
            if keep_last is not None:
                apply_retention(root, keep_last)
            logger.info("saved checkpoint %s in %.1f s", final, time.monotonic() - started)
        except Exception as exc:  # every rank must learn of it, or they would wait forever
            error = f"finishing checkpoint {final} failed: {type(exc).__name__}: {exc}"
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)


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
    async_saves: Optional[AsyncSaves] = None,
    hash_threads: Optional[int] = None,
    checksums: bool = True,
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
        async_saves: write in the background (see ``AsyncSaves``): returns once the writers
            have started; the directory appears when ``async_saves.poll()``/``wait()`` finish
            it. A save still pending there is finished first. None: write before returning.
        hash_threads: threads with which each rank hashes the files it wrote (None:
            ``default_hash_threads()``).
        checksums: False writes sizes only into the manifest (as manifests before checksums
            of large files; for measuring what hashing costs).

    Returns the final directory. If a valid checkpoint of that iteration already exists it is
    kept and nothing is written (e.g. a preemption save right after a periodic one).
    Raises CheckpointError on every rank if the save could not be completed; the previous
    checkpoints are untouched in that case.
    """
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
    if async_saves is not None:
        async_saves.wait()  # one save at a time; the previous one also removes its stale dirs

    # Rank 0 decides (one view of the file system for all ranks) and prepares the tmp dir.
    decision = None
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if final.exists() and not verify_checkpoint(final, contents=False):
            decision = {"skip": True}
        else:
            remove_stale(root)
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

    if optimizer is not None and any(not o.optimizer.state for o in inner_distributed_optimizers(optimizer)):
        raise CheckpointError("the distributed optimizer has no state before its first step; save "
                              "with optimizer=None (model only) or after a training step")
    optimizer_metadata = _optimizer_metadata(optimizer_sharding) if optimizer is not None else None
    rng = _capture_rng() if save_rng else None
    state = _build_sharded_state_dict(model_chunks, optimizer, scheduler, rng, layout,
                                      is_loading=False, optimizer_metadata=optimizer_metadata)
    started = time.monotonic()
    start_checkpoint_writer_queue()  # shielded from the preemption signal sent to the whole step
    # Writes the common state now; the returned request writes this rank's .distcp files.
    request = start_sharded_save(state, str(tmp), _save_strategy(fully_parallel))
    if request.async_fn is not None:  # None: this rank has nothing to write
        request = request._replace(async_fn=functools.partial(
            _write_rank_files, request.async_fn, str(tmp), _rank(), checksums, hash_threads, os.getpid()))
    contents = {"model": True, "optimizer": optimizer is not None,
                "scheduler": scheduler is not None, "rng": save_rng}
    # megatron's finalisation (the .metadata file) runs first, then ours seals the directory.
    request.finalize_fns.append(functools.partial(
        _seal_on_rank0, tmp, final, root, iteration, state_json, config, layout, contents,
        optimizer_metadata, decision["nonce"], keep_last, checksums, hash_threads, started))
    if async_saves is None:
        request.execute_sync()  # write, barrier, finalise
    else:
        async_saves.schedule(request, final)
    return final


# --- load -----------------------------------------------------------------------------------

def load_checkpoint(
    path: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    strict: bool = True,
    load_optimizer: bool = True,
    load_rng: bool = True,
    expand_vocab: bool = False,
    new_rows_seed: int = 0,
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
        expand_vocab: a UALM model may have more text rows than the checkpoint (model-only
            loads; ``checkpoint_shapes.VocabExpansion``); new rows drawn with ``new_rows_seed``.
            Every rank reads the checkpoint's two tables whole for it (once).

    Before megatron reads a tensor, the checkpoint must fit the model
    (``check_checkpoint_fits``): otherwise CheckpointError, one line, on every rank.
    Returns the saved TrainState (for fine-tuning the trainer usually resets its iteration).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling
    _require_runtime()
    run_cfg = _ualm_model_config(model_chunks)

    resolved = None
    if _rank() == 0:  # one rank decides which directory all ranks load, and whether it fits
        try:
            p = resolve_checkpoint(path)
            check_safe_to_unpickle(p)
            saved = saved_model_config(p)
            expansion = check_layout(p, saved, run_cfg, expand_vocab) if run_cfg is not None else None
            resolved = {"path": str(p), "expansion": expansion,
                        "saved_vocab": saved.vocab() if saved is not None else None}
        except CheckpointError as exc:
            resolved = {"error": str(exc)}
    resolved = _broadcast(resolved)
    if "error" in resolved:
        raise CheckpointError(resolved["error"])
    ckpt = Path(resolved["path"])
    expansion: Optional[VocabExpansion] = resolved["expansion"]
    manifest = read_manifest(ckpt)
    contents = manifest["contents"]

    with_optimizer = optimizer is not None and load_optimizer
    if with_optimizer and expansion is not None:
        raise CheckpointError(
            f"checkpoint.expand_vocab: {ckpt} is resumed with its optimizer state, which cannot grow "
            f"from {expansion.old.text_vocab_size} to {expansion.new.text_vocab_size} text rows; expand "
            f"in a model-only load: checkpoint.load={ckpt} with a new checkpoint.experiment_dir")
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
        prepare_optimizer_for_loading(optimizer)
    state = _build_sharded_state_dict(
        model_chunks, optimizer if with_optimizer else None,
        scheduler if with_scheduler else None, {} if with_rng else None, layout,
        is_loading=True, optimizer_metadata=manifest.get("optimizer_metadata"))
    model_keys = _model_keys(len(model_chunks))
    check_checkpoint_fits(ckpt, [state[k] for k in model_keys], resolved["saved_vocab"], run_cfg,
                          saved_layout.get("tp"))
    grown = {}
    if expansion is not None:  # grown tables are built from the checkpoint's rows, not by megatron
        grown = {(k, name): state[k].pop(name) for k in model_keys for name, sh in list(state[k].items())
                 if getattr(sh, "key", None) in VOCAB_TABLES}
    # Missing = in the checkpoint but not asked for (skipped optimizer/RNG): always fine.
    # Unexpected = asked for but absent: an error when strict.
    handling = StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.RETURN_UNEXPECTED
    result = dist_checkpointing.load(state, str(ckpt), strict=handling)
    loaded = result if strict else result[0]
    if not strict and result[2] and _rank() == 0:
        logger.warning("%s lacks %d requested tensors; they keep their current values: %s",
                       ckpt, len(result[2]), ", ".join(sorted(result[2])[:20]))
    if grown:
        _load_grown_tables(ckpt, expansion, grown, loaded, run_cfg, new_rows_seed)

    for key, chunk in zip(model_keys, model_chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if with_optimizer:
        load_optimizer_state(optimizer, loaded["optimizer"])
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


# --- does the checkpoint fit the model ------------------------------------------------------

def _ualm_model_config(chunks: Sequence[torch.nn.Module]):
    """The ModelConfig UALM chunks were built from (None for other megatron models)."""
    from megatron_ualm.model.ualm_model import UALMModel
    module = _unwrap(chunks[0])
    return module.model_cfg if isinstance(module, UALMModel) else None


def _first_error(problem: Optional[str]) -> Optional[str]:
    """The first rank's problem, on every rank (each rank checks its own tensors)."""
    if not _dist_on() or dist.get_world_size() == 1:
        return problem
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def check_checkpoint_fits(ckpt: Path, model_states: Sequence[dict], saved_vocab, run_cfg,
                          saved_tp: Optional[int]) -> None:
    """Refuse, on every rank, a checkpoint whose tensors do not have the global shapes of this
    rank's model chunks (``checkpoint_shapes.check_tensor_shapes``); call on every rank.

    model_states: the chunks' sharded state dicts; saved_vocab: the vocabulary of the
    checkpoint's config.yaml (None: it has none); run_cfg: the ModelConfig of UALM chunks
    (None: another model, its vocabulary tables are not checked); saved_tp: from the manifest.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    tensors = [sh for st in model_states for sh in st.values() if isinstance(sh, ShardedTensor)]
    exact = {sh.key: tuple(sh.global_shape) for sh in tensors if not sh.allow_shape_mismatch}
    tables = sorted({sh.key for sh in tensors if sh.allow_shape_mismatch and sh.key in VOCAB_TABLES})
    vocab, hidden = None, None
    if run_cfg is not None:
        vocab, hidden = saved_vocab if saved_vocab is not None else run_cfg.vocab(), run_cfg.hidden_size
    problem = check_tensor_shapes(ckpt, saved_tensor_shapes(ckpt), exact, tables, vocab, hidden, saved_tp,
                                  has_config=saved_vocab is not None)
    problem = _first_error(problem)
    if problem:
        raise CheckpointError(problem)


def _load_grown_tables(ckpt: Path, expansion: VocabExpansion, grown: dict, loaded: dict, run_cfg,
                       seed: int) -> None:
    """Put this rank's shard of each grown vocabulary table into ``loaded``.

    grown: (model key, state-dict name) -> the table's ShardedTensor (taken out of megatron's
    load). Every rank reads the checkpoint's whole tables and draws the same new rows, so the
    result does not depend on the layout."""
    from megatron_ualm.convert.dist_format import DistCheckpointReader
    reader = DistCheckpointReader(str(ckpt))
    padded_size = next(iter(grown.values())).global_shape[0]
    draws = expansion.new_rows(padded_size, run_cfg.hidden_size, run_cfg.init_method_std, seed)
    for (model_key, name), sh in grown.items():
        old = reader.read([(sh.key, None)])[0]
        loaded[model_key][name] = expansion.table(old, *draws[sh.key])[sh.global_slice()]
    if _rank() == 0:
        logger.info("checkpoint.expand_vocab: %s has %d text rows, the model %d: added %d rows "
                    "(normal(0, %g), seed %d); the codebook blocks moved up by as many", ckpt,
                    expansion.old.text_vocab_size, expansion.new.text_vocab_size, expansion.grown,
                    run_cfg.init_method_std, seed)
