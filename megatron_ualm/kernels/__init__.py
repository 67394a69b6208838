"""The hand-written GPU kernels the model calls, each beside its plain-PyTorch reference.

Modules, one kernel family each (Triton kernel(s), launch wrapper, autograd Function, and the
reference with the same contract, which is what runs on CPU and with the switch off):

* ``rmsnorm``: Qwen2's RMSNorm, forward and backward;
* ``swiglu``: ``SiLU(gate) * up`` on fc1's [gate; up] output;
* ``rope``: rotary embedding applied to q/k (megatron's unfused RoPE);
* ``cross_entropy``: the head's fused output projection + vocab-parallel cross entropy;
* ``wgrad``: weight gradients accumulated into megatron's fp32 ``main_grad`` inside the GEMM;
* ``fp8_cast``: the FP8 casts with amax bookkeeping (also writing a weight's transpose), the seed
  of an empty amax history, and the scaled FP8 GEMM call;
* ``compile``: ``torch.compile`` of a reference function on CUDA (the inference graph's path);
* ``profiling``: ``scope``, the profiler ranges the model opens around its parts.

The model (``megatron_ualm.model``) holds the structure and calls these entry points.

One switch: ``ENABLED`` (env ``UALM_COMPILE=0`` turns it off, e.g. for debugging or to measure
what the kernels give). Every entry point decides with ``use_kernels(tensor)`` -- switch on,
tensor on CUDA, Triton importable -- and takes its reference otherwise. ``HAVE_TRITON`` (with
``triton`` / ``tl``, None without it) is the one Triton import the kernel modules share.
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; absent on the CPU test machines
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = tl = None
    HAVE_TRITON = False

ENABLED = os.environ.get("UALM_COMPILE", "1") != "0"


def _on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def use_kernels(t: torch.Tensor, needs_triton: bool = True) -> bool:
    """Whether an entry point runs its kernel for ``t``: the switch is on, t is a CUDA tensor,
    and Triton is importable (``needs_triton=False``: paths that are cuBLAS or
    ``torch.compile`` calls, not Triton kernels of ours)."""
    return ENABLED and _on_gpu(t) and (HAVE_TRITON or not needs_triton)
