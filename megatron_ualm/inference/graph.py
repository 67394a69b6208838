"""KV-cached decoding through a hand-written layer loop, replayed as one CUDA graph per step.

``CachedForward`` runs every step through megatron's ``TransformerLayer`` inference path:
about 1 ms of Python per layer and step, so a small batch is bound by the CPU, not the
GPU. ``GraphForward`` computes the same thing from the same weights in a plain loop
(input RMSNorm, QKV, RoPE, attention, output projection, pre-MLP RMSNorm, SwiGLU MLP,
final norm, ``MultiStreamHead.logits``) and, on CUDA, captures one decode step into a
``torch.cuda.CUDAGraph`` that each later step replays. On CPU the same step runs eagerly.
Single stage only: TP = PP = 1, no sequence parallelism (``supports``).

Cache, per layer: k, v [R, ng, L, hn] in the model dtype, slot j = position j of the
left-padded batch (``forward.py``). Keys are stored after RoPE (megatron's static cache
stores them before and rotates the whole prefix again every step: the same values). The
tensors are zero-initialised: slots a step does not see are masked, and a masked NaN
would still poison the softmax.

QKV: megatron's ``linear_qkv`` output is [ng, (np/ng + 2) * hn] per row: for each query
group its np/ng query heads, then its key, then its value (``SelfAttention.
get_query_key_value_tensors``). Decode attention folds the np/ng query heads of a group
into the query axis (q [R, ng, np/ng, hn] against k, v [R, ng, L, hn]): GQA without
repeating the cache, and every SDPA kernel takes the mask. Decode slot t sees slot j iff
j <= t and docs[r, j] != -1 (the left pads).

The step reads only static buffers: tokens [R, 1, K] of the new row, the slot (int64
[1]), the batch's positions [R, L] and valid slots [R, L]; the new k, v go in with
``index_copy_`` at the slot, and the mask and the RoPE angles are built from it on the
device, so no shape or Python int changes between steps. The first decode call warms the
step up on a side stream (this compiles the fused norm / SwiGLU / RoPE kernels for its
shape), captures it and replays it; warm-up and capture write the same k, v at the same
slot as the real step. A failed capture logs a warning once and the step runs eagerly.
Buffers, cache and graph are kept per model and reused by later batches of the same
(R, L rounded up to 128); the weights must stay where they are (in-place updates are fine).

Rows appended later in one call (reasoning: the model listening to its own clip) run
through the same loop eagerly at their slots, against the cache (``_extend``); with a mask,
every call first copies its slots' positions and valid flags into the static buffers
(reasoning leaves masked holes beside appended rows and moves later positions).

Prefill runs the prompt through the same loop eagerly (causal, or the document mask of
``model/attention.py`` when left-padded), filling slots [0, N).
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_ualm.kernels.compile import maybe_compiled
from megatron_ualm.kernels.rope import rotate
from megatron_ualm.kernels.swiglu import swiglu_reference
from megatron_ualm.model.attention import document_causal_mask

logger = logging.getLogger(__name__)

SLOT_MULTIPLE = 128  # cache lengths are rounded up to this, so batches of one size share a graph
_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [_Static]
_warned = False


def supports(model) -> bool:
    """Whether ``GraphForward`` can run this model: one stage, TP = 1, no SP."""
    cfg = model.config
    return (cfg.tensor_model_parallel_size == 1 and cfg.pipeline_model_parallel_size == 1
            and not cfg.sequence_parallel and model.pre_process and model.post_process)


class _Static:
    """What one decode graph reads and writes; owned by one GraphForward at a time."""

    def __init__(self, key: tuple, model, num_rows: int, length: int):
        self.key, self.owner = key, None
        self.tried, self.graph, self.outputs = False, None, None  # graph stays None if capture fails
        attn = model.decoder.layers[0].self_attention
        ng, hn = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
        w = model.embedding.weight
        shape = (num_rows, ng, length, hn)
        self.cache = [(torch.zeros(shape, dtype=w.dtype, device=w.device),
                       torch.zeros(shape, dtype=w.dtype, device=w.device)) for _ in model.decoder.layers]
        self.tokens = torch.zeros(num_rows, 1, model.vocab.num_codebooks, dtype=torch.long, device=w.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=w.device)
        self.positions = torch.zeros(num_rows, length, dtype=torch.long, device=w.device)
        self.valid = torch.zeros(num_rows, length, dtype=torch.bool, device=w.device)
        self.slots = torch.arange(length, device=w.device)


def _claim(model, num_rows: int, length: int, owner) -> _Static:
    """An idle state of this shape for ``model`` (new if none), now held by ``owner`` until
    it is garbage; idle states of other shapes are dropped."""
    w = model.embedding.weight
    key = (num_rows, length, w.dtype, w.device)
    states = [s for s in _STATES.get(model, []) if s.key == key or s.owner() is not None]
    _STATES[model] = states
    state = next((s for s in states if s.key == key and s.owner() is None), None)
    if state is None:
        state = _Static(key, model, num_rows, length)
        states.append(state)
    state.owner = weakref.ref(owner)
    return state


def _linear(x: Tensor, layer) -> Tensor:
    """megatron's single-rank linear: ``x @ W^T`` then the bias, as ``LinearWithGradAccumulation``."""
    y = torch.matmul(x, layer.weight.t())
    return y if layer.bias is None else y + layer.bias


