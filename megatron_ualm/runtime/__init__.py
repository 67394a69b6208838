"""Runtime layer: start megatron-core on GPUs (NCCL) or CPU (gloo) through one code path.

* :func:`init_runtime` / :func:`shutdown_runtime` / :class:`Runtime` — process group,
  megatron parallel state, seeding (``distributed.py``).
* :func:`apply_cpu_compat` / :func:`is_cpu_compat_applied` — runtime redirection of
  megatron-core's CUDA assumptions when running on CPU (``cpu_compat.py``).
"""
from .cpu_compat import (
    CpuCompatError,
    apply_cpu_compat,
    check_patch_targets,
    is_cpu_compat_applied,
    patched_symbols,
)
from .distributed import Runtime, init_runtime, set_cuda_device_max_connections, shutdown_runtime

__all__ = [
    "CpuCompatError",
    "Runtime",
    "apply_cpu_compat",
    "check_patch_targets",
    "init_runtime",
    "is_cpu_compat_applied",
    "patched_symbols",
    "set_cuda_device_max_connections",
    "shutdown_runtime",
]
