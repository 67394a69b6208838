"""Stop cleanly when Slurm asks: save a checkpoint on every rank together, then exit for requeue.

Contract with the Slurm job script (slurm/pretrain_ualm.sh follows it):

* ``#SBATCH --signal=USR1@180`` (without ``B:``, so every task of the job step receives it)
  warns the trainer before the time limit; Slurm preemption and ``scancel --signal=TERM``
  send SIGTERM. Either one sets a flag here; nothing else happens inside the handler.
* The trainer calls ``handler.should_stop()`` once per step. It all-reduces the flag (MAX)
  over all ranks, so a signal seen by *any* rank stops *all* ranks at the same step: every
  rank reaches ``save_checkpoint`` together, and the collective inside it cannot deadlock.
* After the checkpoint is complete the trainer exits with ``REQUEUE_EXIT_CODE`` (42) on
  every rank. The job script runs ``srun ...; status=$?`` and, when ``status`` is 42, calls
  ``scontrol requeue "$SLURM_JOB_ID"`` (the job needs ``#SBATCH --requeue``) and exits 0. On
  restart the trainer resumes from the newest complete checkpoint (``auto_resume``).
  42 is distinct from 0 (training finished: do not requeue) and from crash codes (1, or
  128+N for a signal death), so a crash is never requeued in a loop.
* On Slurm *preemption* with ``PreemptMode=REQUEUE`` Slurm requeues the job itself; the exit
  code then only matters for the log. SIGKILL follows SIGTERM after ``KillWait`` (often 30 s)
  or ``GraceTime``: large checkpoints need the earlier USR1 warning, not SIGTERM.
* Slurm delivers the signal to every process of the job step: ranks, their helper processes
  (which ignore it: ``runtime/helper_processes.py``) and, under torchrun, the agent (which the
  job script makes ignore SIGUSR1). torchrun turns its workers' exit code into its own (1), so
  rank 0 also writes the file named by ``$UALM_REQUEUE_MARKER`` (set by the job script) before
  exiting; the script requeues when it exists.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Callable, Iterable, Optional, Union

import torch
import torch.distributed as dist

from megatron_ualm.runtime.helper_processes import PREEMPTION_SIGNALS

__all__ = ["PreemptionHandler", "REQUEUE_EXIT_CODE", "DEFAULT_SIGNALS", "REQUEUE_MARKER_ENV"]

logger = logging.getLogger(__name__)

#: Exit status meaning "checkpoint saved because of a signal; requeue me".
#: Must equal REQUEUE_EXIT_CODE in slurm/pretrain_ualm.sh.
REQUEUE_EXIT_CODE = 42

DEFAULT_SIGNALS = PREEMPTION_SIGNALS

#: Environment variable naming a file that rank 0 creates when it exits for requeue.
REQUEUE_MARKER_ENV = "UALM_REQUEUE_MARKER"

_Handler = Union[Callable[[int, Optional[FrameType]], object], int, None]


class PreemptionHandler:
    """Records SIGTERM / SIGUSR1 and lets all ranks agree to stop at the same step.

    Usage (every rank)::

        preemption = PreemptionHandler()          # installs the handlers
        for step in ...:
            train_step()
            if preemption.should_stop():
                save_checkpoint(...)
                preemption.exit_for_requeue()     # SystemExit(REQUEUE_EXIT_CODE)

    Handlers are installed by the constructor (``install=False`` to defer: ``install()`` or
    ``with``), and the previous ones restored by ``uninstall()`` / leaving the ``with``.
    Must be created in the main thread (Python delivers signals there only).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, install: bool = True):
        self.signals = tuple(signals)
        self.received: Optional[int] = None  # the first signal number seen on this rank
        self.received_at: Optional[float] = None
        self._previous: dict[int, _Handler] = {}
        if install:
            self.install()

    def install(self) -> "PreemptionHandler":
        if self._previous:  # already installed
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only set a flag: the step in progress (possibly inside a collective) must finish.
        if self.received is None:
            self.received = signum
            self.received_at = time.time()
            logger.warning("received %s; will save a checkpoint and exit with code %d after "
                           "the current step", signal.Signals(signum).name, REQUEUE_EXIT_CODE)

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal. A collective: call on all ranks."""
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def exit_for_requeue(self) -> None:
        """Leave the process with ``REQUEUE_EXIT_CODE`` after the checkpoint is saved.

        Raises SystemExit (not os._exit), so ``finally`` blocks such as ``shutdown_runtime``
        still run. Call it on every rank, after ``save_checkpoint`` returned.
        """
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        marker = os.environ.get(REQUEUE_MARKER_ENV)
        if marker:
            if not dist.is_initialized() or dist.get_rank() == 0:
                with open(marker, "w") as f:
                    f.write(f"{name}\n")
            if dist.is_initialized():  # no rank leaves before the marker exists: a launcher
                dist.barrier()         # may stop the others as soon as one rank exits
        logger.warning("exiting with code %d for requeue (%s)", REQUEUE_EXIT_CODE, name)
        raise SystemExit(REQUEUE_EXIT_CODE)
