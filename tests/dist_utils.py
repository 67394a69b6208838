"""Run a test function in N CPU processes that can talk over gloo.

Usage (in a test module; ``tests/`` is on ``sys.path`` under pytest)::

    from dist_utils import run_distributed

    def _tp2_step(hidden):                      # module level: it is pickled by reference
        from megatron_ualm.runtime import init_runtime, shutdown_runtime
        rt = init_runtime(tensor_parallel=2, device="cpu")
        ...                                     # build model, run steps
        shutdown_runtime()                      # optional: the helper cleans up too
        return {"rank": rt.rank, "loss": loss}  # anything picklable (CPU tensors are fine)

    def test_tp2():
        results = run_distributed(_tp2_step, 2, 64)   # -> [result of rank 0, result of rank 1]

What each child gets: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` (a port free at launch), ``LOCAL_WORLD_SIZE``, ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)`` (the CI machines have 2 cores). It does *not* initialise
torch.distributed: the function does, normally via ``megatron_ualm.runtime.init_runtime``
(which reads those variables), so each test chooses its own TP/PP layout.

Failure handling: the first rank that raises is reported in a ``RuntimeError`` carrying that
rank's formatted traceback; the other ranks (often stuck in a collective waiting for the dead
one) are killed. A rank that dies without a report (segfault, ``os._exit``) is reported with
its exit code. If the whole run exceeds ``timeout`` seconds, every rank is killed and a
``TimeoutError`` names the ranks that had not finished. If a rank loses the race for the
chosen port ("address already in use") the launch is retried on a new port.

Constraints: ``fn`` and its arguments must be picklable (module-level functions, plain data);
children are started with the ``spawn`` method, so they re-import the test module — keep
heavy work out of module import time.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional

import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port"]

_PORT_IN_USE_MARKERS = ("address already in use", "eaddrinuse", "errno: 98")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, result_dir: str,
           args: tuple, kwargs: dict) -> None:
    """Entry point of one rank: set the torchrun-style environment, run, pickle the outcome."""
    os.environ.update({
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    })
    import torch

    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}.pkl")
    try:
        value = fn(*args, **kwargs)
        outcome = ("ok", value)
    except BaseException:  # report everything, including KeyboardInterrupt / SystemExit
        outcome = ("error", traceback.format_exc())
    try:
        payload = pickle.dumps(outcome)
    except Exception:
        payload = pickle.dumps(("error", "return value is not picklable:\n" + traceback.format_exc()))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)  # atomic: the parent never reads a half-written file
    if outcome[0] == "ok":
        _cleanup_process_groups()


def _cleanup_process_groups() -> None:
    """Tear down megatron / torch.distributed state the function left behind."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from megatron_ualm.runtime import shutdown_runtime

            shutdown_runtime()
    except Exception:
        pass  # the result is already recorded; cleanup problems must not mask it


def _read(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)


def _launch_once(fn, world_size, args, kwargs, timeout) -> List[Any]:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ualm_dist_") as result_dir:
        procs = [
            ctx.Process(target=_child, args=(fn, r, world_size, port, result_dir, args, kwargs),
                        name=f"rank{r}", daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        paths = [os.path.join(result_dir, f"rank{r}.pkl") for r in range(world_size)]
        results: List[Optional[tuple]] = [None] * world_size
        deadline = time.monotonic() + timeout
        try:
            while True:
                for r, p in enumerate(procs):
                    if results[r] is None and os.path.exists(paths[r]):
                        results[r] = _read(paths[r])
                        if results[r][0] == "error":
                            raise _first_error(procs, paths, world_size)
                    if results[r] is None and not p.is_alive() and not os.path.exists(paths[r]):
                        raise _first_error(procs, paths, world_size)
                if all(res is not None for res in results):
                    break
                if time.monotonic() > deadline:
                    pending = [r for r, res in enumerate(results) if res is None]
                    raise TimeoutError(
                        f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}) "
                        f"timed out after {timeout:.0f} s; ranks still running: {pending}")
                time.sleep(0.05)
            for p in procs:
                p.join(30)
        finally:
            _kill(procs)
        return [res[1] for res in results]


def _first_error(procs, paths, world_size) -> "_RankError":
    """The root cause among failed ranks: the earliest-written error report.

    A failure on one rank usually makes its peers fail too (broken pipe, timeout), a little
    later; waiting a moment and taking the oldest report names the rank that failed first.
    A rank that died without any report (segfault, OOM kill) is taken as the cause first.
    """
    time.sleep(0.5)
    reports = []
    for r, (p, path) in enumerate(zip(procs, paths)):
        if os.path.exists(path):
            status, detail = _read(path)
            if status == "error":
                reports.append(((1, os.path.getmtime(path)), r, detail))
        elif not p.is_alive():
            reports.append(((0, 0.0), r,
                            f"process exited with code {p.exitcode} without reporting a result "
                            "(crashed, called os._exit or was killed; its stderr is above). "
                            "Children start with 'spawn': fn must be importable by module path, "
                            "not defined in __main__ of a notebook/stdin"))
    reports.sort()
    _, rank, detail = reports[0]
    others = [r for _, r, _ in reports[1:]]
    if others:
        detail += f"\n(ranks {others} failed too, probably as a consequence)"
    return _RankError(rank, world_size, detail)


class _RankError(RuntimeError):
    def __init__(self, rank: int, world_size: int, detail: str):
        self.rank = rank
        self.detail = detail
        super().__init__(f"rank {rank} of {world_size} failed:\n{detail}")


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 300.0,
                    port_retries: int = 2, **kwargs) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned CPU processes.

    Args:
        fn: picklable (module-level) function; runs once per rank, ranks 0..world_size-1.
        world_size: number of processes.
        *args, **kwargs: forwarded to ``fn`` (must be picklable).
        timeout: seconds for the whole run (start-up of the children included).
        port_retries: extra launches allowed when the rendezvous port was taken meanwhile.

    Returns:
        ``[fn's return value on rank 0, ..., on rank world_size - 1]``.

    Raises:
        RuntimeError: a rank raised or died; the message holds its traceback.
        TimeoutError: not every rank finished in time.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    for attempt in range(port_retries + 1):
        try:
            return _launch_once(fn, world_size, args, kwargs, timeout)
        except _RankError as exc:
            port_clash = any(m in exc.detail.lower() for m in _PORT_IN_USE_MARKERS)
            if port_clash and attempt < port_retries:
                continue
            raise RuntimeError(str(exc)) from None
    raise AssertionError("unreachable")
