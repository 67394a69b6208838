"""The batch contract between the data loader and ``UALMModel``.

One micro-batch is a dict of tensors (B rows of S positions, K streams, N audio clips):

==================== ======= =========== ==================================================
key                  dtype   shape       meaning
==================== ======= =========== ==================================================
``tokens``           int64   [B, S, K]   input rows: unified ids (``formats.vocab``); text
                                         rows hold ``<|pad|>`` (0) in streams 1..K-1;
                                         placeholder rows hold 0 in every stream
``labels``           int64   [B, S, K]   the next row of each position (the target)
``loss_weights``     float32 [B, S, K]   weight of predicting ``labels[b, s, k]``; 0 where
                                         nothing is predicted (context, padding, the last
                                         position of each example)
``position_ids``     int64   [B, S]      restart at 0 in each packed example
``document_ids``     int32   [B, S]      which packed example a position belongs to,
                                         0, 1, ... per row; -1 for padding positions
``audio_waveforms``  float32 [N, L]      16 kHz mono clips, zero-padded to L samples
``audio_num_samples`` int64  [N]         real length of each clip
``audio_rows``       int64   [N, 3]      (batch index, first placeholder row, num_rows) in
                                         input coordinates; num_rows ==
                                         ``audio.frames.num_encoder_frames(num_samples)``
``task_ids``         int64   [B, S]      optional, logging only (-1 for padding)
==================== ======= =========== ==================================================

N may be 0 (``audio_waveforms`` [0, L], ``audio_rows`` [0, 3]).

Rules the loader guarantees and ``validate_batch`` checks: labels with non-zero weight
are real (non-padding, non-``<|pad|>``) rows of the stream's block; placeholder spans lie
inside one example and do not overlap; ``tokens[b, s]`` for s inside a span is all 0.
Packing: ``labels[b, s]`` belongs to the same example as ``tokens[b, s]`` (the last
position of an example has weight 0), so the loss never crosses examples.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from megatron_ualm.formats.vocab import UnifiedVocab

REQUIRED_KEYS = ("tokens", "labels", "loss_weights", "position_ids", "document_ids",
                 "audio_waveforms", "audio_num_samples", "audio_rows")
OPTIONAL_KEYS = ("task_ids",)


class BatchError(ValueError):
    """A batch breaks the contract in this module's docstring."""


def _expect(cond: bool, msg: str):
    if not cond:
        raise BatchError(msg)


def validate_batch(batch: Mapping[str, Tensor], vocab: UnifiedVocab,
                   window_seconds: float = 30.0, check_values: bool = True) -> None:
    """Raise ``BatchError`` if ``batch`` breaks the contract.

    Shapes and dtypes are always checked; ``check_values`` also checks id ranges, label
    blocks, positions, spans and frame counts (costs a few passes over the batch; meant for
    tests and the first steps of a run, not every step).
    """
    for key in REQUIRED_KEYS:
        _expect(key in batch, f"batch lacks {key!r}")
    tokens, labels, weights = batch["tokens"], batch["labels"], batch["loss_weights"]
    _expect(tokens.dim() == 3, f"tokens must be [B, S, K], got {list(tokens.shape)}")
    B, S, K = tokens.shape
    _expect(K == vocab.num_codebooks, f"tokens have K={K} streams, vocabulary {vocab.num_codebooks}")
    _expect(tokens.dtype == torch.int64 and labels.dtype == torch.int64, "tokens/labels must be int64")
    _expect(labels.shape == tokens.shape, f"labels {list(labels.shape)} != tokens {list(tokens.shape)}")
    _expect(weights.shape == tokens.shape, f"loss_weights {list(weights.shape)} != tokens {list(tokens.shape)}")
    _expect(weights.is_floating_point(), "loss_weights must be floating point")
    for key in ("position_ids", "document_ids") + tuple(k for k in OPTIONAL_KEYS if k in batch):
        _expect(tuple(batch[key].shape) == (B, S), f"{key} must be [B, S] = {[B, S]}, got {list(batch[key].shape)}")
    _expect(batch["position_ids"].dtype == torch.int64, "position_ids must be int64")
    _expect(batch["document_ids"].dtype in (torch.int32, torch.int64), "document_ids must be int32")
    wav, num, rows = batch["audio_waveforms"], batch["audio_num_samples"], batch["audio_rows"]
    _expect(wav.dim() == 2 and wav.is_floating_point(), f"audio_waveforms must be float [N, L], got {list(wav.shape)}")
    N = wav.shape[0]
    _expect(tuple(num.shape) == (N,), f"audio_num_samples must be [N={N}]")
    _expect(tuple(rows.shape) == (N, 3), f"audio_rows must be [N={N}, 3], got {list(rows.shape)}")
    if not check_values:
        return
    from megatron_ualm.audio.frames import num_encoder_frames  # lazy: megatron_ualm.audio needs soundfile

    _expect(bool(((tokens >= 0) & (tokens < vocab.size)).all()), "token id outside the real vocabulary")
    _expect(bool((weights >= 0).all()), "negative loss weight")
    target = weights > 0
    _expect(bool((labels[target] != 0).all()), "a weighted label is <|pad|> (id 0)")
    _expect(bool((labels[target] < vocab.size).all()), "a weighted label is a padding row")
    stream0 = labels[..., 0][target[..., 0]]
    _expect(bool((stream0 >= 0).all()), "negative stream-0 label")
    for k in range(1, K):
        lo, hi = vocab.codebook_range(k)
        lab = labels[..., k][target[..., k]]
        _expect(bool(((lab >= lo) & (lab < hi)).all()), f"a weighted stream-{k} label is outside codebook {k}'s block")

    docs, pos = batch["document_ids"].long(), batch["position_ids"]
    for b in range(B):
        d = docs[b]
        real = d >= 0
        _expect(bool((pos[b][real] >= 0).all()), f"row {b}: negative position id")
        starts = torch.ones_like(real)
        starts[1:] = d[1:] != d[:-1]
        _expect(bool((pos[b][real & starts] == 0).all()), f"row {b}: an example does not start at position 0")
        cont = real & ~starts
        prev = torch.zeros_like(pos[b])
        prev[1:] = pos[b][:-1]
        _expect(bool((pos[b][cont] == prev[cont] + 1).all()), f"row {b}: positions do not count up within an example")
        _expect(bool((weights[b][~real] == 0).all()), f"row {b}: a padding position carries loss weight")

    covered = torch.zeros(B, S, dtype=torch.bool)
    for i in range(N):
        b, row, n = (int(x) for x in rows[i])
        ns = int(num[i])
        _expect(0 <= b < B and 0 <= row and row + n <= S, f"clip {i}: span {(b, row, n)} outside the batch")
        _expect(0 < ns <= wav.shape[1], f"clip {i}: {ns} samples, waveforms hold {wav.shape[1]}")
        _expect(n == num_encoder_frames(ns, window_seconds),
                f"clip {i}: {n} placeholder rows, the encoder gives {num_encoder_frames(ns, window_seconds)}")
        _expect(not bool(covered[b, row:row + n].any()), f"clip {i}: span overlaps another clip")
        covered[b, row:row + n] = True
        _expect(bool((tokens[b, row:row + n] == 0).all()), f"clip {i}: placeholder rows hold non-pad tokens")
        span_docs = docs[b, row:row + n]
        _expect(bool((span_docs == span_docs[0]).all()) and int(span_docs[0]) >= 0,
                f"clip {i}: span crosses examples or lies in padding")


