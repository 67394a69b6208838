"""Elementwise fusions through ``torch.compile`` on CUDA, the eager function elsewhere.

The model's elementwise pieces (RMSNorm, SwiGLU, RoPE) are written once as plain PyTorch
functions. ``compiled`` / ``maybe_compiled`` run such a function through ``torch.compile``
on CUDA (Inductor generates one Triton kernel per direction and AOTAutograd keeps only what
backward needs) and eagerly elsewhere; the inference graph uses them. Training uses
hand-written Triton kernels in autograd Functions for the three (``norm``, ``swiglu``,
``rope``): a compiled call costs the host ~0.3 ms (guards, AOTAutograd and Inductor
wrappers), which left the GPU waiting in the forward, and Inductor's SwiGLU backward ran at
about half the memory bandwidth. Tests compare the compiled and
eager functions (``tests/test_model_fusions.py``, CPU Inductor; GPU tests marked ``gpu``).

``HAVE_TRITON`` (with ``triton`` / ``tl``, None without it) is the one Triton import the kernel
modules share. ``ENABLED`` (env ``UALM_COMPILE=0`` turns it off) switches every compiled path and the
kernels back to eager,
e.g. for debugging or to measure what the fusions give.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable

import torch

try:  # Triton ships with CUDA builds of torch; absent on the CPU test machines
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = tl = None
    HAVE_TRITON = False

ENABLED = os.environ.get("UALM_COMPILE", "1") != "0"


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, one compiled object per function (shapes specialise, then go
    dynamic after a change, as torch.compile does by default)."""
    return torch.compile(fn)


def maybe_compiled(fn: Callable, x: torch.Tensor) -> Callable:
    """The compiled ``fn`` for CUDA tensors while fusions are enabled, else ``fn``."""
    return compiled(fn) if (ENABLED and x.is_cuda) else fn


def scope(name: str):
    """A profiler range (``torch.profiler.record_function``) while a profiler is running, else a
    no-op context: ``benchmarks/profile_step.py`` attributes kernels to model parts by these."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
