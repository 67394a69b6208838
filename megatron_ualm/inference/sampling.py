"""Decoding settings and token selection: greedy, temperature, top-k, top-p.

Every request draws from its own ``torch.Generator`` (seeded from the run seed and the
request id), so a request's output does not depend on which other requests share its
batch, on the batch size or on the number of ranks.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from megatron_ualm.config_loader import ConfigError

NEG_INF = float("-inf")


@dataclass
class GenerationSettings:
    """What one generation call does. Defaults: SPEC section 6.

    Text rows are greedy (temperature 0); audio rows sample with temperature 0.8 and
    top-k 20 on every stream, under classifier-free guidance ``g * cond - (g - 1) * uncond``.
    ``max_new_rows`` bounds the rows generated per request (a text token or an audio row
    each); ``max_audio_seconds`` ends an audio segment (its remaining K - 1 rows are still
    written) after that many codec frames.
    """
    text_temperature: float = 0.0
    text_top_k: int = 0               # 0: no top-k filter
    text_top_p: float = 1.0
    audio_temperature: float = 0.8
    audio_top_k: int = 20
    audio_top_p: float = 1.0
    guidance_scale: float = 3.0       # 1: no guidance (the unconditional branch is not run)
    max_new_rows: int = 1024
    max_audio_seconds: float = 30.0
    min_audio_frames: int = 1         # an audio segment may not end before this many frames
    frame_rate: float = 50.0          # codec frames per second (X-Codec: 50)
    seed: int = 0
    batch_size: int = 16              # requests per engine batch (the CLI groups requests)
    max_rounds: int = 3               # reasoning requests: at most this many generated clips

    def __post_init__(self):
        """Raise ConfigError (a ValueError) naming the first setting out of range."""
        for name in ("text_temperature", "audio_temperature", "text_top_k", "audio_top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("text_top_p", "audio_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        if self.guidance_scale < 1:
            raise ConfigError(f"guidance_scale: must be >= 1 (1: no guidance), got {self.guidance_scale}")
        for name, low in (("max_new_rows", 1), ("batch_size", 1), ("max_rounds", 1), ("min_audio_frames", 1),
                          ("frame_rate", 1e-9)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")

    @property
    def max_audio_frames(self) -> int:
        return max(self.min_audio_frames, int(round(self.max_audio_seconds * self.frame_rate)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_overrides(cls, overrides: dict, base: "GenerationSettings | None" = None) -> "GenerationSettings":
        """A copy of ``base`` (default settings) with ``overrides`` ({name: value or string})."""
        values = (base or cls()).to_dict()
        types = {f.name: f.type for f in fields(cls)}
        for key, value in overrides.items():
            if key not in types:
                raise ConfigError(f"{key}: unknown generation setting; known: {', '.join(sorted(types))}")
            kind = {"float": float, "int": int}[str(types[key])]
            try:
                values[key] = kind(value)
                ok = math.isfinite(values[key]) and not isinstance(value, bool)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"{key}: expected {'a number' if kind is float else 'an integer'}, got {value!r}")
        return cls(**values)


def request_seed(seed: int, request_id: str) -> int:
    """A stable 63-bit seed for one request (independent of batching and ranks)."""
    digest = hashlib.sha256(f"{seed}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Scale by 1/temperature, keep the top-k and the top-p nucleus. logits [N, W] float
    (-inf where not allowed) -> [N, W] with -inf outside the kept set. temperature > 0."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each entry
        drop_sorted = before > top_p                 # the first entry is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits


def select(logits: Tensor, temperature: float, top_k: int, top_p: float,
           generators: Sequence[torch.Generator]) -> Tensor:
    """Pick one column per row. logits [N, W] or [N, S, W] (S streams of one request
    sampled together) with -inf on disallowed columns; generators: one per row N.
    Returns int64 [N] or [N, S]. Greedy (argmax) when temperature == 0."""
    if logits.shape[0] == 0:
        return torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    out = []
    for i, gen in enumerate(generators):
        p = probs[i]
        flat = p.reshape(-1, p.shape[-1])
        out.append(torch.multinomial(flat, 1, generator=gen).reshape(p.shape[:-1]))
    return torch.stack(out)
