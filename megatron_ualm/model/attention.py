"""Core attention for UALM: causal attention that never crosses packed examples.

This module is megatron's ``core_attention`` slot of ``SelfAttention`` (see
``layer_spec.py``): it receives query/key/value after the QKV projection and RoPE and
returns the per-head context, so projections, tensor parallelism, KV caching and
recomputation stay megatron's.

The mask convention (the one thing the model and this module agree on):
``attention_mask`` is either ``None`` -- plain causal attention, aligned to the end of the
keys when there are fewer queries than keys (KV-cached decoding) -- or the int tensor
``document_ids`` [b, s]: position q may attend to position k iff k <= q and both belong
to the same packed example. Padding positions (document id -1) attend among themselves,
so no row is ever fully masked (no NaN) and real positions never see them.

Backends (``ModelConfig.attention_backend``):

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``. Unpacked batches use
  ``is_causal`` (flash / cuDNN kernels on GPU); packed batches pass an explicit
  block-diagonal causal boolean mask [b, 1, s, s] (memory-efficient or math kernel).
* ``"flex"``: FlexAttention with a ``BlockMask`` built from the document ids, so fully
  masked tiles are skipped. Compiled on GPU; runs eagerly (slowly) on CPU, forward only
  (torch has no CPU backward for it: calls that need gradients use sdpa there).
* ``"te"``: TransformerEngine's fused attention through megatron's
  ``TEDotProductAttention`` for unpacked batches; packed batches go to flex (GPU) or
  sdpa. When TE is not installed it behaves like ``"auto"`` (a warning is logged).
* ``"unfused"``: plain matmul-softmax-matmul in float32; the reference, slow.
* ``"auto"``: on GPU, flex for packed batches and sdpa for unpacked ones (measured on
  H200: cuDNN SDPA is the fastest plain-causal kernel, FlexAttention the fastest packed
  one); on CPU, sdpa.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ualm.kernels.profiling import scope

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flex", "te", "unfused")


@functools.lru_cache(maxsize=None)
def have_transformer_engine() -> bool:
    """Whether TransformerEngine's PyTorch extension imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def resolve_backend(name: str, device: torch.device, packed: bool) -> str:
    """The backend that actually runs one call: 'sdpa', 'flex', 'te' or 'unfused'."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} not in {BACKENDS}")
    on_gpu = device.type == "cuda"
    if name == "te" and not have_transformer_engine():
        name = "auto"
    if name == "te":
        return ("flex" if on_gpu else "sdpa") if packed else "te"
    if name == "auto":
        return "flex" if (on_gpu and packed) else "sdpa"
    return name


# --- masks -------------------------------------------------------------------------------------
def document_causal_mask(document_ids: Optional[Tensor], num_queries: int, num_keys: int,
                         device: torch.device) -> Tensor:
    """Boolean mask, True where attention is allowed.

    The queries are the last ``num_queries`` of ``num_keys`` positions (fewer queries than
    keys: KV-cached decoding). document_ids: int [b, num_keys], one id per key position
    (the queries take the last ``num_queries`` of them), or None (plain causal).
    Returns [b, 1, num_queries, num_keys] (b = 1 when document_ids is None).
    """
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
    k_pos = torch.arange(num_keys, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]
    if document_ids is None:
        return causal[None, None]
    if document_ids.shape[1] != num_keys or num_queries > num_keys:
        raise ValueError(f"document_ids [b, {document_ids.shape[1]}] must give one id per key "
                         f"({num_keys}) with at most as many queries ({num_queries})")
    same_doc = document_ids[:, num_keys - num_queries:, None] == document_ids[:, None, :]
    return (same_doc & causal[None])[:, None]


def flex_block_mask(document_ids: Tensor):
    """FlexAttention BlockMask for causal attention within each packed example.

    document_ids: int [b, s] on the device of the attention inputs.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    b, s = document_ids.shape
    return create_block_mask(mask_mod, b, None, s, s, device=document_ids.device,
                             _compile=document_ids.is_cuda)


class MaskCache:
    """Masks built once per forward pass and shared by every layer of one model.

    An entry is keyed on the document-id tensor itself: its storage pointer, shape and
    version, plus a reference that keeps the storage alive so the pointer cannot be reused
    by another batch while the entry exists. Layers, and recomputation in the backward
    pass (which sees a detached alias of the same storage), reuse one mask; a miss only
    costs a rebuild. One entry per kind.
    """

    def __init__(self):
        self._entries: dict[str, tuple] = {}

    def get(self, kind: str, source: Optional[Tensor], build, extra: tuple = ()):
        """The cached ``kind`` built from ``source`` (and ``extra``), else ``build()``."""
        key = (None if source is None else
               (source.data_ptr(), tuple(source.shape), source._version, source.device), extra)
        entry = self._entries.get(kind)
        if entry is not None and entry[1] == key:
            return entry[2]
        value = build()
        self._entries[kind] = (source, key, value)
        return value

    def clear(self):
        self._entries.clear()

    def values(self) -> list:
        """The cached masks (a CUDA graph that captured them keeps them alive)."""
        return [entry[2] for entry in self._entries.values()]