class GraphForward:
    """Next-row logits like ``CachedForward`` (same call), decode steps as CUDA graph replays."""

    def __init__(self, model, num_rows: int, max_length: int):
        if not supports(model):
            raise NotImplementedError("the graph backend runs one stage, TP = 1, no sequence parallelism")
        self.model = model
        attn = model.decoder.layers[0].self_attention
        self.groups = attn.num_query_groups_per_partition
        self.per_group = attn.num_attention_heads_per_partition // self.groups
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = attn.core_attention.softmax_scale
        length = -(-max_length // SLOT_MULTIPLE) * SLOT_MULTIPLE
        self.static = _claim(model, num_rows, length, self)
        self.filled = 0

    @torch.no_grad()
    def __call__(self, tokens: Tensor, docs: Tensor, positions: Tensor, start: int, end: int,
                 audio: Optional[dict] = None, masked: bool = True) -> tuple[Tensor, Tensor]:
        """Feed positions [start, end) and return the logits at position end - 1:
        stream 0 [R, padded vocab], streams 1..K-1 [R, K-1, W] (float32)."""
        if start != self.filled:
            raise ValueError(f"cache holds {self.filled} positions, call starts at {start}")
        s, self.filled = self.static, end
        if start == 0:
            return self._prefill(tokens, docs, positions, end, audio, masked)
        if masked:  # reasoning may have moved later positions and left holes (``Engine._place``)
            s.positions[:, start:end].copy_(positions[:, start:end])
            s.valid[:, start:end].copy_(docs[:, start:end] != -1)
        if end - start != 1 or audio is not None:
            return self._extend(tokens, docs, positions, start, end, audio, masked)
        s.tokens.copy_(tokens[:, start:end])
        s.slot.fill_(start)
        if s.slot.is_cuda and not s.tried:
            s.tried = True
            s.graph, s.outputs = self._capture()
        if s.graph is not None:
            s.graph.replay()
            return s.outputs[0].clone(), s.outputs[1].clone()
        return self._decode_step()

    def _prefill(self, tokens, docs, positions, end, audio, masked):
        s, L = self.static, tokens.shape[1]
        s.positions[:, :L].copy_(positions)
        s.valid.zero_()
        s.valid[:, :L] = docs != -1 if masked else True
        hidden = self.model.embed(tokens[:, :end], **(audio or {})).transpose(0, 1)  # [R, N, H]
        angles = self.model.rotary(positions[:, :end]).transpose(0, 1)
        mask = document_causal_mask(docs[:, :end], end, end, tokens.device) if masked else None
        hidden = self._layers(hidden, angles, torch.arange(end, device=tokens.device), end, mask)
        stream0, streams = self.model.head.logits(hidden.transpose(0, 1), last_only=True)
        return stream0[:, -1], streams[:, -1]

    def _extend(self, tokens, docs, positions, start, end, audio, masked):
        """Rows [start, end) appended after the cache (eagerly): each sees the cached slots
        and the new rows up to itself. ``audio_rows`` name absolute slots."""
        s = self.static
        if audio is not None:
            rows = audio["audio_rows"].clone()
            rows[:, 1] -= start
            audio = {**audio, "audio_rows": rows}
        hidden = self.model.embed(tokens[:, start:end], **(audio or {})).transpose(0, 1)  # [R, S, H]
        angles = self.model.rotary(positions[:, start:end]).transpose(0, 1)
        slots = torch.arange(start, end, device=tokens.device)
        # a hole (docs -1) attends to itself alone: no real row sees it, and it must not be NaN
        mask = ((s.valid[:, None, None, :end] & (s.slots[:end] <= slots[:, None])[None, None])
                | (s.slots[:end] == slots[:, None])[None, None])
        hidden = self._layers(hidden, angles, slots, end, mask)
        stream0, streams = self.model.head.logits(hidden.transpose(0, 1), last_only=True)
        return stream0[:, -1], streams[:, -1]

    def _decode_step(self) -> tuple[Tensor, Tensor]:
        """One new row per request from the static buffers (graph-safe)."""
        s = self.static
        hidden = self.model.embed(s.tokens).transpose(0, 1)  # [R, 1, H]
        angles = self.model.rotary(s.positions.index_select(1, s.slot)).transpose(0, 1)
        allowed = s.valid & (s.slots <= s.slot)
        # additive, built once for all layers (SDPA would convert a boolean mask in every layer)
        mask = torch.zeros_like(allowed, dtype=hidden.dtype).masked_fill_(~allowed, float("-inf"))[:, None, None]
        hidden = self._layers(hidden, angles, s.slot, None, mask)
        stream0, streams = self.model.head.logits(hidden.transpose(0, 1), last_only=True)
        return stream0[:, -1], streams[:, -1]

    def _layers(self, hidden: Tensor, angles: Tensor, slots: Tensor, keys: Optional[int],
                mask: Optional[Tensor]) -> Tensor:
        """hidden [R, S, H] at cache ``slots`` (int64 [S]), angles [R, S, 1, hn]; attends to
        cache slots [0, keys) (None: all) under ``mask`` (broadcast to [R, 1, S, keys]: bool,
        True = may attend, or additive; None: causal). Returns the final-normed hidden [R, S, H]."""
        R, S, _ = hidden.shape
        ng, rep, hn = self.groups, self.per_group, self.head_dim
        rope = maybe_compiled(rotate, hidden)
        for layer, (k_cache, v_cache) in zip(self.model.decoder.layers, self.static.cache):
            attn = layer.self_attention
            qkv = _linear(layer.input_layernorm(hidden), attn.linear_qkv).view(R, S, ng, (rep + 2) * hn)
            q, k, v = qkv.split([rep * hn, hn, hn], dim=-1)
            q = rope(q.reshape(R, S, ng * rep, hn), angles)
            k_cache.index_copy_(2, slots, rope(k, angles).transpose(1, 2))
            v_cache.index_copy_(2, slots, v.transpose(1, 2))
            k, v = k_cache[:, :, :keys], v_cache[:, :, :keys]
            if S == 1:  # the group's query heads on the query axis: [R, ng, rep, hn]
                out = F.scaled_dot_product_attention(q.view(R, ng, rep, hn), k, v, attn_mask=mask,
                                                     scale=self.scale)
            else:  # prefill: as megatron's core attention calls it
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                                     scale=self.scale, enable_gqa=True).transpose(1, 2)
            hidden = hidden + _linear(out.reshape(R, S, ng * rep * hn), attn.linear_proj)
            up = _linear(layer.pre_mlp_layernorm(hidden), layer.mlp.linear_fc1)
            hidden = hidden + _linear(maybe_compiled(swiglu_reference, up)(up), layer.mlp.linear_fc2)
        return self.model.decoder.final_layernorm(hidden)

    def _capture(self):
        """(graph, static outputs) of one decode step, or (None, None) if capture fails."""
        global _warned
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._decode_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._decode_step()
            return graph, outputs
        except Exception as exc:  # noqa: BLE001 -- any capture failure: run eagerly
            if not _warned:
                logger.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", exc)
                _warned = True
            return None, None
