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

import bisect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from megatron_ualm.data.blending import BlendSchedule, DocumentOrder, blend_slice, window_blend
from megatron_ualm.data.packing import PackingStats, pack
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab

log = logging.getLogger(__name__)
_REASONING = T.TASKS.index("reasoning")  # no CFG dropout: the critique refers to the request


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

    Training (``blend=True``): the blended stream is cut into windows of
    ``settings.pack_window`` examples and each window is packed on its own, so row ``i`` is
    found by planning windows forward from an anchor; nothing is planned for the whole run
    up front, and memory stays flat however long the run. A restart passes the anchor saved
    with its checkpoint (``anchor_for``) and plans only from there.
    Validation (``blend=False``): every example of every dataset once, packed in order.

    ``num_rows`` is the length the sampler sees (train_iters * global batch; 0 for
    validation means all). ``tasks[d]`` is the task id logged for dataset d.

    With a ``schedule`` (curriculum), window w is blended with the weights of the iteration of
    its first row and continues each dataset where window w - 1 left it; the anchor then also
    carries those per-dataset counts.
    """

    CACHED_WINDOWS = 8
    MAX_EMPTY_WINDOWS = 64

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float], tasks: Sequence[int],
                 vocab: UnifiedVocab, settings: RowSettings, num_rows: int, blend: bool = True,
                 anchor: tuple[int, ...] = (0, 0), schedule: BlendSchedule | None = None):
        if not sources:
            raise ValueError("no datasets to read: data.train is empty")
        self.sources, self.tasks, self.vocab, self.settings = list(sources), list(tasks), vocab, settings
        self.weights, self.blend, self.schedule = list(weights), blend, schedule
        # Training positions per document (rows - 1); read from the index when the source can.
        self._lengths = [np.asarray(s.rows(), dtype=np.int64) - 1 if hasattr(s, "rows")
                         else np.full(len(s), -1, dtype=np.int64) for s in sources]
        self.stats = PackingStats()
        if blend:
            self._order = DocumentOrder([len(src) for src in self.sources], settings.seed)
            self._first_window = int(anchor[0])
            self._starts = [int(anchor[1])]  # first row of windows first_window, first_window + 1, ...
            if schedule is not None:
                counts = anchor[2:] if len(anchor) > 2 else [0] * len(sources)
                if len(counts) != len(sources) or (len(anchor) == 2 and tuple(anchor) != (0, 0)):
                    raise ValueError(f"anchor {tuple(anchor)} does not fit a scheduled blend of "
                                     f"{len(sources)} datasets")
                # samples read from each dataset before windows first_window, first_window + 1, ...
                self._counts = [np.asarray(counts, dtype=np.int64)]
            self._cache: OrderedDict = OrderedDict()
            self._counted: set = set()
            self.num_rows = num_rows
            self.locate(self._starts[0])  # plans the first window: early errors and stats
        else:
            self._static = self._plan_all()
            self.num_rows = num_rows or len(self._static)
            if len(self._static) < self.num_rows:
                raise ValueError(f"only {len(self._static)} rows could be planned, {self.num_rows} wanted")

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
            sel = order == d
            for doc in np.unique(docs[sel][self._lengths[d][docs[sel]] < 0]):
                self.example_length(d, int(doc))
        out = np.empty(len(order), dtype=np.int64)
        for d in range(len(self.sources)):
            sel = order == d
            out[sel] = self._lengths[d][docs[sel]]
        return out

    def _window(self, w: int) -> list:
        """Rows of window w: lists of (dataset, document, positions used)."""
        if w in self._cache:
            self._cache.move_to_end(w)
            return self._cache[w]
        s = self.settings
        if self.schedule is None:
            owners, samples = blend_slice(self.weights, w * s.pack_window, (w + 1) * s.pack_window)
        else:
            i = w - self._first_window  # windows are planned in order, so its start and counts are known
            weights = self.schedule.weights_at_row(self._starts[i])
            owners, samples, after = window_blend(weights, self._counts[i], s.pack_window)
            if len(self._counts) == i + 1:
                self._counts.append(after)
        docs = self._order.documents(owners, samples)
        plan = pack(self._stream_lengths(owners, docs), s.seq_length, s.overlong, s.pack_window, s.packing)
        rows = [[(int(owners[i]), int(docs[i]), n) for i, n in r] for r in plan.rows]
        if w not in self._counted:
            self._counted.add(w)
            self._add_stats(plan.stats)
        self._cache[w] = rows
        if len(self._cache) > self.CACHED_WINDOWS:
            self._cache.popitem(last=False)
        return rows

    def _add_stats(self, st: PackingStats):
        first_drop = not (self.stats.dropped_overlong or self.stats.truncated_overlong)
        for name in ("examples", "dropped_overlong", "truncated_overlong", "rows", "used_positions",
                     "total_positions"):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(st, name))
        if first_drop and (st.dropped_overlong or st.truncated_overlong):
            log.warning("over-long examples (longer than data.seq_length=%d) are %s (data.overlong); "
                        "the count is in the packing summary", self.settings.seq_length,
                        "dropped" if self.settings.overlong == "drop" else "truncated")

    def locate(self, row: int) -> tuple[int, int]:
        """(window, offset in that window) of training row ``row``."""
        if not self.blend:
            raise TypeError("locate() is for blended training rows")
        if row < self._starts[0]:
            raise IndexError(f"row {row} comes before this plan's anchor (row {self._starts[0]}, "
                             f"window {self._first_window}); resume from an earlier checkpoint")
        empty = 0
        while self._starts[-1] <= row:
            n = len(self._window(self._first_window + len(self._starts) - 1))
            empty = empty + 1 if n == 0 else 0
            if empty > self.MAX_EMPTY_WINDOWS:
                raise ValueError("no example fits a row: every example is longer than data.seq_length "
                                 f"= {self.settings.seq_length} and data.overlong='drop'")
            self._starts.append(self._starts[-1] + n)
        i = bisect.bisect_right(self._starts, row) - 1
        return self._first_window + i, row - self._starts[i]

    def anchor_for(self, row: int) -> tuple[int, ...]:
        """(window, its first row[, samples read per dataset before it]) from which a restart
        that reads ``row`` next can plan."""
        w, offset = self.locate(row)
        if self.schedule is None:
            return w, row - offset
        return (w, row - offset, *(int(c) for c in self._counts[w - self._first_window]))

    def row_plan(self, index: int) -> list:
        """The examples of row ``index``: [(dataset, document, positions used)]."""
        if not self.blend:
            return self._static[index]
        w, offset = self.locate(index)
        return self._window(w)[offset]

    def _plan_all(self) -> list:
        s = self.settings
        sizes = [len(src) for src in self.sources]
        order = np.concatenate([np.full(sz, d, dtype=np.int64) for d, sz in enumerate(sizes)])
        docs = np.concatenate([np.arange(sz, dtype=np.int64) for sz in sizes])
        plan = pack(self._stream_lengths(order, docs), s.seq_length, s.overlong, s.pack_window, s.packing)
        self._add_stats(plan.stats)
        return [[(int(order[i]), int(docs[i]), n) for i, n in r] for r in plan.rows]

    # --- building -------------------------------------------------------------------------
    def __len__(self):
        return self.num_rows

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
        for slot, (d, doc, n) in enumerate(self.row_plan(index)):
            ex = T.layout(self.sources[d].segments(doc), self.vocab, s.loss_on)
            if s.cfg_dropout_prob > 0 and ex.target_audio_rows is not None and self.tasks[d] != _REASONING:
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
