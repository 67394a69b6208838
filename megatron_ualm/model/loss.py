"""The UALM training loss from the model's per-position cross entropy (SPEC section 5).

    total = sum_{b,s,k} w[b,s,k] * CE[b,s,k]  /  #{(b,s): w[b,s,0] > 0}

Weights come from the batch (1 on stream 0 of text targets, 1/K on every stream of audio
targets, 0 elsewhere), so one audio frame weighs like one text token. The denominator is
the number of stream-0 target positions, counted over whatever is being averaged: for a
global batch split over micro-batches and data-parallel ranks, sum the numerators and the
denominators separately (``loss_sums``) and divide once (``calculate_per_token_loss`` in
megatron's schedules does exactly this with ``(numerator, denominator)`` pairs).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def loss_sums(ce: Tensor, loss_weights: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of w * CE, number of stream-0 target positions) for one micro-batch.

    ce, loss_weights: [B, S, K]. Returns two float32 scalars; the first is differentiable.
    """
    weights = loss_weights.float()
    numerator = (ce.float() * weights).sum()
    denominator = (weights[..., 0] > 0).sum().float()
    return numerator, denominator


def ualm_loss(ce: Tensor, loss_weights: Tensor) -> Tensor:
    """Mean loss of one micro-batch: sum(w * CE) / max(1, #stream-0 targets)."""
    numerator, denominator = loss_sums(ce, loss_weights)
    return numerator / denominator.clamp(min=1.0)


def loss_metrics(ce: Tensor, correct: Tensor, loss_weights: Tensor,
                 task_ids: Optional[Tensor] = None, num_tasks: Optional[int] = None) -> dict[str, Tensor]:
    """Detached numbers for logging (sums, so they add over micro-batches and ranks).

    Returns float32 scalars: ``text_ce_sum``/``text_count``/``text_correct`` over stream-0
    targets with weight 1 (text), ``audio_ce_sum``/``audio_count``/``audio_correct`` over
    every stream of audio targets (weight < 1), and per task ``task{t}_loss_sum`` /
    ``task{t}_count`` when ``task_ids`` [B, S] is given: for every t < ``num_tasks`` (no
    host sync), or for the tasks present (one sync to find them) when it is None.
    """
    with torch.no_grad():
        w = loss_weights.float()
        ce = ce.detach().float()
        zero = ce.new_zeros(())
        text = w[..., 0] >= 1.0
        audio = (w > 0) & (w < 1.0)
        # masked sums, not boolean indexing: indexing asks the device for the count (a host sync)
        out = {
            "text_ce_sum": torch.where(text, ce[..., 0], zero).sum(),
            "text_count": text.sum().float(),
            "text_correct": (correct[..., 0] & text).sum().float(),
            "audio_ce_sum": torch.where(audio, ce, zero).sum(),
            "audio_count": audio.sum().float(),
            "audio_correct": (correct & audio).sum().float(),
        }
        if task_ids is not None:
            per_pos = (ce * w).sum(-1).flatten()
            counted = (w[..., 0] > 0).flatten().float()
            ids = task_ids.flatten().long()
            if num_tasks is None:
                present = torch.unique(ids[ids >= 0]).tolist()  # host sync
            else:
                present = range(num_tasks)
            n = max(present, default=-1) + 1
            slot = torch.where(ids >= 0, ids, n)  # -1 (no task) goes to a spare slot
            loss = per_pos.new_zeros(n + 1).index_add_(0, slot, per_pos)
            count = per_pos.new_zeros(n + 1).index_add_(0, slot, counted)
            for t in present:
                out[f"task{t}_loss_sum"] = loss[t]
                out[f"task{t}_count"] = count[t]
        return out
