"""Helper processes of a training rank under a cluster's signals.

Slurm (``--signal``, ``scancel --signal``, preemption) and ``kill -- -PGID`` deliver a signal to
every process of the job step at once: the rank *and* its helpers -- data-loader workers and the
queue server that megatron's checkpoint writer starts. The rank answers SIGTERM/SIGUSR1 by
finishing its step, saving a checkpoint and exiting for requeue (``training/signals.py``); a
helper that died of the same signal would break that step or that save. So helpers ignore the
preemption signals and instead end with their parent (``PR_SET_PDEATHSIG`` on Linux), which
they would not otherwise do after a ``kill -9`` of the rank.

Kept free of heavy imports: a spawned helper imports this module before anything else.
"""
from __future__ import annotations

import functools
import os
import signal

from megatron_ualm.procutil import die_with_parent

#: The signals a rank answers with "save and exit for requeue".
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def shield_helper(parent_pid: int) -> None:
    """In a helper process: outlive the preemption signals, die with the parent."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


def _shield_worker(parent_pid: int, worker_id: int) -> None:
    shield_helper(parent_pid)


def loader_worker_init():
    """A ``DataLoader(worker_init_fn=...)`` that shields each worker (call in the rank)."""
    return functools.partial(_shield_worker, os.getpid())


def start_checkpoint_writer_queue() -> None:
    """Start, shielded, the results queue that megatron's torch_dist writer otherwise starts on
    the first save as a plain spawned ``multiprocessing`` Manager (megatron-core 0.16 to 0.19:
    ``filesystem_async._results_queue``). Unshielded, a signal to the process group kills it and
    the preemption save then fails with ``BrokenPipeError``. Idempotent; call on every rank
    before a save."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=shield_helper, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._ualm_manager = manager  # keeps it alive as long as the queue
