"""HF Qwen2 <-> UALM state dicts, as full (unsharded, TP=1-shaped) tensors.

The checkpoint converters sit on top of this: HF -> ``hf_to_ualm`` -> ``tp_layout`` shards
-> megatron checkpoint, and back. Names on the UALM side are ``UALMModel.state_dict()``
names of a single-stage model (global layer indices); megatron's ``_extra_state`` entries
are not produced (load with ``strict=False`` or drop them).

Layouts (megatron's, checked against ``SelfAttention.get_query_key_value_tensors`` and the
gated ``MLP``):

* ``linear_qkv`` fuses Q, K, V per query group: for each group g of the G KV heads, the
  ``H/G`` query heads of that group, then K_g, then V_g. Rows: ``G * (H/G + 2) * d``. The
  bias follows the same order.
* ``linear_fc1`` = [gate; up] (SwiGLU: silu(gate) * up), ``linear_fc2`` = down.

Vocabulary (``formats.vocab``): text row t of the HF embedding becomes unified row
``256 + t``; the input table and the head are separate (HF's tied embeddings are untied:
both start from ``embed_tokens``, or from ``lm_head`` for the head when HF has one).
New rows -- the 256 special slots, the K codebook blocks and the TP padding -- are
initialised i.i.d. normal(0, init_std) from a seeded generator, except the ``<|pad|>``
row 0 of the input table, which is zero (the model keeps it zero). The stream embeddings
are normal(0, init_std) too. The inverse, ``ualm_to_hf``, keeps only the text rows and
returns everything UALM-specific separately.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from megatron_ualm.formats.vocab import NUM_SPECIAL_SLOTS, PAD, UnifiedVocab

EMBEDDING = "embedding.word_embeddings.weight"
HEAD = "head.output_layer.weight"
STREAMS = "head.stream_embeddings"
FINAL_NORM = "decoder.final_layernorm.weight"


def qwen2_shape(hf_config) -> dict:
    """ModelConfig fields read off an HF Qwen2 config (a ``Qwen2Config`` or its dict)."""
    get = (lambda k, d=None: hf_config.get(k, d)) if isinstance(hf_config, Mapping) else \
        (lambda k, d=None: getattr(hf_config, k, d))
    heads = get("num_attention_heads")
    rope = get("rope_parameters") or {}
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    return dict(
        num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
        ffn_hidden_size=get("intermediate_size"), num_attention_heads=heads,
        num_query_groups=get("num_key_value_heads") or heads,
        kv_channels=get("head_dim") or get("hidden_size") // heads,
        max_position_embeddings=get("max_position_embeddings"),
        rotary_base=float(theta if theta is not None else get("rope_theta", 1e6)),
        norm_epsilon=get("rms_norm_eps"), text_vocab_size=get("vocab_size"),
    )


def qwen2_config_dict(model_cfg) -> dict:
    """Keyword arguments of ``transformers.Qwen2Config`` for the backbone of ``model_cfg``
    (untied embeddings; the text vocabulary only)."""
    return dict(
        vocab_size=model_cfg.text_vocab_size, hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size, num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads, num_key_value_heads=model_cfg.num_query_groups,
        head_dim=model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads,
        max_position_embeddings=model_cfg.max_position_embeddings, rms_norm_eps=model_cfg.norm_epsilon,
        rope_theta=model_cfg.rotary_base, tie_word_embeddings=False, hidden_act="silu",
        attention_dropout=0.0, use_sliding_window=False,
    )


# --- QKV fusion ------------------------------------------------------------------------------------
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """HF q [H*d, ...], k/v [G*d, ...] (weights or biases) -> megatron linear_qkv [G*(H/G+2)*d, ...]."""
    d = k.shape[0] // num_groups
    rest = q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups * d, *rest)
    k = k.reshape(num_groups, d, *rest)
    v = v.reshape(num_groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups * head_dim
    g = qkv.reshape(num_groups, per_group + 2 * head_dim, *rest)
    q, k, v = torch.split(g, [per_group, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


# --- HF -> UALM ------------------------------------------------------------------------------------
def _new_rows(n: int, hidden: int, std: float, generator: torch.Generator, dtype) -> Tensor:
    return (torch.randn(n, hidden, generator=generator, dtype=torch.float32) * std).to(dtype)


def _unified_table(text_rows: Tensor, vocab: UnifiedVocab, std: float, generator, zero_pad: bool) -> Tensor:
    """[V_text, H] text rows -> [padded_size, H]: text at offset 256, new rows random."""
    if text_rows.shape[0] != vocab.text_vocab_size:
        raise ValueError(f"HF table has {text_rows.shape[0]} rows; the vocabulary says "
                         f"text_vocab_size={vocab.text_vocab_size}")
    hidden, dtype = text_rows.shape[1], text_rows.dtype
    table = torch.cat([
        _new_rows(NUM_SPECIAL_SLOTS, hidden, std, generator, dtype),
        text_rows,
        _new_rows(vocab.padded_size - vocab.audio_start, hidden, std, generator, dtype),
    ])
    if zero_pad:
        table[PAD] = 0
    return table


def hf_to_ualm(hf_state: Mapping[str, Tensor], shape: Mapping, vocab: UnifiedVocab, *,
               init_std: float = 0.02, seed: int = 0) -> dict[str, Tensor]:
    """HF Qwen2ForCausalLM state dict -> UALM decoder/embedding/head state dict (full tensors).

    shape: ``qwen2_shape(hf_config)`` (or any mapping with num_layers, num_attention_heads,
    num_query_groups). vocab: the padded UnifiedVocab of the target model
    (``ualm_model.padded_vocab(model_cfg, TP)``). The audio adapter and encoder are not
    produced (they come from the model's own init or the encoder checkpoint).
    """
    sd = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in hf_state.items()}
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    gen = torch.Generator().manual_seed(seed)
    embed = sd["embed_tokens.weight"]
    head_rows = sd.get("lm_head.weight", embed)
    out = {EMBEDDING: _unified_table(embed, vocab, init_std, gen, zero_pad=True),
           HEAD: _unified_table(head_rows, vocab, init_std, gen, zero_pad=False)}
    for i in range(shape["num_layers"]):
        src, dst = f"layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            sd[attn + "q_proj.weight"], sd[attn + "k_proj.weight"], sd[attn + "v_proj.weight"], heads, groups)
        if attn + "q_proj.bias" in sd:
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                sd[attn + "q_proj.bias"], sd[attn + "k_proj.bias"], sd[attn + "v_proj.bias"], heads, groups)
        out[dst + "self_attention.linear_proj.weight"] = sd[attn + "o_proj.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([sd[src + "mlp.gate_proj.weight"],
                                                        sd[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = sd[src + "mlp.down_proj.weight"]
    out[FINAL_NORM] = sd["norm.weight"]
    hidden = embed.shape[1]
    out[STREAMS] = _new_rows(vocab.num_codebooks - 1, hidden, init_std, gen, embed.dtype)
    return out


# --- UALM -> HF ------------------------------------------------------------------------------------
def ualm_to_hf(ualm_state: Mapping[str, Tensor], shape: Mapping, vocab: UnifiedVocab) -> tuple[dict, dict]:
    """UALM full state dict -> (HF Qwen2ForCausalLM state dict, UALM-only extras).

    The HF dict has untied ``model.embed_tokens.weight`` and ``lm_head.weight`` holding the
    text rows [256, 256 + V_text) only. Extras: ``special_embedding``/``special_head``
    [256, H], ``audio_embedding``/``audio_head`` [K * (C + 1), H], the stream embeddings and
    every ``audio_encoder.*`` tensor, under their UALM names. Padding rows are dropped.
    """
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    text = slice(vocab.text_offset, vocab.audio_start)
    audio = slice(vocab.audio_start, vocab.size)
    special = slice(0, NUM_SPECIAL_SLOTS)
    emb, head = ualm_state[EMBEDDING], ualm_state[HEAD]
    if emb.shape[0] < vocab.size or head.shape[0] < vocab.size:
        raise ValueError(f"tables have {emb.shape[0]}/{head.shape[0]} rows, the vocabulary {vocab.size}")
    hf = {"model.embed_tokens.weight": emb[text].clone(), "lm_head.weight": head[text].clone(),
          "model.norm.weight": ualm_state[FINAL_NORM]}
    for i in range(shape["num_layers"]):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        head_dim = ualm_state[src + "self_attention.linear_qkv.weight"].shape[0] // (heads + 2 * groups)
        hf[dst + "input_layernorm.weight"] = ualm_state[src + "input_layernorm.weight"]
        q, k, v = split_qkv(ualm_state[src + "self_attention.linear_qkv.weight"], heads, groups, head_dim)
        hf[dst + "self_attn.q_proj.weight"], hf[dst + "self_attn.k_proj.weight"], hf[dst + "self_attn.v_proj.weight"] = q, k, v
        if src + "self_attention.linear_qkv.bias" in ualm_state:
            q, k, v = split_qkv(ualm_state[src + "self_attention.linear_qkv.bias"], heads, groups, head_dim)
            hf[dst + "self_attn.q_proj.bias"], hf[dst + "self_attn.k_proj.bias"], hf[dst + "self_attn.v_proj.bias"] = q, k, v
        hf[dst + "self_attn.o_proj.weight"] = ualm_state[src + "self_attention.linear_proj.weight"]
        hf[dst + "post_attention_layernorm.weight"] = ualm_state[src + "pre_mlp_layernorm.weight"]
        gate, up = torch.chunk(ualm_state[src + "mlp.linear_fc1.weight"], 2, dim=0)
        hf[dst + "mlp.gate_proj.weight"], hf[dst + "mlp.up_proj.weight"] = gate, up
        hf[dst + "mlp.down_proj.weight"] = ualm_state[src + "mlp.linear_fc2.weight"]
    hf = {k: v.contiguous() for k, v in hf.items()}
    extras = {"special_embedding": emb[special].clone(), "special_head": head[special].clone(),
              "audio_embedding": emb[audio].clone(), "audio_head": head[audio].clone()}
    for name, value in ualm_state.items():
        if name == STREAMS or name.startswith("audio_encoder."):
            extras[name] = value
    return hf, extras


def ualm_tables_from_parts(hf_embed: Tensor, hf_head: Tensor, extras: Mapping[str, Tensor],
                           vocab: UnifiedVocab, init_std: float = 0.02, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Rebuild the unified input table and head [padded_size, H] from the HF text rows and the
    extras of ``ualm_to_hf`` (the inverse of its row split). Padding rows are drawn as in
    ``hf_to_ualm`` (they are never used)."""
    gen = torch.Generator().manual_seed(seed)
    pad_rows = vocab.padded_size - vocab.size
    hidden, dtype = hf_embed.shape[1], hf_embed.dtype
    emb = torch.cat([extras["special_embedding"], hf_embed, extras["audio_embedding"],
                     _new_rows(pad_rows, hidden, init_std, gen, dtype)])
    head = torch.cat([extras["special_head"], hf_head, extras["audio_head"],
                      _new_rows(pad_rows, hidden, init_std, gen, dtype)])
    return emb, head


def strip_extra_state(state: Mapping[str, Tensor], keep: Optional[str] = None) -> dict:
    """Drop megatron's ``_extra_state`` entries (and, with ``keep``, names not starting with it)."""
    return {k: v for k, v in state.items()
            if not k.endswith("_extra_state") and (keep is None or k.startswith(keep))}
