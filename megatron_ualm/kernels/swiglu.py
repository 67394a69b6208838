"""SwiGLU, ``SiLU(gate) * up`` for fc1's output [..., 2F] laid out as [gate; up].

``fused_swiglu(y)`` runs two Triton kernels on CUDA, one each way, each a single pass over
its tensors at the memory bandwidth:

* forward: reads y [N, 2F] (leading dims as N rows), writes out [N, F];
* backward: reads y and dout [N, F], writes dy [N, 2F] with
  ``s = sigmoid(g)``, ``dg = dout * u * s * (1 + g * (1 - s))``, ``du = dout * g * s``.

Math is float32 with one rounding to y's dtype per output element; backward keeps y only.
Elsewhere (CPU, no Triton, or the kernels switched off: ``kernels.use_kernels``) it is
``swiglu_reference``, the plain PyTorch definition. The MLP that calls it is
``megatron_ualm.model.layer_spec.SwiGLUMLP``.
``tests/test_model_swiglu.py`` checks the kernels against a float64 reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_ualm import kernels
from megatron_ualm.kernels import HAVE_TRITON, tl, triton  # triton/tl: None without Triton


def swiglu_reference(y: Tensor) -> Tensor:
    """SiLU(gate) * up for fc1's output [..., 2F] laid out as [gate; up]."""
    gate, up = torch.chunk(y, 2, dim=-1)
    return F.silu(gate) * up


if HAVE_TRITON:
    @triton.jit
    def _swiglu_fwd_kernel(y_ptr, out_ptr, half, BLOCK: tl.constexpr):
        # grid (rows, blocks of the F = half columns); int64 row offsets: N * 2F may pass 2**31
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < half
        gate_ptr = y_ptr + row * (2 * half) + cols
        g = tl.load(gate_ptr, mask=inside).to(tl.float32)
        u = tl.load(gate_ptr + half, mask=inside).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * half + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_bwd_kernel(y_ptr, dout_ptr, dy_ptr, half, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < half
        at = row * (2 * half) + cols
        g = tl.load(y_ptr + at, mask=inside).to(tl.float32)
        u = tl.load(y_ptr + at + half, mask=inside).to(tl.float32)
        d = tl.load(dout_ptr + row * half + cols, mask=inside).to(tl.float32)
        s = tl.sigmoid(g)
        ds = d * s
        dg = ds * u * (1.0 + g * (1.0 - s))
        du = ds * g
        tl.store(dy_ptr + at, dg.to(dy_ptr.dtype.element_ty), mask=inside)
        tl.store(dy_ptr + at + half, du.to(dy_ptr.dtype.element_ty), mask=inside)


BLOCK, NUM_WARPS = 1024, 4  # elements of F per program: 16-byte accesses per thread in bf16


def _launch(y: Tensor, block: int, num_warps: int) -> tuple[int, int, tuple[int, int], dict]:
    """(rows, F, grid, launch options) for y [..., 2F] contiguous."""
    width = y.shape[-1]
    if width % 2:
        raise ValueError(f"swiglu needs an even last dim ([gate; up]); got shape {tuple(y.shape)}")
    half, rows = width // 2, y.numel() // max(width, 1)
    block = min(block, triton.next_power_of_2(max(half, 1)))
    opts = dict(BLOCK=block, num_warps=max(1, min(num_warps, block // 32)))
    return rows, half, (rows, triton.cdiv(half, block)), opts


def swiglu_forward(y: Tensor, block: int = BLOCK, num_warps: int = NUM_WARPS) -> Tensor:
    """The forward kernel: ``SiLU(gate) * up`` [..., F] in y's dtype, y [..., 2F] on CUDA."""
    y = y.contiguous()
    rows, half, grid, opts = _launch(y, block, num_warps)
    out = torch.empty(*y.shape[:-1], half, dtype=y.dtype, device=y.device)
    if rows and half:
        _swiglu_fwd_kernel[grid](y, out, half, **opts)
    return out


def swiglu_backward(y: Tensor, dout: Tensor, block: int = BLOCK, num_warps: int = NUM_WARPS) -> Tensor:
    """The backward kernel: dy [..., 2F] in y's dtype from y [..., 2F] and dout [..., F]."""
    y, dout = y.contiguous(), dout.contiguous()
    rows, half, grid, opts = _launch(y, block, num_warps)
    if dout.shape != (*y.shape[:-1], half):
        raise ValueError(f"dout shape {tuple(dout.shape)} does not match y {tuple(y.shape)} (expected last dim {half})")
    dy = torch.empty_like(y)
    if rows and half:
        _swiglu_bwd_kernel[grid](y, dout, dy, half, **opts)
    return dy


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        y = y.contiguous()
        ctx.save_for_backward(y)
        return swiglu_forward(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return swiglu_backward(y, dout)


def fused_swiglu(y: Tensor) -> Tensor:
    """SwiGLU of y [..., 2F]: the Triton kernels for CUDA tensors (``kernels.use_kernels``),
    ``swiglu_reference`` else."""
    if kernels.use_kernels(y):
        return _SwiGLU.apply(y)
    return swiglu_reference(y)
