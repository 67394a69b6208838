"""Teacher-forced loss and accuracy per task, computed exactly as the trainer's validation.

The rows are the trainer's validation rows (``training.providers.valid_rows``: every example
once, packed in order, no CFG dropout), batched by ``data.loader.collate`` -- so audio
understanding examples carry their waveforms to the encoder as in training -- and each
micro-batch goes through the trainer's own ``forward_step`` / ``loss_func``; the report
vectors are summed and read with ``loop.summarise``. For the same checkpoint and data the
loss equals the ``valid`` loss the trainer logs (when its ``training.eval_iters`` covers
every row).

Accuracy is the share of targets whose argmax is the label: ``text_acc`` over text targets
(stream 0), ``audio_acc`` over every stream of audio targets; ``accuracy`` is the one of
the task's answer (audio for the audio generation tasks, text otherwise).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from megatron_ualm.data.loader import PackedRows, collate
from megatron_ualm.formats.templates import GENERATION_TASKS


class FirstDocuments:
    """The first ``limit`` documents of a stored dataset (``--max-examples``); the rest of
    the ``TokenizedDataset`` interface passes through."""

    def __init__(self, source, limit: Optional[int]):
        self.source = source
        self.limit = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.limit

    def rows(self) -> np.ndarray:
        return self.source.rows()[: self.limit]

    def __getattr__(self, name):  # segments, clip, task, prefix, meta, ...
        return getattr(self.source, name)


def task_metrics(task: str, summary: dict) -> dict:
    """loss / accuracy (+ the text and audio parts) of one task from ``loop.summarise``."""
    out = {"loss": summary["loss"], "targets": int(summary["targets"])}
    for key in ("text_loss", "text_acc", "audio_loss", "audio_acc"):
        if key in summary:
            out[key] = summary[key]
    out["accuracy"] = out.get("audio_acc" if task in GENERATION_TASKS else "text_acc")
    return out


def evaluate_rows(model, rows: PackedRows, task: str, micro_batch_size: int, device: torch.device,
                  progress=None) -> dict:
    """Loss and accuracy of ``model`` (a UALMModel in eval mode) over every row of ``rows``.

    progress: a tqdm bar advanced by the examples of each micro-batch (or None)."""
    from megatron_ualm.training.loop import forward_step, summarise

    total = None
    with torch.no_grad():
        for start in range(0, len(rows), micro_batch_size):
            index = range(start, min(start + micro_batch_size, len(rows)))
            batch = collate([rows[j] for j in index])
            output, loss_func = forward_step(device, iter([batch]), model)
            report = loss_func(output)[2]["report"]
            total = report if total is None else total + report
            if progress is not None:
                progress.update(sum(len(rows.row_plan(j)) for j in index))
    if total is None:
        return {"loss": None, "accuracy": None, "targets": 0}
    return task_metrics(task, summarise(total.cpu()))
