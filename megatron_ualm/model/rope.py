"""Rotary position embedding: angles from explicit per-position ids, and their application.

Megatron's ``RotaryEmbedding`` produces angles for positions 0..S-1, shared by the whole
batch. UALM packs several examples per row and restarts positions at 0 in each, so the
angles depend on ``position_ids`` [b, s]. The output keeps megatron's layout,
[s, b, 1, head_dim] with the two halves repeated (non-interleaved, as Qwen2/HF), so
megatron's ``apply_rotary_pos_emb`` uses it unchanged (it broadcasts over heads).

Application: ``install_fused_rope`` routes megatron's unfused RoPE through
``kernels.rope.fused_rotate`` (one Triton kernel each way on CUDA; ``rotate``, megatron's unfused
RoPE in plain PyTorch, elsewhere).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron_ualm import kernels
from megatron_ualm.kernels.profiling import scope
from megatron_ualm.kernels.rope import fused_rotate


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


_FUSED_MARK = "__ualm_fused_rope__"


def install_fused_rope() -> None:
    """Route megatron's unfused RoPE (what ``SelfAttention`` calls without TE) through
    ``kernels.rope.fused_rotate`` for CUDA tensors while the kernels are on
    (``kernels.use_kernels``: one Triton kernel each way in the plain case, ``fusable``; eager
    ``rotate``, the same computation as megatron's, for other shapes or dtypes); every other
    call (CPU, interleaved, MLA, mscale, partial rotary dim) keeps megatron's function. Same
    math, in float32 with one rounding; megatron's eager version runs about eight elementwise
    kernels per q/k each way. Idempotent, process-wide (megatron offers no per-model hook for
    this without TE's fused kernel)."""
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_bshd
    if getattr(original, _FUSED_MARK, False):
        return

    def _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False, mscale=1.0, **flags):
        # flags: megatron's MLA switches (``multi_latent_attention``; 0.19+ also
        # ``mla_rotary_interleaved``); any of them set keeps megatron's function.
        with scope("ualm.rope"):
            if (kernels.use_kernels(t, needs_triton=False) and not rotary_interleaved and not any(flags.values())
                    and mscale == 1.0 and freqs.shape[-1] == t.shape[-1]):
                return fused_rotate(t, freqs)
            return original(t, freqs, rotary_interleaved=rotary_interleaved, mscale=mscale, **flags)

    setattr(_apply_rotary_pos_emb_bshd, _FUSED_MARK, True)
    _apply_rotary_pos_emb_bshd.original = original
    rope_utils._apply_rotary_pos_emb_bshd = _apply_rotary_pos_emb_bshd
