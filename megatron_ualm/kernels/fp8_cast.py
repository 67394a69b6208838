"""The FP8 cast kernel and the scaled FP8 GEMM call (used by ``megatron_ualm.model.fp8``).

Per-tensor scaling: ``q = saturate(x * s)`` with ``s = fp8_max / amax / 2**margin``, and the
GEMM de-scales with ``1 / s``. ``cast`` takes the scale from a list of past amax values
(delayed scaling's history, or a tensor's own amax for current scaling); on CUDA
(``kernels.use_kernels``) it is one Triton kernel that reads x once, writes the FP8 tensor once
and folds this call's amax into the "current" slot with an atomic max (3 bytes moved per bf16
element). Values above the scaled range saturate at fp8_max instead of overflowing. Elsewhere
(CPU, or the kernels switched off) it is ``cast_reference``, the same math in plain PyTorch.

``scaled_mm`` is PyTorch's FP8 GEMM (``torch._scaled_mm``, Hopper tensor cores) on CUDA and a
de-scaled float32 emulation elsewhere: the emulation exists because CPUs have no FP8 GEMM (the
trainer refuses ``training.fp8`` without an FP8-capable GPU; on CPU it is for checking the math).
It is not a kernel of ours and the switch leaves it alone: ``training.fp8`` is what chooses it.
The recipes, the per-layer amax state and the autograd Function live in ``model/fp8.py``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from megatron_ualm import kernels
from megatron_ualm.kernels import HAVE_TRITON, tl, triton  # None without Triton

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: float(torch.finfo(E4M3).max), E5M2: float(torch.finfo(E5M2).max)}  # 448, 57344
MANTISSA_BITS = {E4M3: 3, E5M2: 2}
MARGIN = 0            # scale = fp8_max / amax / 2**MARGIN


# --- scaling math (pure functions) -----------------------------------------------------------
def scale_from_amax(amax: Tensor, fp8_max: float, margin: int = MARGIN) -> Tensor:
    """float32 scale ``fp8_max / amax / 2**margin`` (``q = x * scale`` fits the FP8 range);
    1 where amax is 0 or not finite (nothing to scale from)."""
    amax = amax.float()
    scale = torch.full_like(amax, fp8_max) / amax * (2.0 ** -margin)
    return torch.where((amax > 0) & torch.isfinite(amax), scale, torch.ones_like(scale))


def quantize(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``saturate(x * scale)`` in FP8: float32 product, clamped to +-fp8_max (no inf), rounded
    to nearest even by the cast."""
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def amax_of(x: Tensor) -> Tensor:
    """max |x| as a float32 scalar tensor (one read of x)."""
    return torch.linalg.vector_norm(x, ord=math.inf, dtype=torch.float32) if x.numel() else x.new_zeros((), dtype=torch.float32)


# --- the fused cast ----------------------------------------------------------------------------
if HAVE_TRITON:
    @triton.jit
    def _cast_kernel(x_ptr, out_ptr, past_ptr, amax_ptr, inv_ptr, n, fp8_max, margin_mult,
                     H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
        # scale from the past amax values (every program computes the same one)
        hs = tl.arange(0, HP)
        past = tl.max(tl.load(past_ptr + hs, mask=hs < H, other=0.0), axis=0)
        ok = (past > 0.0) & (past < float("inf"))
        scale = tl.where(ok, tl.math.div_rn(fp8_max, tl.where(ok, past, 1.0)) * margin_mult, 1.0)
        pid = tl.program_id(0)
        if pid == 0:
            tl.store(inv_ptr, tl.math.div_rn(1.0, scale))
        # grid-stride loop: few programs, so few atomics on the one amax address
        local = tl.zeros([BLOCK], dtype=tl.float32)
        for blk in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
            offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            y = tl.minimum(tl.maximum(x * scale, -fp8_max), fp8_max)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)
            local = tl.maximum(local, tl.abs(x))
        tl.atomic_max(amax_ptr, tl.max(local, axis=0))


BLOCK, NUM_WARPS, PROGRAMS_PER_SM = 2048, 8, 4


def _programs(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM


def cast_reference(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype,
                   margin: int = MARGIN) -> tuple[Tensor, Tensor]:
    """What the kernel does, in PyTorch: (FP8 tensor, float32 [1] de-scale ``1 / scale``)
    with scale from ``max(past)``; ``amax_out`` (float32 [1]) becomes max(amax_out, max|x|)."""
    scale = scale_from_amax(past.max().reshape(1), FP8_MAX[dtype], margin)
    q = quantize(x, scale, dtype)
    amax_out.copy_(torch.maximum(amax_out, amax_of(x).reshape(1)))
    return q, torch.reciprocal(scale)


def cast_kernel(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype,
                margin: int = MARGIN) -> tuple[Tensor, Tensor]:
    """The Triton kernel (CUDA): same contract as ``cast_reference``; x contiguous."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    inv = torch.empty(1, dtype=torch.float32, device=x.device)
    n = x.numel()
    h = past.numel()
    grid = (max(1, min(triton.cdiv(n, BLOCK), _programs(x.device))),)
    _cast_kernel[grid](x, out, past, amax_out, inv, n, FP8_MAX[dtype], 2.0 ** -margin,
                       H=h, HP=max(16, triton.next_power_of_2(h)), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, inv


def cast(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The Triton kernel for CUDA tensors (``kernels.use_kernels``), ``cast_reference`` elsewhere."""
    if kernels.use_kernels(x):
        return cast_kernel(x, past, amax_out, dtype)
    return cast_reference(x, past, amax_out, dtype)


# --- the FP8 GEMM --------------------------------------------------------------------------------
def scaled_mm(a: Tensor, b: Tensor, a_inv: Tensor, b_inv: Tensor, out_dtype: torch.dtype,
              fast_accum: bool = False) -> Tensor:
    """``(a * a_inv) @ (b * b_inv)`` for FP8 a [M, K] (row-major) and b [K, N] (column-major):
    ``torch._scaled_mm`` on CUDA, a float32 emulation elsewhere."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a.float() * a_inv) @ (b.float() * b_inv)).to(out_dtype)
