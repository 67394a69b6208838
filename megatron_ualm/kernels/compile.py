"""Elementwise functions through ``torch.compile`` on CUDA, the eager function elsewhere.

The model's elementwise pieces (RMSNorm, SwiGLU, RoPE) are written once as plain PyTorch
functions (the references in ``rmsnorm``, ``swiglu``, ``rope``). ``compiled`` /
``maybe_compiled`` run such a function through ``torch.compile`` on CUDA (Inductor generates
one Triton kernel per direction and AOTAutograd keeps only what backward needs) and eagerly
elsewhere; the inference graph uses them. Training uses the hand-written Triton kernels of
this package for the three instead: a compiled call costs the host ~0.3 ms (guards,
AOTAutograd and Inductor wrappers), which left the GPU waiting in the forward, and Inductor's
SwiGLU backward ran at about half the memory bandwidth. Tests compare the compiled and eager
functions (``tests/test_model_fusions.py``, CPU Inductor; GPU tests marked ``gpu``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from megatron_ualm import kernels


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, one compiled object per function (shapes specialise, then go
    dynamic after a change, as torch.compile does by default)."""
    return torch.compile(fn)


def maybe_compiled(fn: Callable, x: torch.Tensor) -> Callable:
    """The compiled ``fn`` for CUDA tensors while the kernels are enabled, else ``fn``."""
    return compiled(fn) if kernels.use_kernels(x, needs_triton=False) else fn
