"""Rotary position embedding angles from explicit per-position ids.

Megatron's ``RotaryEmbedding`` produces angles for positions 0..S-1, shared by the whole
batch. UALM packs several examples per row and restarts positions at 0 in each, so the
angles depend on ``position_ids`` [b, s]. The output keeps megatron's layout,
[s, b, 1, head_dim] with the two halves repeated (non-interleaved, as Qwen2/HF), so
megatron's ``apply_rotary_pos_emb`` uses it unchanged (it broadcasts over heads).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryAngles(nn.Module):
    """theta_i = base^(-2i/d); angle(p, i) = p * theta_i.

    head_dim: rotary dimension (= kv_channels); base: RoPE base (Qwen2: 1e6).
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.base = float(base)

    def inv_freq(self, device) -> Tensor:
        # Computed per call, not a buffer: Float16Module would cast a buffer to bf16.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.base ** exponents)

    def forward(self, position_ids: Tensor) -> Tensor:
        """position_ids: int [b, s] -> float32 angles [s, b, 1, head_dim]."""
        inv_freq = self.inv_freq(position_ids.device)
        freqs = position_ids.t().float()[..., None] * inv_freq  # [s, b, d/2]
        return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]

    def arange(self, length: int, device) -> Tensor:
        """Angles for positions 0..length-1 shared by the batch: [length, 1, 1, head_dim]."""
        return self.forward(torch.arange(length, device=device)[None, :])
