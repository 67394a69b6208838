"""The FP8 cast kernel and the scaled FP8 GEMM call (used by ``megatron_ualm.model.fp8``).

Per-tensor scaling: ``q = saturate(x * s)`` with ``s = fp8_max / amax / 2**margin``, and the
GEMM de-scales with ``1 / s``. ``cast`` takes the scale from a list of past amax values
(delayed scaling's history, or a tensor's own amax for current scaling); on CUDA
(``kernels.use_kernels``) it is one Triton kernel that reads x once, writes the FP8 tensor once
and folds this call's amax into the "current" slot with an atomic max (3 bytes moved per bf16
element). Values above the scaled range saturate at fp8_max instead of overflowing. Elsewhere
(CPU, or the kernels switched off) it is ``cast_reference``, the same math in plain PyTorch.
``cast_transpose`` also writes the FP8 tensor's transpose from the same tiles (a weight and the
input gradient's operand, in one pass); ``seed`` fills an empty amax history from x's own amax
and does nothing otherwise, deciding on the GPU (graph-safe).

``scaled_mm`` is PyTorch's FP8 GEMM (``torch._scaled_mm``, Hopper tensor cores) on CUDA and a
de-scaled float32 emulation elsewhere: the emulation exists because CPUs have no FP8 GEMM (the
trainer refuses ``training.fp8`` without an FP8-capable GPU; on CPU it is for checking the math).
It is not a kernel of ours and the switch leaves it alone: ``training.fp8`` is what chooses it.
The recipes, the per-layer amax state and the autograd Function live in ``model/fp8.py``.
"""
from __future__ import annotations

import math
from typing import Optional

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

    @triton.jit
    def _seed_kernel(x_ptr, past_ptr, n, H: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
        # history empty (all zero): fold max|x| into its slot 0; else nothing (no pass over x)
        hs = tl.arange(0, HP)
        past = tl.max(tl.load(past_ptr + hs, mask=hs < H, other=0.0), axis=0)
        todo = tl.where(past > 0.0, 0, n)
        pid = tl.program_id(0)
        local = tl.zeros([BLOCK], dtype=tl.float32)
        for blk in range(pid, tl.cdiv(todo, BLOCK), tl.num_programs(0)):
            offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < todo, other=0.0).to(tl.float32)
            local = tl.maximum(local, tl.abs(x))
        tl.atomic_max(past_ptr, tl.max(local, axis=0))


    @triton.jit
    def _cast_transpose_kernel(x_ptr, out_ptr, out_t_ptr, past_ptr, amax_ptr, inv_ptr, M, N, fp8_max, margin_mult,
                               H: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        # the cast of a [M, N] tile grid, written as [M, N] and transposed as [N, M]
        hs = tl.arange(0, HP)
        past = tl.max(tl.load(past_ptr + hs, mask=hs < H, other=0.0), axis=0)
        ok = (past > 0.0) & (past < float("inf"))
        scale = tl.where(ok, tl.math.div_rn(fp8_max, tl.where(ok, past, 1.0)) * margin_mult, 1.0)
        pm, pn = tl.program_id(0), tl.program_id(1)
        if (pm == 0) & (pn == 0):
            tl.store(inv_ptr, tl.math.div_rn(1.0, scale))
        rows = tl.cast(pm, tl.int64) * BM + tl.arange(0, BM)
        cols = tl.cast(pn, tl.int64) * BN + tl.arange(0, BN)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * scale, -fp8_max), fp8_max).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], y, mask=inside)
        tl.store(out_t_ptr + cols[:, None] * M + rows[None, :], tl.trans(y), mask=tl.trans(inside))
        tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))


BLOCK, NUM_WARPS, PROGRAMS_PER_SM = 2048, 8, 4
TILE = 128  # cast-transpose tile (rows and columns)


def _programs(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_SM


def cast_reference(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype,
                   margin: int = MARGIN, out: Optional[Tensor] = None,
                   inv: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """What the kernel does, in PyTorch: (FP8 tensor, float32 [1] de-scale ``1 / scale``)
    with scale from ``max(past)``; ``amax_out`` (float32 [1]) becomes max(amax_out, max|x|).
    ``out`` / ``inv``: tensors to write the two results into (else new ones)."""
    scale = scale_from_amax(past.max().reshape(1), FP8_MAX[dtype], margin)
    q = quantize(x, scale, dtype)
    amax_out.copy_(torch.maximum(amax_out, amax_of(x).reshape(1)))
    if out is not None:
        q = out.copy_(q)
    return q, (torch.reciprocal(scale) if inv is None else torch.reciprocal(scale, out=inv))


def cast_kernel(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype,
                margin: int = MARGIN, out: Optional[Tensor] = None,
                inv: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel (CUDA): same contract as ``cast_reference``."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device) if out is None else out
    inv = torch.empty(1, dtype=torch.float32, device=x.device) if inv is None else inv
    n = x.numel()
    h = past.numel()
    grid = (max(1, min(triton.cdiv(n, BLOCK), _programs(x.device))),)
    _cast_kernel[grid](x, out, past, amax_out, inv, n, FP8_MAX[dtype], 2.0 ** -margin,
                       H=h, HP=max(16, triton.next_power_of_2(h)), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out, inv


def cast(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype, out: Optional[Tensor] = None,
         inv: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel for CUDA tensors (``kernels.use_kernels``), ``cast_reference`` elsewhere."""
    if kernels.use_kernels(x):
        return cast_kernel(x, past, amax_out, dtype, out=out, inv=inv)
    return cast_reference(x, past, amax_out, dtype, out=out, inv=inv)


def cast_transpose_kernel(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype, out: Tensor,
                          out_t: Tensor, inv: Tensor, margin: int = MARGIN) -> None:
    """The Triton cast of a 2-D x into ``out`` [M, N] and ``out_t`` [N, M] (its transpose),
    in one pass; otherwise the contract of ``cast_kernel``."""
    x = x.contiguous()
    m, n = x.shape
    h = past.numel()
    grid = (triton.cdiv(m, TILE), triton.cdiv(n, TILE))
    _cast_transpose_kernel[grid](x, out, out_t, past, amax_out, inv, m, n, FP8_MAX[dtype], 2.0 ** -margin,
                                 H=h, HP=max(16, triton.next_power_of_2(h)), BM=TILE, BN=TILE, num_warps=8)


def cast_transpose(x: Tensor, past: Tensor, amax_out: Tensor, dtype: torch.dtype, out: Tensor, out_t: Tensor,
                   inv: Tensor) -> None:
    """``cast`` of a 2-D x into ``out`` and its transpose into ``out_t``: one Triton kernel for
    CUDA tensors (``kernels.use_kernels``), ``cast_reference`` and a byte copy elsewhere."""
    if kernels.use_kernels(x):
        cast_transpose_kernel(x, past, amax_out, dtype, out, out_t, inv)
    else:
        cast_reference(x, past, amax_out, dtype, out=out, inv=inv)
        out_t.view(torch.uint8).copy_(out.view(torch.uint8).t())


def seed_reference(x: Tensor, past: Tensor) -> None:
    """What the seed kernel does, in PyTorch: a history ``past`` that is all zero gets max|x| in
    its slot 0; any other history is left as it is. No host synchronisation."""
    past[:1].copy_(torch.where(past.max() > 0, past[:1], amax_of(x).reshape(1)))


def seed_kernel(x: Tensor, past: Tensor) -> None:
    """The Triton seed kernel (CUDA): same contract as ``seed_reference``; ``past`` contiguous."""
    x = x.contiguous()
    n, h = x.numel(), past.numel()
    grid = (max(1, min(triton.cdiv(n, BLOCK), _programs(x.device))),)
    _seed_kernel[grid](x, past, n, H=h, HP=max(16, triton.next_power_of_2(h)), BLOCK=BLOCK, num_warps=NUM_WARPS)


def seed(x: Tensor, past: Tensor) -> None:
    """``seed_kernel`` for CUDA tensors (``kernels.use_kernels``), ``seed_reference`` elsewhere."""
    if kernels.use_kernels(x):
        seed_kernel(x, past)
    else:
        seed_reference(x, past)


# --- the FP8 GEMM --------------------------------------------------------------------------------
def scaled_mm(a: Tensor, b: Tensor, a_inv: Tensor, b_inv: Tensor, out_dtype: torch.dtype,
              fast_accum: bool = False) -> Tensor:
    """``(a * a_inv) @ (b * b_inv)`` for FP8 a [M, K] (row-major) and b [K, N] (column-major):
    ``torch._scaled_mm`` on CUDA, a float32 emulation elsewhere."""
    if a.is_cuda:
        return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a.float() * a_inv) @ (b.float() * b_inv)).to(out_dtype)
