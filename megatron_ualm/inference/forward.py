"""Logits of the next row for a left-padded batch: KV-cached, or recomputed from scratch.

Batch layout (shared by both backends and the engine). R rows (requests, then their
unconditional twins under guidance) of up to L positions:

    tokens     int64 [R, L, K]  left-padded: request b's n_b prompt rows sit at
                                [p_b, N) with p_b = N - n_b, N the longest prompt;
                                generated rows follow at N, N+1, ...
    docs       int32 [R, L]     -1 on the p_b left-pad slots, 0 elsewhere
    positions  int64 [R, L]     max(j - p_b, 0): the example's own positions 0, 1, ...,
                                exactly as in training (pad slots get 0; they are masked)

Padding slots are never attended by real positions (the document mask of
``model/attention.py``; pads see only each other), so every request computes what it
would alone. Without left padding (all prompts of one length) no mask is passed at all.

``GraphForward`` (``graph.py``, the engine's default where it applies) keeps its own
static KV cache and runs each decode step as one CUDA graph replay. ``CachedForward`` runs
the prompt once into megatron's ``StaticInferenceContext`` and then one row per step
through megatron's layers, with per-row RoPE angles for the whole cache. ``FullForward`` re-runs
the whole prefix through the training forward (``UALMModel.logits``) every step: the
reference the cached path is tested against.

Reasoning appends rows mid-decode (the model listening to its own clip: header, placeholder
rows filled with encoder frames, END): a call with ``end - start > 1`` and ``audio`` whose
``audio_rows`` name absolute slots in [start, end). ``GraphForward`` prefills just those rows
into its cache; ``FullForward`` adds the clips to the ones it recomputes with.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_ualm.inference.graph import GraphForward
from megatron_ualm.inference.graph import supports as graph_supports


def left_pad_layout(lengths: list[int], length: int, num_rows: int, device) -> tuple[Tensor, Tensor, list[int]]:
    """docs int32 [num_rows, length] and positions int64 [num_rows, length] for prompts of
    ``lengths`` (row b and row b + len(lengths) share a layout); returns also the pads p_b."""
    B = len(lengths)
    N = max(lengths)
    pads = [N - n for n in lengths]
    docs = torch.zeros(num_rows, length, dtype=torch.int32, device=device)
    positions = torch.zeros(num_rows, length, dtype=torch.long, device=device)
    slots = torch.arange(length, device=device)
    for r in range(num_rows):
        p = pads[r % B]
        docs[r, :p] = -1
        positions[r] = (slots - p).clamp(min=0)
    return docs, positions, pads


class CachedForward:
    """KV-cached next-row logits over a static batch of ``num_rows`` rows, ``max_length``
    positions. Call with ``start == `` the number of positions already cached."""

    def __init__(self, model, num_rows: int, max_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext
        if model.config.sequence_parallel:
            raise NotImplementedError("inference runs without sequence parallelism")
        if not (model.pre_process and model.post_process):
            raise NotImplementedError("inference runs on a single pipeline stage")
        self.model = model
        self.context = StaticInferenceContext(max_batch_size=num_rows, max_sequence_length=max_length)

    @torch.no_grad()
    def __call__(self, tokens: Tensor, docs: Tensor, positions: Tensor, start: int, end: int,
                 audio: Optional[dict] = None, masked: bool = True) -> tuple[Tensor, Tensor]:
        """Feed positions [start, end) and return the logits at position end - 1:
        stream 0 [R, padded vocab], streams 1..K-1 [R, K-1, W] (see ``MultiStreamHead.logits``)."""
        ctx, model = self.context, self.model
        if start != ctx.sequence_len_offset:
            raise ValueError(f"cache holds {ctx.sequence_len_offset} positions, call starts at {start}")
        if start > 0:
            if audio is not None or end - start != 1:
                raise NotImplementedError("the cached backend appends one generated row per call; "
                                          "reasoning (appended clips) runs on the graph or full backend")
            ctx.enable_decode_mode()
        hidden = model.embed(tokens[:, start:end], **(audio or {}))
        # megatron slices the query angles at [start, end) and the key angles at [0, end)
        angles = model.rotary(positions[:, :end])
        hidden = model.decoder(hidden_states=hidden, attention_mask=docs[:, :end] if masked else None,
                               rotary_pos_emb=angles, inference_context=ctx)
        stream0, streams = model.head.logits(hidden, last_only=True)
        ctx.sequence_len_offset = end
        return stream0[:, -1], streams[:, -1]


class FullForward:
    """Reference: recompute the whole prefix [0, end) every call with the training forward."""

    def __init__(self, model, num_rows: int = 0, max_length: int = 0):
        self.model = model
        self.audio = None

    @torch.no_grad()
    def __call__(self, tokens: Tensor, docs: Tensor, positions: Tensor, start: int, end: int,
                 audio: Optional[dict] = None, masked: bool = True) -> tuple[Tensor, Tensor]:
        if start == 0:
            self.audio = audio
        elif audio is not None:
            self.audio = merge_audio(self.audio, audio)
        stream0, streams = self.model.logits(tokens[:, :end], positions[:, :end],
                                             docs[:, :end] if masked else None, last_only=True,
                                             **(self.audio or {}))
        return stream0[:, -1], streams[:, -1]


def merge_audio(a: Optional[dict], b: dict) -> dict:
    """The clips of two audio dicts (``audio_waveforms`` [N, S], ``audio_num_samples`` [N],
    ``audio_rows`` [N, 3] at absolute slots) as one."""
    if a is None:
        return b
    wa, wb = a["audio_waveforms"], b["audio_waveforms"]
    width = max(wa.shape[1], wb.shape[1])
    wave = torch.cat([torch.nn.functional.pad(w, (0, width - w.shape[1])) for w in (wa, wb)])
    return {"audio_waveforms": wave,
            "audio_num_samples": torch.cat([a["audio_num_samples"], b["audio_num_samples"]]),
            "audio_rows": torch.cat([a["audio_rows"], b["audio_rows"]])}


class SplitForward:
    """Runs the conditional rows [0, B) and the unconditional rows [B, 2B) as two separate
    batches of ``inner`` (tests: the joint batch must give the same logits)."""

    def __init__(self, inner, model, num_rows: int, max_length: int):
        self.half = num_rows // 2
        self.parts = [inner(model, self.half, max_length), inner(model, self.half, max_length)]

    def __call__(self, tokens, docs, positions, start, end, audio=None, masked=True):
        h = self.half
        cond = self.parts[0](tokens[:h], docs[:h], positions[:h], start, end, audio, masked)
        uncond = self.parts[1](tokens[h:], docs[h:], positions[h:], start, end, None, masked)
        return torch.cat([cond[0], uncond[0]]), torch.cat([cond[1], uncond[1]])


BACKENDS = {"graph": GraphForward, "cached": CachedForward, "full": FullForward}


def default_backend(model) -> str:
    """"graph" where it applies (one stage, TP = 1, no sequence parallelism), else "cached"."""
    return "graph" if graph_supports(model) else "cached"
