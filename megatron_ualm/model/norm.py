"""RMSNorm that works inside megatron's sequence-parallel region.

Megatron's local (non-TransformerEngine) spec wraps ``torch.nn.RMSNorm`` and refuses
sequence parallelism: under SP every tensor-parallel rank normalises a different slice of
the sequence, so the gradient of the (replicated) norm weight is a partial sum that must be
all-reduced over the TP group. Megatron's gradient finalisation does exactly that for every
parameter that carries ``sequence_parallel = True``; this norm sets that attribute.

The math is Qwen2's: ``weight * (x / sqrt(mean(x^2) + eps))`` computed in float32 and cast
back to the input dtype before the weight is applied. It runs as ``kernels.rmsnorm.fused_rms_norm``:
Triton kernels on CUDA, the eager ``rms_norm`` elsewhere or with the kernels switched off.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_ualm.kernels.profiling import scope
from megatron_ualm.kernels.rmsnorm import fused_rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    Constructed by megatron's ``build_module`` with ``config``, ``hidden_size`` and ``eps``
    (extra keyword arguments megatron may pass, e.g. ``persist_layer_norm``, are ignored).

    x: [..., hidden_size] -> [..., hidden_size], same dtype.
    """

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_unused):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"RMSNorm needs a positive hidden_size, got {hidden_size}")
        self.eps = eps
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        # Read by megatron's finalize_model_grads: all-reduce this grad over TP under SP.
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with scope("ualm.norm"):
            return fused_rms_norm(x, self.weight, self.eps)
