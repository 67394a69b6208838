"""RoPE application kernels: megatron's unfused rotary embedding of q/k, one Triton kernel each way.

``rotate(t, freqs)`` is megatron's unfused RoPE in plain PyTorch (the reference);
``fused_rotate`` runs it on CUDA (``kernels.use_kernels``) as one Triton kernel each way
(``_RoPE``), each a single pass over t (or its gradient) and the output, with cos/sin computed
from the float32 angles in the kernel (once per position and column, shared by all heads) and
float32 math rounded once to t's dtype:

* forward: ``out1 = t1*cos1 - t2*sin1``, ``out2 = t2*cos2 + t1*sin2``;
* backward (w.r.t. t; the angles get no gradient): ``dt1 = g1*cos1 + g2*sin2``,
  ``dt2 = g2*cos2 - g1*sin1``;

where ``x1``/``x2`` are the first/second halves of the last dim and ``cos1 = cos(freqs[..., :d/2])``,
``cos2 = cos(freqs[..., d/2:])`` (likewise sin). The angles come from
``megatron_ualm.model.rope.RotaryAngles`` ([s, b, 1, head_dim], float32), and
``megatron_ualm.model.rope.install_fused_rope`` routes megatron's unfused RoPE through
``fused_rotate``. ``tests/test_model_rope_kernel.py`` checks the kernels against float64
autograd of ``rotate``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_ualm import kernels
from megatron_ualm.kernels import HAVE_TRITON, tl, triton  # triton/tl: None without Triton


def rotate(t: Tensor, freqs: Tensor) -> Tensor:
    """megatron's unfused RoPE (``_apply_rotary_pos_emb_bshd``: non-interleaved, mscale 1,
    rotary dim = head dim): ``t * cos + rotate_half(t) * sin`` with cos/sin cast to t's dtype.
    t [s, b, heads, d]; freqs [s, b or 1, 1, d] float32 angles."""
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    t1, t2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-t2, t1), dim=-1) * sin


if HAVE_TRITON:
    @triton.jit
    def _rope_kernel(x_ptr, f_ptr, out_ptr, n_pos, batch, half,
                     xs_s, xs_b, xs_h, fs_s, fs_b, HEADS: tl.constexpr,
                     BACKWARD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        # One program per BLOCK_P consecutive (s, b) positions (pos = s * batch + b), looping over
        # the heads BLOCK_H at a time. x [s, b, heads, 2 * half] with strides (xs_s, xs_b, xs_h, 1);
        # out contiguous, same shape; f [s, b or 1, 1, 2 * half] float32 with strides
        # (fs_s, fs_b, -, 1), fs_b = 0 broadcasts over b. cos/sin are computed once per
        # (position, column) and reused for every head. Tiles are [positions, heads, columns]:
        # Triton (3.x, sm_90) lays the threads along the contiguous columns (16-byte accesses) and
        # then along the positions, so each thread keeps the cos/sin of one position and 8 (bf16)
        # columns in registers for all heads; cos/sin themselves are computed in the angles' load
        # layout, each value once, and reach that layout through shared memory. int64 offsets:
        # s * b * heads * d may pass 2**31.
        pos = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # [P]
        cols = tl.arange(0, BLOCK_D)  # [D]
        s_idx = pos // batch
        b_idx = pos - s_idx * batch
        pos_in = pos < n_pos
        col_in = cols < half

        f_at = (s_idx * fs_s + b_idx * fs_b)[:, None] + cols[None, :]  # [P, D]
        f_mask = pos_in[:, None] & col_in[None, :]
        a1 = tl.load(f_ptr + f_at, mask=f_mask, other=0.0).to(tl.float32)  # angles of the first half
        a2 = tl.load(f_ptr + f_at + half, mask=f_mask, other=0.0).to(tl.float32)  # and of the second
        cos1 = tl.cos(a1)[:, None, :]  # [P, 1, D]
        sin1 = tl.sin(a1)[:, None, :]
        cos2 = tl.cos(a2)[:, None, :]
        sin2 = tl.sin(a2)[:, None, :]

        x_base = (s_idx * xs_s + b_idx * xs_b)[:, None, None] + cols[None, None, :]  # [P, 1, D]
        o_base = (pos * HEADS)[:, None, None]
        pc_mask = pos_in[:, None, None] & col_in[None, None, :]
        for h0 in range(0, HEADS, BLOCK_H):  # HEADS constexpr: one variant per head count (q, k)
            hh = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]  # [1, H, 1]
            mask = pc_mask & (hh < HEADS)
            x_at = x_base + hh * xs_h
            x1 = tl.load(x_ptr + x_at, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + x_at + half, mask=mask, other=0.0).to(tl.float32)
            if BACKWARD:  # x is the output's gradient; the result is t's
                y1 = x1 * cos1 + x2 * sin2
                y2 = x2 * cos2 - x1 * sin1
            else:
                y1 = x1 * cos1 - x2 * sin1
                y2 = x2 * cos2 + x1 * sin2
            o_at = (o_base + hh) * (2 * half) + cols[None, None, :]
            tl.store(out_ptr + o_at, y1.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptr + o_at + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


# A program: NUM_WARPS warps over [positions, columns], 16 positions at d = 128 in bf16 (8 in
# float32); HEADS_PER_STEP heads per loop step (4: 4 heads x 2 halves x 16 bytes in flight per
# thread; ptxas for sm_90: 96 registers in bf16, no spills).
NUM_WARPS = 4
HEADS_PER_STEP = 4


def fusable(t: Tensor, freqs: Tensor) -> bool:
    """Whether the kernels take (t, freqs): t [s, b, heads, d] (d even) in bf16/fp16/fp32, freqs
    float32 [s, b or 1, 1, d] on t's device without a gradient. Anything else is ``rotate``'s."""
    return (t.dim() == 4 and freqs.dim() == 4 and t.shape[-1] % 2 == 0
            and freqs.shape[-1] == t.shape[-1] and freqs.shape[0] == t.shape[0]
            and freqs.shape[1] in (1, t.shape[1]) and freqs.shape[2] == 1
            and t.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and freqs.dtype == torch.float32 and freqs.device == t.device and not freqs.requires_grad)


def _launch(x: Tensor, freqs: Tensor, backward: bool, num_warps: int = NUM_WARPS, check: bool = True) -> Tensor:
    """One launch of the kernel over x [s, b, heads, d] (t forward, the output's gradient backward);
    ``check=False`` skips the input check where the caller has made it (host time per call)."""
    if check and not fusable(x, freqs):
        raise ValueError(f"rope kernel needs t [s, b, heads, d] (d even, bf16/fp16/fp32) and float32 freqs "
                         f"[s, b or 1, 1, d] on t's device without a gradient; got {tuple(x.shape)} {x.dtype} "
                         f"and {tuple(freqs.shape)} {freqs.dtype} requires_grad={freqs.requires_grad}")
    xs = x.stride()
    if xs[-1] != 1:  # other strides are kernel arguments (q and k are views of the fused QKV output)
        x = x.contiguous()
        xs = x.stride()
    if freqs.stride(-1) != 1:
        freqs = freqs.contiguous()
    s, b, heads, d = x.shape
    out = torch.empty((s, b, heads, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    half = d // 2
    block_d = triton.next_power_of_2(half)
    vec = min(block_d, 16 // x.element_size())  # 16-byte accesses per thread
    block_p = max(1, 32 * num_warps * vec // block_d)  # the warps' threads cover [positions, columns]
    block_h = min(HEADS_PER_STEP, triton.next_power_of_2(heads))
    fs_b = freqs.stride(1) if freqs.shape[1] != 1 else 0
    grid = (triton.cdiv(s * b, block_p),)
    _rope_kernel[grid](x, freqs, out, s * b, b, half,
                       xs[0], xs[1], xs[2], freqs.stride(0), fs_b, HEADS=heads,
                       BACKWARD=backward, BLOCK_P=block_p, BLOCK_H=block_h, BLOCK_D=block_d,
                       num_warps=num_warps)
    return out


def rope_forward(t: Tensor, freqs: Tensor, num_warps: int = NUM_WARPS) -> Tensor:
    """The forward kernel: ``rotate(t, freqs)`` as a contiguous tensor in t's dtype (t may be a
    strided view with unit stride in the last dim)."""
    return _launch(t, freqs, False, num_warps)


def rope_backward(grad: Tensor, freqs: Tensor, num_warps: int = NUM_WARPS) -> Tensor:
    """The backward kernel: the gradient w.r.t. t from the output's gradient ``grad``."""
    return _launch(grad, freqs, True, num_warps)


class _RoPE(torch.autograd.Function):
    """``rotate`` by the kernels; keeps only freqs for backward (t is not needed)."""

    @staticmethod
    def forward(ctx, t: Tensor, freqs: Tensor) -> Tensor:
        ctx.save_for_backward(freqs)
        return _launch(t, freqs, False, check=False)  # fused_rotate checked the inputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (freqs,) = ctx.saved_tensors
        return _launch(grad, freqs, True, check=False), None  # grad: out's shape and dtype


def fused_rotate(t: Tensor, freqs: Tensor) -> Tensor:
    """``rotate(t, freqs)``: the Triton kernels for CUDA tensors in the plain case (``fusable``),
    ``rotate`` itself else (CPU, no Triton, kernels switched off, broadcast seq dim, other dtypes)."""
    if kernels.use_kernels(t) and fusable(t, freqs):
        return _RoPE.apply(t, freqs)
    return rotate(t, freqs)
