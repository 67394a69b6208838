"""DPO for text-to-audio (SPEC section 9): the per-pair loss, its logged numbers, and
scoring the frozen reference once so that training holds one model.

Per pair, with policy pi, reference pi_ref and beta > 0:

    loss = -log sigmoid(beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))])
           + sft_weight * (ordinary loss of the chosen example: sum w*CE / its stream-0 targets)

log pi(x) = -sum over x's audio target rows and all K streams of w * CE, with the layout's
weights w (1/K per stream of an audio row, SPEC section 5). The loss is averaged over the
pairs of the global batch: each micro-batch gives (sum over its pairs, number of pairs), and
megatron's per-token normalisation (``calculate_per_token_loss``) divides once by the pairs
of all micro-batches and data-parallel ranks, exactly as it does with targets for the LM loss.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F

from megatron_ualm.training.checkpoint_files import read_manifest, resolve_checkpoint

# Sums of one iteration (dense so every rank all-reduces the same vector).
DPO_KEYS = ("loss_sum", "pairs", "margin_sum", "correct", "chosen_ratio_sum", "rejected_ratio_sum",
            "sft_sum", "chosen_logp_sum", "rejected_logp_sum")


def sequence_logps(ce: torch.Tensor, weights: torch.Tensor, document_ids: torch.Tensor,
                   num_documents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per packed document of each row: (log pi over audio targets, sum w*CE over all
    targets, stream-0 targets), each [B, num_documents] float32; the first two differentiable.

    ce, weights: [B, S, K]; document_ids: [B, S] (-1 pad). Audio target rows are those whose
    stream-0 weight lies strictly between 0 and 1 (text targets weigh 1)."""
    w = weights.float()
    per_row = ce.float() * w                               # [B, S, K]
    audio = ((w[..., 0] > 0) & (w[..., 0] < 1)).float()   # [B, S]
    row_all = per_row.sum(-1)
    row_audio = row_all * audio
    counted = (w[..., 0] > 0).float()
    B = ce.shape[0]
    slot = torch.where(document_ids >= 0, document_ids.long(), num_documents)  # pads to a spare slot
    out = []
    for values in (row_audio, row_all, counted):
        acc = values.new_zeros(B, num_documents + 1).scatter_add(1, slot, values)
        out.append(acc[:, :num_documents])
    return -out[0], out[1], out[2]


def pair_losses(logps: torch.Tensor, reference: torch.Tensor, beta: float):
    """logps, reference: [..., 2] (chosen, rejected) -> (loss, margin, chosen and rejected
    log-ratios), each [...] float64."""
    ratios = logps.double() - reference.double()
    margin = beta * (ratios[..., 0] - ratios[..., 1])
    return -F.logsigmoid(margin), margin, ratios[..., 0], ratios[..., 1]


def dpo_loss_func(beta: float, sft_weight: float, batch: dict, output):
    """Megatron loss function of one micro-batch of pairs: (sum of pair losses, pairs, report)."""
    valid = batch["pair_index"] >= 0                       # [B, P]
    P = valid.shape[1]
    logp, sums, counts = sequence_logps(output.ce, batch["loss_weights"], batch["document_ids"], 2 * P)
    logp = logp.view(-1, P, 2)
    loss, margin, chosen, rejected = pair_losses(logp, batch["reference_logps"], beta)
    sft = sums.view(-1, P, 2)[..., 0] / counts.view(-1, P, 2)[..., 0].clamp(min=1.0)
    per_pair = loss + sft_weight * sft.double() if sft_weight else loss
    zero = per_pair.new_zeros(())
    numerator = torch.where(valid, per_pair, zero).sum().float()
    pairs = valid.sum()
    with torch.no_grad():
        def total(x):
            return torch.where(valid, x.detach().double(), zero).sum()
        report = torch.stack([numerator.detach().double(), pairs.double(), total(margin),
                              (valid & (margin > 0)).sum().double(), total(chosen), total(rejected),
                              total(sft), total(logp[..., 0]), total(logp[..., 1])]).float()
    return numerator, pairs.to(torch.int), {"report": report}


def summarise_dpo(total: torch.Tensor) -> dict:
    """Logged numbers of an iteration from the summed DPO_KEYS vector."""
    v = dict(zip(DPO_KEYS, total.tolist()))
    n = max(v["pairs"], 1.0)
    return {"loss": v["loss_sum"] / n, "pairs": v["pairs"], "dpo/reward_margin": v["margin_sum"] / n,
            "dpo/accuracy": v["correct"] / n, "dpo/chosen_logratio": v["chosen_ratio_sum"] / n,
            "dpo/rejected_logratio": v["rejected_ratio_sum"] / n, "dpo/chosen_sft_loss": v["sft_sum"] / n,
            "dpo/chosen_logp": v["chosen_logp_sum"] / n, "dpo/rejected_logp": v["rejected_logp_sum"] / n}


def logps_loss_func(batch: dict, output):
    """Loss function of reference scoring: no loss, the per-pair log pi as the report."""
    P = batch["pair_index"].shape[1]
    logp, _, _ = sequence_logps(output.ce, batch["loss_weights"], batch["document_ids"], 2 * P)
    zero = output.ce.new_zeros(()).float()
    return zero, torch.ones((), dtype=torch.int, device=zero.device), {
        "logps": logp.detach().double().view(-1, P, 2), "pair_index": batch["pair_index"]}


def checkpoint_identity(path: str) -> dict:
    """What names a reference checkpoint: its resolved path, iteration and a sha256 over its
    manifest's file list (sizes and checksums)."""
    resolved = resolve_checkpoint(path)
    manifest = read_manifest(resolved)
    files = json.dumps(manifest.get("files", {}), sort_keys=True)
    return {"path": os.path.abspath(str(resolved)), "iteration": manifest.get("iteration"),
            "files_sha256": hashlib.sha256(files.encode()).hexdigest()}


def reference_checkpoint(cfg) -> str:
    return cfg.dpo.reference_checkpoint or cfg.checkpoint.load


def score_hint(cfg) -> str:
    return ("score it with: python -m megatron_ualm.score_reference --config <this run's config> "
            f"dpo.reference_checkpoint={reference_checkpoint(cfg)}")


__all__ = ["DPO_KEYS", "sequence_logps", "pair_losses", "dpo_loss_func", "summarise_dpo", "logps_loss_func",
           "checkpoint_identity", "reference_checkpoint", "score_hint"]
