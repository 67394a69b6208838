"""Profiler ranges around the model's parts.

``scope(name)`` opens a ``torch.profiler.record_function`` range while a profiler runs and is a
no-op otherwise; ``benchmarks/profile_step.py`` attributes kernels to model parts (ualm.embed /
attention / norm / swiglu / rope / head) and step phases by these names. It lives beside the
kernels because, like them, it is performance plumbing the model calls, not model structure.
"""
from __future__ import annotations

import contextlib

import torch


def scope(name: str):
    """A profiler range (``torch.profiler.record_function``) while a profiler is running, else a
    no-op context: ``benchmarks/profile_step.py`` attributes kernels to model parts by these."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
