"""Training and validation rows: blended, packed, laid out, ready for the model.

The plan (which examples go into which row) is computed once, up front, from document
lengths alone: blend the datasets (``blending``), then pack the stream (``packing``). Row
i of the plan is therefore a pure function of (datasets, weights, seed, seq_length), and a
restart at row i reads exactly what the uninterrupted run would have read.

A row is built in a DataLoader worker: read each example's stored segments, lay them out
(``formats.templates.layout``), apply classifier-free-guidance dropout with a random draw
seeded by (seed, row, slot), shift by one row (inputs / next-row labels), and concatenate.

Batch contract (one micro-batch; see ``megatron_ualm/model/batch.py``):
    tokens [B, S, K] int64, labels [B, S, K] int64, loss_weights [B, S, K] float32,
    position_ids [B, S] int64 (restart at 0 per example), document_ids [B, S] int32 (-1 pad),
    task_ids [B, S] int64 (-1 pad), audio_waveforms [N, L] float32, audio_num_samples [N] int64,
    audio_rows [N, 3] int64 (batch index, first placeholder row, num_rows).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from megatron_ualm.data.blending import blended_samples
from megatron_ualm.data.packing import PackingStats, pack
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

log = logging.getLogger(__name__)


class DocumentSource(Protocol):
    """What the loader needs from a stored dataset (see data/indexed.py)."""

    def __len__(self) -> int: ...
    def segments(self, index: int) -> list: ...            # list[formats.templates.Segment]
    def clip(self, clip_index: int) -> np.ndarray: ...     # float32 [n] at 16 kHz


@dataclass(frozen=True)
class RowSettings:
    seq_length: int
    loss_on: str = "assistant"
    cfg_dropout_prob: float = 0.0
    seed: int = 1234
    overlong: str = "drop"
    packing: bool = True
    pack_window: int = 1000


class PackedRows(torch.utils.data.Dataset):
    """Rows of ``settings.seq_length`` positions drawn from ``sources`` with ``weights``.

    ``num_rows`` rows are planned (a training run asks for train_iters * global_batch).
    ``tasks[d]`` is the task id logged for dataset d.
    """

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], tasks: Sequence[int],
                 vocab: UnifiedVocab, settings: RowSettings, num_rows: int, blend: bool = True):
        if not sources:
            raise ValueError("no datasets to read: data.train is empty")
        self.sources, self.tasks, self.vocab, self.settings = list(sources), list(tasks), vocab, settings
        # Training positions per document (rows - 1); read from the index when the source can.
        self._lengths = [np.asarray(s.rows(), dtype=np.int64) - 1 if hasattr(s, "rows")
                         else np.full(len(s), -1, dtype=np.int64) for s in sources]
        self.rows, self.stats = self._plan(list(weights), num_rows, blend)

    # --- planning -------------------------------------------------------------------------
    def example_length(self, d: int, doc: int) -> int:
        """Training positions of one example: its rows minus one (cached)."""
        cached = self._lengths[d][doc]
        if cached < 0:
            cached = T.num_rows(self.sources[d].segments(int(doc)), self.vocab.num_codebooks) - 1
            self._lengths[d][doc] = cached
        return int(cached)

    def _stream_lengths(self, order, docs) -> np.ndarray:
        for d in range(len(self.sources)):
            missing = np.unique(docs[(order == d)][self._lengths[d][docs[order == d]] < 0])
            for doc in missing:
                self.example_length(d, int(doc))
        out = np.empty(len(order), dtype=np.int64)
        for d in range(len(self.sources)):
            sel = order == d
            out[sel] = self._lengths[d][docs[sel]]
        return out

    def _plan(self, weights, num_rows, blend):
        s = self.settings
        sizes = [len(src) for src in self.sources]
        if blend:
            n = max(num_rows, 1) * 2
            while True:
                order, docs = blended_samples(sizes, weights, n, s.seed)
                lengths = self._stream_lengths(order, docs)
                plan = pack(lengths, s.seq_length, s.overlong, s.pack_window, s.packing)
                # only whole windows are final: a longer stream could change the last one
                complete = [r for r in plan.rows if max(i for i, _ in r) < (n // s.pack_window) * s.pack_window]
                if len(complete) >= num_rows or n > 1e9:
                    break
                if plan.stats.dropped_overlong == plan.stats.examples:
                    raise ValueError("no example fits a row: every example is longer than data.seq_length "
                                     f"= {s.seq_length} and data.overlong='drop'")
                n *= 2
            rows = complete[:num_rows]
        else:  # validation: every example once, in order
            order = np.concatenate([np.full(sz, d, dtype=np.int64) for d, sz in enumerate(sizes)])
            docs = np.concatenate([np.arange(sz, dtype=np.int64) for sz in sizes])
            lengths = self._stream_lengths(order, docs)
            plan = pack(lengths, s.seq_length, s.overlong, s.pack_window, s.packing)
            rows = plan.rows[:num_rows] if num_rows else plan.rows
        self._order, self._docs = order, docs
        stats = plan.stats
        if stats.dropped_overlong or stats.truncated_overlong:
            log.warning("over-long examples (policy %r): %d dropped, %d truncated",
                        s.overlong, stats.dropped_overlong, stats.truncated_overlong)
        if len(rows) < num_rows:
            raise ValueError(f"only {len(rows)} rows could be planned, {num_rows} wanted")
        return [[(int(order[i]), int(docs[i]), n) for i, n in r] for r in rows], stats

    # --- building -------------------------------------------------------------------------
    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        s = self.settings
        S, K = s.seq_length, self.vocab.num_codebooks
        tokens = np.zeros((S, K), dtype=np.int64)
        labels = np.zeros((S, K), dtype=np.int64)
        weights = np.zeros((S, K), dtype=np.float32)
        positions = np.zeros(S, dtype=np.int64)
        doc_ids = np.full(S, -1, dtype=np.int32)
        task_ids = np.full(S, -1, dtype=np.int64)
        clips, clip_rows = [], []
        at = 0
        for slot, (d, doc, n) in enumerate(self.rows[index]):
            ex = T.layout(self.sources[d].segments(doc), self.vocab, s.loss_on)
            if s.cfg_dropout_prob > 0 and ex.target_audio_rows is not None:
                draw = np.random.default_rng([s.seed, index, slot]).random()
                if draw < s.cfg_dropout_prob:
                    ex = T.cfg_dropout(ex)
            tokens[at:at + n] = ex.tokens[:n]
            labels[at:at + n] = ex.tokens[1:n + 1]
            weights[at:at + n] = ex.weights[1:n + 1]
            positions[at:at + n] = np.arange(n)
            doc_ids[at:at + n] = slot
            task_ids[at:at + n] = self.tasks[d]
            for span in ex.audio_spans:
                if span.row + span.num_rows <= n:  # a span cut by truncation is left as pad rows
                    clips.append(self.sources[d].clip(span.clip_index))
                    clip_rows.append((at + span.row, span.num_rows))
            at += n
        return {"tokens": tokens, "labels": labels, "loss_weights": weights, "position_ids": positions,
                "document_ids": doc_ids, "task_ids": task_ids, "clips": clips, "clip_rows": clip_rows}


def collate(rows: list[dict]) -> dict:
    """Stack rows into the batch contract (see module docstring)."""
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows]))
             for k in ("tokens", "labels", "loss_weights", "position_ids", "document_ids", "task_ids")}
    clips = [(b, c, at, n) for b, r in enumerate(rows) for c, (at, n) in zip(r["clips"], r["clip_rows"])]
    longest = max((len(c) for _, c, _, _ in clips), default=0)
    wav = np.zeros((len(clips), longest), dtype=np.float32)
    for i, (_, c, _, _) in enumerate(clips):
        wav[i, :len(c)] = c
    batch["audio_waveforms"] = torch.from_numpy(wav)
    batch["audio_num_samples"] = torch.tensor([len(c) for _, c, _, _ in clips], dtype=torch.int64)
    batch["audio_rows"] = torch.tensor([[b, at, n] for b, _, at, n in clips], dtype=torch.int64).reshape(-1, 3)
    return batch


__all__ = ["DocumentSource", "RowSettings", "PackedRows", "PackingStats", "collate"]