# --- the kernels, on [b, heads, s, d] --------------------------------------------------------
def unfused_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scale: float) -> Tensor:
    """Reference attention. q [b, h, sq, d]; k, v [b, g, sk, d] (h a multiple of g);
    allowed: bool broadcastable to [b, h, sq, sk]. Returns [b, h, sq, d] in q's dtype."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


class UALMCoreAttention(MegatronModule):
    """megatron ``core_attention`` module with the backends listed in the module docstring.

    Built by megatron's ``SelfAttention`` with (config, layer_number, attn_mask_type,
    attention_type, ...); ``backend`` and ``mask_cache`` come from the layer spec.

    forward(query [sq, b, np, hn], key/value [sk, b, ng, hn], attention_mask) ->
    context [sq, b, np * hn]. np and ng are this TP rank's heads and groups.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, backend: str = "auto", mask_cache: Optional[MaskCache] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("UALMCoreAttention does not implement context parallelism")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise NotImplementedError("attention dropout is not supported (Qwen2 uses none)")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r} not in {BACKENDS}")
        if backend == "te" and not have_transformer_engine():
            logger.warning("attention_backend='te' but TransformerEngine is not installed; using 'auto'")
            backend = "auto"
        self.backend = backend
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.mask_cache = mask_cache if mask_cache is not None else MaskCache()
        self._te = None
        self._warned_flex_cpu = False
        self._te_args = dict(config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                             attention_type=attention_type, softmax_scale=softmax_scale,
                             pg_collection=pg_collection)
        if backend == "te":
            self._te = self._build_te()

    def _build_te(self):
        from megatron.core.extensions.transformer_engine import TEDotProductAttention
        return TEDotProductAttention(**self._te_args)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        with scope("ualm.attention"):
            return self._forward(query, key, value, attention_mask, attention_bias, packed_seq_params)

    def _forward(self, query, key, value, attention_mask, attention_bias, packed_seq_params) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("UALMCoreAttention takes document ids, not bias / THD params")
        sq, b, nq, hn = query.shape
        sk = key.shape[0]
        document_ids = attention_mask
        packed = document_ids is not None
        kind = resolve_backend(self.backend, query.device, packed)
        if packed and sq != sk:
            kind = "sdpa"  # left-padded KV-cached decoding: a dense mask over the cache

        if kind == "te":
            from megatron.core.transformer.enums import AttnMaskType
            mask_type = AttnMaskType.causal if sq == sk else AttnMaskType.no_mask
            if sq != sk and sq > 1:
                kind = "sdpa"  # chunked prefill against a cache: not a TE mask type
            else:
                return self._te(query, key, value, None, attn_mask_type=mask_type)

        # [s, b, heads, d] -> [b, heads, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        gqa = k.shape[1] != q.shape[1]

        if kind == "flex" and not q.is_cuda and torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad or v.requires_grad):
            if not self._warned_flex_cpu:
                logger.warning("FlexAttention has no backward on CPU; using sdpa for this call")
                self._warned_flex_cpu = True
            kind = "sdpa"
        if kind == "flex":
            if packed:
                block_mask = self.mask_cache.get("flex", document_ids, lambda: flex_block_mask(document_ids))
            else:
                block_mask = self.mask_cache.get("flex_causal", None, lambda: _causal_block_mask(sq, sk, q.device),
                                                 extra=(sq, sk, q.device))
            fn = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention()
            if not torch.is_grad_enabled():  # flex checks requires_grad, not grad mode
                q, k, v = q.detach(), k.detach(), v.detach()
            out = fn(q, k, v, block_mask=block_mask, scale=self.softmax_scale, enable_gqa=gqa)
        elif kind == "sdpa":
            if packed:
                allowed = self.mask_cache.get(
                    "dense", document_ids, lambda: document_causal_mask(document_ids, sq, sk, q.device))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale,
                                                     enable_gqa=gqa)
            elif sq == sk or sq == 1:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=sq > 1, scale=self.softmax_scale,
                                                     enable_gqa=gqa)
            else:  # several new queries against a longer cache: bottom-right causal
                allowed = document_causal_mask(None, sq, sk, q.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale,
                                                     enable_gqa=gqa)
        elif kind == "unfused":
            allowed = document_causal_mask(document_ids, sq, sk, q.device)
            out = unfused_attention(q, k, v, allowed, self.softmax_scale)
        else:
            raise AssertionError(kind)
        # [b, heads, sq, d] -> [sq, b, heads * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)


def _causal_block_mask(sq: int, sk: int, device):
    from torch.nn.attention.flex_attention import create_block_mask
    offset = sk - sq

    def mask_mod(bi, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return create_block_mask(mask_mod, None, None, sq, sk, device=device, _compile=device.type == "cuda")


@functools.lru_cache(maxsize=None)
def _eager_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention
