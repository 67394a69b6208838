"""The multi-stream output head: one shared, untied, vocab-parallel projection.

Stream k reads ``h + e_k`` (``e_0 = 0``; ``e_1..e_{K-1}`` learned) and predicts the next
row's k-th token:

* stream 0: softmax over the whole vocabulary; the tensor-parallel padding rows are
  masked to -inf (never predicted);
* stream k >= 1: softmax over codebook k's block only (its pad + C codes), or over all
  audio rows with ``audio_head="all_audio"``.

Only positions whose loss weight is non-zero are projected (selected before the matmul),
and streams k >= 1 are projected onto their block's rows only, never the full vocabulary.

Tensor parallelism. The head weight is split by vocabulary rows over the TP ranks
(``ColumnParallelLinear`` layout, partition ``[r * Vp, (r + 1) * Vp)``). A block
``[lo, hi)`` may straddle shards; rank r holds ``n_r`` of its rows. Every rank pads its
local slice of block logits to a common width ``P = max_r n_r`` with -inf, which turns
the block into an ordinary vocab-parallel softmax over a "virtual" vocabulary of
``TP * P`` columns, so megatron's ``vocab_parallel_cross_entropy`` applies unchanged;
targets are remapped to their virtual column. Ranks holding no rows of a block compute
nothing for it. For stream 0 the block is ``[0, size)`` and ``P = Vp``: the padding
columns are exactly the padded vocabulary rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel import (
    ColumnParallelLinear, copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy,
)
from megatron.core.transformer.module import MegatronModule

from megatron_ualm.formats.vocab import UnifiedVocab
from megatron_ualm.model.batch import target_rows
from megatron_ualm.kernels.cross_entropy import head_cross_entropy
from megatron_ualm.model.weights import weight_of

NEG_INF = float("-inf")


@dataclass
class StreamLosses:
    """Per-position results of the head, dense over the batch.

    ce: float32 [B, S, K] cross entropy of predicting ``labels[b, s, k]`` (0 where the
        loss weight is 0); differentiable.
    correct: bool [B, S, K] whether the argmax equals the label (False where weight is 0).
    """
    ce: Tensor
    correct: Tensor


class _Sharding:
    """Static arithmetic of the vocab-parallel split (no communication)."""

    def __init__(self, padded_size: int, tp_size: int, tp_rank: int):
        if padded_size % tp_size:
            raise ValueError(f"padded vocabulary {padded_size} not divisible by TP={tp_size}")
        self.per_rank = padded_size // tp_size
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.lo = tp_rank * self.per_rank
        self.hi = self.lo + self.per_rank

    def local_rows(self, lo: int, hi: int, rank: int | None = None) -> tuple[int, int]:
        """[a, b) of block [lo, hi) held by ``rank`` (this rank by default); a == b if none."""
        rank = self.tp_rank if rank is None else rank
        a = max(lo, rank * self.per_rank)
        b = min(hi, (rank + 1) * self.per_rank)
        return (a, b) if b > a else (a, a)

    def width(self, lo: int, hi: int) -> int:
        """P: the widest slice of [lo, hi) on any rank."""
        return max(self.local_rows(lo, hi, r)[1] - self.local_rows(lo, hi, r)[0] for r in range(self.tp_size))

    def virtual_targets(self, targets: Tensor, lo: Tensor, width: int) -> Tensor:
        """Unified ids -> columns of the virtual [TP * width] vocabulary. lo: block start per row."""
        owner = targets // self.per_rank
        owner_start = torch.maximum(lo, owner * self.per_rank)
        return owner * width + (targets - owner_start)


class MultiStreamHead(MegatronModule):
    """Stream embeddings + shared vocab-parallel head + per-stream cross entropy.

    config: megatron TransformerConfig; vocab: the padded UnifiedVocab (its ``padded_size``
    rows are split over TP); audio_head: "codebook" | "all_audio".
    """

    #: training CE through ``kernels.cross_entropy`` (False: logits materialised + megatron's CE, the reference)
    fused_ce: bool = True

    def __init__(self, config, vocab: UnifiedVocab, audio_head: str = "codebook", tp_group=None):
        super().__init__(config=config)
        if audio_head not in ("codebook", "all_audio"):
            raise ValueError(f"audio_head {audio_head!r} not in ('codebook', 'all_audio')")
        self.vocab = vocab
        self.audio_head = audio_head
        self.num_streams = vocab.num_codebooks
        self.tp_group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
        self.output_layer = ColumnParallelLinear(
            config.hidden_size, vocab.padded_size, config=config, init_method=config.init_method,
            bias=False, skip_bias_add=False, gather_output=False, tp_group=self.tp_group)
        # e_1 .. e_{K-1}; e_0 = 0 is implicit. Replicated over TP (grads are all-reduced below).
        self.stream_embeddings = nn.Parameter(torch.empty(
            self.num_streams - 1, config.hidden_size, dtype=config.params_dtype,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device()))
        if config.perform_initialization:
            nn.init.normal_(self.stream_embeddings, mean=0.0, std=config.init_method_std)
        self.sharding = _Sharding(vocab.padded_size, self.tp_group.size(), self.tp_group.rank())

    # --- blocks --------------------------------------------------------------------------------
    def stream_block(self, k: int) -> tuple[int, int]:
        """[lo, hi) of the unified rows stream k predicts over."""
        if k == 0:
            return 0, self.vocab.size
        if self.audio_head == "all_audio":
            return self.vocab.audio_start, self.vocab.size
        return self.vocab.codebook_range(k)

    @property
    def weight(self) -> Tensor:
        """This rank's head rows [Vp, H] (the output layer is never called: see weights.py)."""
        return weight_of(self.output_layer)

    def _full_hidden(self, hidden: Tensor) -> Tensor:
        """[s(/TP), B, H] -> [B * S, H], the whole sequence on every TP rank.

        Under SP the gather's backward only splits: the gradient arriving here is already
        complete, because the rows are all-reduced by ``copy_to_tensor_model_parallel_region``.
        """
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=self.tp_group)
        return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])

    def _block_logits(self, h: Tensor, lo: int, hi: int, width: int) -> Tensor:
        """This rank's slice of block [lo, hi) logits, padded with -inf to ``width``: [N, width]."""
        a, b = self.sharding.local_rows(lo, hi)
        n = b - a
        if n == 0 or h.shape[0] == 0:
            return h.new_full((h.shape[0], width), NEG_INF)
        w = self.weight[a - self.sharding.lo:b - self.sharding.lo]
        logits = h @ w.t()
        return F.pad(logits, (0, width - n), value=NEG_INF) if n < width else logits

    def _stream0_logits(self, h: Tensor) -> Tensor:
        """Full-vocabulary logits on this rank's shard with padded rows at -inf: [N, Vp]."""
        logits = h @ self.weight.t()
        pad_from = self.vocab.size - self.sharding.lo
        if pad_from < self.sharding.per_rank:
            logits[:, max(pad_from, 0):] = NEG_INF  # matmul output is not saved for backward
        return logits

    def _cross_entropy(self, logits: Tensor, targets: Tensor, lo: Tensor, width: int):
        """Vocab-parallel CE and argmax correctness over the virtual vocabulary."""
        virtual = self.sharding.virtual_targets(targets, lo, width)
        with torch.no_grad():
            logits_max = logits.max(dim=-1).values.float()
            own = (virtual // width) == self.sharding.tp_rank
            local_col = torch.where(own, virtual % width, torch.zeros_like(virtual))
            picked = logits.gather(1, local_col[:, None])[:, 0].float()
            picked = torch.where(own, picked, torch.zeros_like(picked))
            if self.sharding.tp_size > 1:
                torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=self.tp_group)
                torch.distributed.all_reduce(picked, group=self.tp_group)
            correct = picked >= logits_max
        # megatron's CE may work in place on its input: correctness is computed first.
        ce = vocab_parallel_cross_entropy(logits, virtual)
        return ce, correct

    def _fused_cross_entropy(self, rows: Tensor, flat_labels: Tensor, index: list, sizes: list):
        """CE and correctness of the selected rows (stream-major) through ``kernels.cross_entropy``: one
        segment per stream, stream 0 over this rank's whole shard (padding rows masked),
        stream k over this rank's slice of its block."""
        shard = self.sharding
        segments, targets = [], []
        r = 0
        for k in range(self.num_streams):
            lo, hi = self.stream_block(k)
            a, b = shard.local_rows(lo, hi)
            t = flat_labels[index[k], k]
            own = (t >= a) & (t < b)
            targets.append(torch.where(own, t - a, torch.full_like(t, -1)))
            if k == 0:  # the whole shard: the product is the full weight gradient
                segments.append((r, r + sizes[k], 0, shard.per_rank, b - a))
            else:
                segments.append((r, r + sizes[k], a - shard.lo, b - shard.lo, b - a))
            r += sizes[k]
        group = self.tp_group if shard.tp_size > 1 else None
        return head_cross_entropy(rows, self.weight, segments, torch.cat(targets), group)

    def _unfused_cross_entropy(self, rows: Tensor, flat_labels: Tensor, index: list, sizes: list):
        """The reference path: logits materialised, megatron's vocab-parallel CE."""
        K = self.num_streams
        rows = list(torch.split(rows, sizes, dim=0))
        ce_parts, correct_parts = [], []
        # stream 0
        t0 = flat_labels[index[0], 0]
        ce0, ok0 = self._cross_entropy(self._stream0_logits(rows[0]), t0,
                                       torch.zeros_like(t0), self.sharding.per_rank)
        ce_parts.append(ce0)
        correct_parts.append(ok0)
        # streams 1..K-1, one softmax call over their concatenated rows
        if K > 1:
            blocks = [self.stream_block(k) for k in range(1, K)]
            width = max(self.sharding.width(lo, hi) for lo, hi in blocks)
            logits = torch.cat([self._block_logits(rows[k], *blocks[k - 1], width) for k in range(1, K)], dim=0)
            targets = torch.cat([flat_labels[index[k], k] for k in range(1, K)])
            lo = torch.cat([torch.full((sizes[k],), blocks[k - 1][0], dtype=targets.dtype, device=targets.device)
                            for k in range(1, K)])
            ce_a, ok_a = self._cross_entropy(logits, targets, lo, width)
            ce_parts.append(ce_a)
            correct_parts.append(ok_a)
        return torch.cat(ce_parts), torch.cat(correct_parts)

    # --- training -------------------------------------------------------------------------------
    def forward(self, hidden: Tensor, labels: Tensor, loss_weights: Tensor,
                targets: Optional[tuple[Tensor, tuple[int, ...]]] = None) -> StreamLosses:
        """hidden [s(/TP), B, H] (final norm applied); labels int [B, S, K]; loss_weights [B, S, K].
        targets: ``batch.target_rows(loss_weights)`` computed beforehand (on the host, see
        ``batch.HostPlan``); None: computed here from the device tensor (one host sync).

        Returns per-position cross entropy and correctness (see ``StreamLosses``).
        """
        B, S, K = labels.shape
        if K != self.num_streams:
            raise ValueError(f"labels have {K} streams, the head {self.num_streams}")
        h = self._full_hidden(hidden)
        flat_labels = labels.reshape(-1, K)

        # Select, per stream, the positions that carry loss; add the stream embedding.
        rows_at, sizes = targets if targets is not None else target_rows(loss_weights)
        sizes = list(sizes)
        index = list(torch.split(rows_at.to(h.device, non_blocking=True), sizes))
        parts = [h.index_select(0, index[0])]
        for k in range(1, K):
            parts.append(h.index_select(0, index[k]) + self.stream_embeddings[k - 1].to(h.dtype))
        rows = torch.cat(parts, dim=0)
        rows = copy_to_tensor_model_parallel_region(rows, group=self.tp_group)  # bwd: all-reduce

        if self.fused_ce:
            ce_all, correct_all = self._fused_cross_entropy(rows, flat_labels, index, sizes)
        else:
            ce_all, correct_all = self._unfused_cross_entropy(rows, flat_labels, index, sizes)

        # Scatter back to dense [B, S, K].
        flat_index = torch.cat([index[k] * K + k for k in range(K)])
        ce = torch.zeros(B * S * K, dtype=torch.float32, device=h.device).index_put(
            (flat_index,), ce_all.float())
        correct = torch.zeros(B * S * K, dtype=torch.bool, device=h.device).index_put(
            (flat_index,), correct_all)
        return StreamLosses(ce.view(B, S, K), correct.view(B, S, K))

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, hidden: Tensor, last_only: bool = False) -> tuple[Tensor, Tensor]:
        """Logits for sampling, gathered over TP.

        hidden [s(/TP), B, H] -> (stream0 [B, S, padded_size] with padded rows -inf,
        streams [B, S, K-1, W] over each stream's block: W = C + 1 for "codebook",
        the number of audio rows for "all_audio"; column j is unified id ``lo_k + j``).
        ``last_only``: only the last position (S = 1), e.g. after a prefill.
        """
        B = hidden.shape[1]
        h = self._full_hidden(hidden)  # [B * S, H]
        if last_only:
            h = h.view(B, -1, h.shape[-1])[:, -1]
        S = h.shape[0] // B
        stream0 = self._stream0_logits(h).float()
        if self.sharding.tp_size > 1:
            stream0 = gather_from_tensor_model_parallel_region(stream0, group=self.tp_group)
        stream0 = stream0.view(B, S, -1)
        outs = []
        for k in range(1, self.num_streams):
            lo, hi = self.stream_block(k)
            width = self.sharding.width(lo, hi)
            local = self._block_logits(h + self.stream_embeddings[k - 1].to(h.dtype), lo, hi, width).float()
            if self.sharding.tp_size > 1:
                local = gather_from_tensor_model_parallel_region(local, group=self.tp_group)
                cols = torch.cat([torch.arange(r * width, r * width + (b - a), device=h.device)
                                  for r in range(self.sharding.tp_size)
                                  for a, b in [self.sharding.local_rows(lo, hi, r)]])
                local = local.index_select(1, cols)
            outs.append(local.view(B, S, hi - lo))
        streams = torch.stack(outs, dim=2) if outs else stream0.new_zeros(B, S, 0, 0)
        return stream0, streams
