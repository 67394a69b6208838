"""Fused output projection + cross entropy for the multi-stream head (vocab-parallel).

``head_cross_entropy(rows, weight, segments, targets, tp_group)`` computes, for row
segments that each project onto a column range of the (tensor-parallel shard of the) head
weight, the per-row cross entropy and argmax correctness -- the numbers megatron's
``vocab_parallel_cross_entropy`` gives -- without its float32 copies:

* forward: ``logits = rows @ W[c0:c1].T`` in the compute dtype (bf16); one pass reads the
  logits and produces each row's max, sum of exponentials (online softmax, float32) and the
  target logit; over tensor parallelism these are combined with one MAX and one SUM
  all-reduce; a second pass overwrites the logits *in place* with the gradient of the CE
  with respect to them, ``softmax - onehot(target)`` (0 on padding columns).
* backward: the upstream gradient ``g`` is one scalar per row, so the logits' gradient is
  ``diag(g) P`` and both products take P as saved:
  ``d rows = g * (P @ W)`` and ``d W = P^T @ (g * rows)`` (rows scaled before the product).

Compared with materialising logits, casting them to float32 and running megatron's CE
(about ten passes over a [tokens x 160k] tensor, three of them float32, plus float32 copies
kept for backward), this keeps one compute-dtype [tokens x V] tensor alive between forward
and backward and touches it three times. Numerically it matches: statistics in float32 from
the same compute-dtype logits, and the backward products see the same compute-dtype values
of ``softmax - onehot`` that the unfused path casts to before its matmuls (the per-row factor
``g`` is applied after the product / to the other operand, in float32).

On CUDA (``kernels.use_kernels``) the two passes are Triton kernels; elsewhere (CPU tests,
or the kernels switched off) the same math runs in PyTorch, in row chunks. The head that calls
it is ``megatron_ualm.model.head``. ``tests/test_model_fused_ce.py`` checks both against
megatron's CE.

Segments: ``(r0, r1, c0, c1, n_valid)``: rows ``[r0, r1)`` project onto local weight rows
(columns of the logits) ``[c0, c1)``, of which the first ``n_valid`` are real (the rest are
vocabulary padding: never predicted, no gradient). ``targets[r]``: the target's column
relative to ``c0``, or -1 when the target lives on another tensor-parallel rank. A segment
with ``c1 == c0`` (this rank holds none of its block) contributes nothing locally but still
joins the all-reduces.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from megatron_ualm import kernels
from megatron_ualm.kernels import HAVE_TRITON, tl, triton  # triton/tl: None without Triton

NEG_INF = float("-inf")


if HAVE_TRITON:
    _NEG_INF = tl.constexpr(float("-inf"))

    @triton.jit
    def _ce_stats_kernel(logits_ptr, stride_row, target_ptr, max_ptr, sum_ptr, picked_ptr, n_valid,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        m_vec = tl.full([BLOCK], _NEG_INF, tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_valid, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < n_valid, other=_NEG_INF).to(tl.float32)
            m_new = tl.maximum(m_vec, x)
            dead = m_new == _NEG_INF  # nothing finite seen yet in this lane: avoid inf - inf
            alpha = tl.where(dead, 0.0, tl.exp(m_vec - m_new))
            p = tl.where(dead, 0.0, tl.exp(x - m_new))
            s_vec = s_vec * alpha + p
            m_vec = m_new
        m = tl.max(m_vec, 0)
        scale = tl.where(m_vec == _NEG_INF, 0.0, tl.exp(m_vec - m))
        s = tl.sum(s_vec * scale, 0)
        t = tl.load(target_ptr + row)
        picked = tl.load(base + tl.maximum(t, 0)).to(tl.float32)
        picked = tl.where(t >= 0, picked, 0.0)
        tl.store(max_ptr + row, m)
        tl.store(sum_ptr + row, s)
        tl.store(picked_ptr + row, picked)

    @triton.jit
    def _ce_grad_kernel(logits_ptr, stride_row, target_ptr, lse_ptr, n_cols, n_valid, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        lse = tl.load(lse_ptr + row)
        t = tl.load(target_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(base + cols, mask=inside & (cols < n_valid), other=_NEG_INF).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(base + cols, p.to(logits_ptr.dtype.element_ty), mask=inside)


_STATS_BLOCK, _GRAD_BLOCK = 4096, 4096


def _use_triton(logits: Tensor) -> bool:
    return kernels.use_kernels(logits) and logits.stride(-1) == 1


# --- the two passes (public for tests) ------------------------------------------------------------
def ce_stats(logits: Tensor, targets: Tensor, n_valid: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``logits`` [n, c] over its first ``n_valid`` columns: (max, sum of
    exp(x - max), logit at column ``targets`` (0 where the target is -1)), float32 [n] each.
    A row with no valid column gives (-inf, 0, 0)."""
    n = logits.shape[0]
    if _use_triton(logits) and n > 0:
        out = torch.empty(3, n, dtype=torch.float32, device=logits.device)
        _ce_stats_kernel[(n,)](logits, logits.stride(0), targets, out[0], out[1], out[2], n_valid,
                               BLOCK=_STATS_BLOCK, num_warps=8)
        return out[0], out[1], out[2]
    return _ce_stats_torch(logits, targets, n_valid)


def ce_grad_(logits: Tensor, targets: Tensor, lse: Tensor, n_valid: int) -> Tensor:
    """Overwrite ``logits`` [n, c] with ``exp(x - lse) - onehot(targets)`` (0 beyond
    ``n_valid``); returns ``logits``."""
    n, c = logits.shape
    if _use_triton(logits) and n > 0 and c > 0:
        _ce_grad_kernel[(n,)](logits, logits.stride(0), targets, lse, c, n_valid, BLOCK=_GRAD_BLOCK, num_warps=8)
        return logits
    return _ce_grad_torch_(logits, targets, lse, n_valid)


_TORCH_CHUNK_ELEMENTS = 1 << 24  # rows per chunk of the PyTorch fallback: ~16M elements


def _row_chunks(n: int, c: int):
    step = max(1, _TORCH_CHUNK_ELEMENTS // max(c, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _ce_stats_torch(logits: Tensor, targets: Tensor, n_valid: int) -> tuple[Tensor, Tensor, Tensor]:
    n = logits.shape[0]
    dev = logits.device
    m = torch.full((n,), NEG_INF, dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    picked = torch.zeros(n, dtype=torch.float32, device=dev)
    if n_valid > 0:
        for a, b in _row_chunks(n, n_valid):
            x = logits[a:b, :n_valid].float()
            mx = x.max(dim=-1).values
            safe = torch.where(torch.isinf(mx) & (mx < 0), torch.zeros_like(mx), mx)
            m[a:b] = mx
            s[a:b] = torch.exp(x - safe[:, None]).sum(-1)
    has = targets >= 0
    col = torch.where(has, targets, torch.zeros_like(targets))
    if logits.shape[1] > 0:
        picked = torch.where(has, logits.gather(1, col[:, None].long())[:, 0].float(), picked)
    return m, s, picked


def _ce_grad_torch_(logits: Tensor, targets: Tensor, lse: Tensor, n_valid: int) -> Tensor:
    n, c = logits.shape
    for a, b in _row_chunks(n, c):
        x = logits[a:b].float()
        p = torch.exp(x - lse[a:b, None])
        if n_valid < c:
            p[:, max(n_valid, 0):] = 0.0
        t = targets[a:b]
        rows = torch.nonzero(t >= 0)[:, 0]
        p[rows, t[rows].long()] -= 1.0
        logits[a:b] = p.to(logits.dtype)
    return logits


# --- autograd function ------------------------------------------------------------------------------
def _combine_over_tp(m: Tensor, s: Tensor, picked: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Global (max, sum-exp relative to it, target logit) from every rank's partial ones."""
    global_m = m.clone()
    torch.distributed.all_reduce(global_m, op=torch.distributed.ReduceOp.MAX, group=group)
    alive = ~(torch.isinf(m) & (m < 0))
    rescale = torch.where(alive, torch.exp(torch.where(alive, m - global_m, torch.zeros_like(m))),
                          torch.zeros_like(m))
    both = torch.stack([s * rescale, picked])
    torch.distributed.all_reduce(both, group=group)
    return global_m, both[0], both[1]


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, segments: tuple, targets: Tensor, tp_group):
        n = rows.shape[0]
        dev = rows.device
        m = torch.full((n,), NEG_INF, dtype=torch.float32, device=dev)
        s = torch.zeros(n, dtype=torch.float32, device=dev)
        picked = torch.zeros(n, dtype=torch.float32, device=dev)
        probs = []
        for r0, r1, c0, c1, n_valid in segments:
            if r1 == r0 or c1 == c0:
                probs.append(None)
                continue
            logits = rows[r0:r1] @ weight[c0:c1].t()  # [r, c] compute dtype
            sm, ss, sp = ce_stats(logits, targets[r0:r1], n_valid)
            m[r0:r1], s[r0:r1], picked[r0:r1] = sm, ss, sp
            probs.append(logits)
        if tp_group is not None and tp_group.size() > 1:
            m, s, picked = _combine_over_tp(m, s, picked, tp_group)
        lse = torch.log(s) + m
        ce = lse - picked
        correct = picked >= m
        for (r0, r1, c0, c1, n_valid), logits in zip(segments, probs):
            if logits is not None:
                ce_grad_(logits, targets[r0:r1], lse[r0:r1], n_valid)  # logits -> softmax - onehot
        kept = [p for p in probs if p is not None]
        ctx.save_for_backward(rows, weight, *kept)
        ctx.segments = segments
        ctx.has_probs = [p is not None for p in probs]
        ctx.mark_non_differentiable(correct)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce: Tensor, _grad_correct):
        rows, weight, *kept = ctx.saved_tensors
        g = grad_ce.float()
        grad_rows = torch.zeros_like(rows) if ctx.needs_input_grad[0] else None
        grad_w = None
        probs = iter(kept)
        work = [(seg, next(probs)) for seg, has in zip(ctx.segments, ctx.has_probs) if has]
        # a segment over the whole weight first: its product *is* the weight gradient
        work.sort(key=lambda item: not (item[0][2] == 0 and item[0][3] == weight.shape[0]))
        for (r0, r1, c0, c1, _), p in work:
            gs = g[r0:r1, None]
            if grad_rows is not None:
                grad_rows[r0:r1] = (p @ weight[c0:c1]).float().mul_(gs).to(rows.dtype)
            if ctx.needs_input_grad[1]:
                scaled = (rows[r0:r1].float() * gs).to(p.dtype)
                if grad_w is None and c0 == 0 and c1 == weight.shape[0]:
                    grad_w = p.t() @ scaled
                else:
                    if grad_w is None:
                        grad_w = torch.zeros_like(weight)
                    grad_w[c0:c1].addmm_(p.t(), scaled)
        if ctx.needs_input_grad[1] and grad_w is None:
            grad_w = torch.zeros_like(weight)
        return grad_rows, grad_w, None, None, None


def head_cross_entropy(rows: Tensor, weight: Tensor, segments: Sequence[tuple], targets: Tensor,
                       tp_group=None) -> tuple[Tensor, Tensor]:
    """Cross entropy [N] (float32, differentiable in ``rows`` and ``weight``) and argmax
    correctness [N] (bool) of rows [N, H] projected by segment onto ``weight`` [V, H] columns.

    segments: ``(r0, r1, c0, c1, n_valid)`` tuples covering the rows (see the module
    docstring); targets: int64 [N], column relative to the segment's ``c0``, -1 if on another
    TP rank; tp_group: the vocabulary's tensor-parallel group (None or size 1: no reduction).
    """
    if rows.dtype != weight.dtype:
        raise TypeError(f"rows {rows.dtype} and weight {weight.dtype} must have one dtype")
    return _HeadCrossEntropy.apply(rows, weight, tuple(tuple(int(v) for v in s) for s in segments),
                                   targets.long().contiguous(), tp_group)