def is_packed(document_ids: Optional[Tensor]) -> bool:
    """Whether any row holds more than one example (padding after one example is not packing).

    Causes one device-to-host sync.
    """
    if document_ids is None or document_ids.shape[1] < 2:
        return False
    d = document_ids
    boundary = (d[:, 1:] != d[:, :-1]) & (d[:, 1:] >= 0)
    return bool(boundary.any())


# --- what the forward would otherwise ask the device ---------------------------------------------
def target_rows(loss_weights: Tensor) -> tuple[Tensor, list[int]]:
    """The flattened positions ``b * S + s`` that carry loss, stream by stream: (int64 [n],
    positions of stream 0 ascending, then stream 1, ...; the count of each stream's [K]).
    On a device tensor this asks the device for the counts (one host sync)."""
    K = loss_weights.shape[-1]
    nz = torch.nonzero(loss_weights.reshape(-1, K) > 0)  # [n, 2] (position, stream), position-major
    order = torch.argsort(nz[:, 1], stable=True)
    sizes = torch.bincount(nz[:, 1], minlength=K).tolist()
    return nz[order, 0], sizes


@dataclass(frozen=True)
class HostPlan:
    """Data-dependent sizes of one micro-batch, computed on the host from its CPU tensors
    (``host_plan``) so that the forward never waits for the device to learn them: whether
    attention needs the packed-example mask, and which positions the head projects.
    Without a plan the model computes both from the device tensors (two host syncs)."""
    packed: bool
    head_rows: Tensor           # int64 [n] (``target_rows``)
    head_sizes: tuple[int, ...]
    audio_num_samples: tuple[int, ...] = ()           # ``audio_num_samples`` as host ints
    audio_rows: tuple[tuple[int, int, int], ...] = ()  # ``audio_rows`` as host ints

    def to(self, device, non_blocking: bool = True) -> "HostPlan":
        return dataclasses.replace(self, head_rows=self.head_rows.to(device, non_blocking=non_blocking))


def host_plan(document_ids: Optional[Tensor], loss_weights: Tensor, audio_num_samples: Optional[Tensor] = None,
              audio_rows: Optional[Tensor] = None) -> HostPlan:
    """The ``HostPlan`` of a batch from its CPU tensors (before it moves to the device)."""
    tensors = [t for t in (document_ids, loss_weights, audio_num_samples, audio_rows) if t is not None]
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("host_plan needs the batch's CPU tensors (before it moves to the device)")
    rows, sizes = target_rows(loss_weights)
    if torch.cuda.is_available():
        rows = rows.pin_memory()  # the copy to the device then needs no staging
    samples = tuple(audio_num_samples.tolist()) if audio_num_samples is not None else ()
    spans = tuple(tuple(r) for r in audio_rows.tolist()) if audio_rows is not None else ()
    return HostPlan(is_packed(document_ids), rows, tuple(sizes), samples, spans)
