"""RMSNorm kernels: Qwen2's ``weight * (x / sqrt(mean(x^2) + eps))``, float32 statistics, cast
back to the input dtype before the weight is applied.

On CUDA (``kernels.use_kernels``) the norm runs as two Triton kernels, one each way, in an
autograd Function that keeps only the input and the per-row ``1/rms`` for backward; float32
math with one rounding per output. The forward kernel handles one row per program; the
backward kernel walks a block of rows per program, writing dx and a float32 partial sum of
the weight gradient that one reduction finishes. A Function with a kernel launch costs the
host far less time than a ``torch.compile``d call (guards, AOTAutograd and Inductor
wrappers: ~0.3 ms each, 57 norms per forward), which kept the GPU waiting in the forward.
Elsewhere (CPU, or the switch off) it is the eager ``rms_norm``. ``tests/test_model_norm_kernel.py``
checks the kernels against float64 autograd of ``rms_norm``. The megatron module around it
(sequence parallelism) is ``megatron_ualm.model.norm.RMSNorm``.
"""
from __future__ import annotations

import torch

from megatron_ualm import kernels
from megatron_ualm.kernels import HAVE_TRITON, tl, triton  # triton/tl: None without Triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: float32 statistics, cast back to x's dtype, then the weight."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


if HAVE_TRITON:
    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
        xhat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # Qwen2: cast back, then the weight
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, N, H,
                             ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < H
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        first = program.to(tl.int64) * ROWS_PER_PROGRAM
        for i in range(0, ROWS_PER_PROGRAM):
            row = first + i
            if row < N:
                x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                xhat = x * rstd
                dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
                g = dy * w  # gradient at the rounded xhat; the cast passes it through
                dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / H))
                tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        tl.store(dw_partial_ptr + program.to(tl.int64) * H + cols, dw, mask=inside)


def _block(hidden: int) -> tuple[int, int]:
    block = triton.next_power_of_2(hidden)
    return block, max(1, min(16, block // 256))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel on CUDA: (y, rstd) for x [..., H] (y in x and weight's promoted dtype,
    rstd float32 [rows])."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"RMSNorm weight {tuple(weight.shape)} does not match the input's last dim {hidden}")
    x2 = x.reshape(-1, hidden)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _block(hidden)
        _rms_norm_fwd_kernel[(rows,)](x2, weight, y, rstd, hidden, eps, BLOCK=block, num_warps=warps)
    return y.view(x.shape), rstd


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel on CUDA: (dx in x's dtype, dweight in weight's dtype)."""
    hidden = x.shape[-1]
    x2, dy2 = x.reshape(-1, hidden), dy.reshape(-1, hidden)
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    dy2 = dy2 if dy2.is_contiguous() else dy2.contiguous()
    rows = x2.shape[0]
    dx = torch.empty_like(x2)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    # rows per program: a power of two (few compiled variants) giving about 4 programs per SM
    per_program = triton.next_power_of_2(triton.cdiv(rows, 4 * sms)) if rows else 1
    programs = max(1, triton.cdiv(rows, per_program))
    partial = torch.empty(programs, hidden, dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _block(hidden)
        _rms_norm_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, partial, rows, hidden,
                                          ROWS_PER_PROGRAM=per_program, BLOCK=block, num_warps=warps)
    else:
        partial.zero_()
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(x, weight, rstd, dy)
        return dx, dw, None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` through the Triton kernels for CUDA tensors (``kernels.use_kernels``), the
    eager function elsewhere."""
    if kernels.use_kernels(x):
        return _RMSNormFunction.apply(x, weight, eps)
    return rms_norm(x, weight, eps)
