"""Worker processes that die with the process that started them.

A pool worker whose parent is killed (``kill -9``, OOM killer, a Slurm step cancelled) is
re-parented to init and would keep decoding or tokenizing for nothing, holding memory and
output files. Every tool that starts workers passes :func:`die_with_parent` (with its own
pid) as the pool's initializer, so each worker asks the kernel for SIGKILL when its parent
goes away.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process get SIGKILL when its parent dies; exit now if it already has.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere only the immediate check is done.
    ``parent_pid`` is the pid of the process that created the worker: it is compared with
    ``getppid()`` *after* the request, so a parent that died between the fork and the
    request (whose death the kernel therefore never signals) is still noticed.
    Note: the kernel signals when the parent *thread* that forked the worker exits, so
    start pools from the main thread (as every tool here does).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent is already gone: this worker is an orphan
