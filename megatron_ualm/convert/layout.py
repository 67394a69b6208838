"""Where each weight lives: HF Qwen2 names, UALM names, megatron checkpoint keys.

UALM names are ``UALMModel.state_dict()`` names of a single-stage model (``hf_adapter``).
In a megatron distributed checkpoint the decoder layers are *stacked*: the key of
``decoder.layers.{i}.<suffix>`` is ``decoder.layers.<suffix>``, global shape
``[num_layers, *shape]``, layer i at offset i of axis 0. Everything else is stored under
its own name, whole (TP shards are chunks of the same global tensor). The gated MLP's
``linear_fc1`` is stored globally as [gate; up] (megatron's swiglu factory keeps each TP
rank's [gate_r; up_r] as two chunks of that global tensor), QKV as ``fuse_qkv`` orders it.
Megatron's linear layers also save an ``_extra_state`` object (``None`` without
Transformer Engine) under ``<module>._extra_state/shard_{i}_{n}``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from megatron_ualm.model.hf_adapter import EMBEDDING, FINAL_NORM, HEAD, STREAMS, fuse_qkv, split_qkv

LAYER_PREFIX = "decoder.layers."
QKV_BIAS = "self_attention.linear_qkv.bias"
LAYER_SUFFIXES = ("input_layernorm.weight", "self_attention.linear_qkv.weight", QKV_BIAS,
                  "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
LAYER_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
HEAD_EXTRA_STATE = "head.output_layer"
ADAPTER = ("audio_encoder.adapter.weight", "audio_encoder.adapter.bias")
ENCODER_PREFIX = "audio_encoder.encoder."

# names of the UALM-only tensors in an exported HF directory (see ``hf_adapter.ualm_to_hf``)
SPECIAL_EMBEDDING, SPECIAL_HEAD = "special_embedding", "special_head"
AUDIO_EMBEDDING, AUDIO_HEAD = "audio_embedding", "audio_head"

__all__ = ["EMBEDDING", "HEAD", "STREAMS", "FINAL_NORM"]


def layer_suffixes(qkv_bias: bool) -> list[str]:
    return [s for s in LAYER_SUFFIXES if qkv_bias or s != QKV_BIAS]


def stacked_key(suffix: str) -> str:
    """Megatron checkpoint key of ``decoder.layers.{i}.<suffix>`` (any i)."""
    return LAYER_PREFIX + suffix


def extra_state_keys(num_layers: int) -> list[str]:
    """Unique keys of the ``_extra_state`` objects a UALM checkpoint holds."""
    keys = [f"{LAYER_PREFIX}{m}._extra_state/shard_{i}_{num_layers}"
            for i in range(num_layers) for m in LAYER_EXTRA_STATE]
    return keys + [f"{HEAD_EXTRA_STATE}._extra_state/shard_0_1"]


# --- HF Qwen2 per layer ------------------------------------------------------------------------------
def hf_layer_names(i: int, qkv_bias: bool = True) -> list[str]:
    p = f"model.layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
             p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight",
             p + "self_attn.o_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
             p + "mlp.down_proj.weight"]
    if qkv_bias:
        names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"]
    return names


def hf_shapes(shape: Mapping, qkv_bias: bool, tied: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an HF Qwen2ForCausalLM checkpoint with its shape.

    shape: ``hf_adapter.qwen2_shape(config)``; tied: the config ties the embeddings (then
    ``lm_head.weight`` is not expected)."""
    h, f, v = shape["hidden_size"], shape["ffn_hidden_size"], shape["text_vocab_size"]
    d = shape["kv_channels"]
    q, kv = shape["num_attention_heads"] * d, shape["num_query_groups"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not tied:
        out["lm_head.weight"] = (v, h)
    for i in range(shape["num_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
        if qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
    return out


def ualm_layer_shapes(shape: Mapping, qkv_bias: bool) -> dict[str, tuple[int, ...]]:
    """UALM shape of each layer suffix (one layer, not stacked)."""
    h, f, d = shape["hidden_size"], shape["ffn_hidden_size"], shape["kv_channels"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_query_groups"]) * d
    out = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": (qkv, h), QKV_BIAS: (qkv,),
           "self_attention.linear_proj.weight": (h, shape["num_attention_heads"] * d),
           "pre_mlp_layernorm.weight": (h,), "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}
    return {k: v for k, v in out.items() if k in layer_suffixes(qkv_bias)}


def hf_to_ualm_layer(get: Callable[[str], Tensor], i: int, suffix: str, shape: Mapping) -> Tensor:
    """One UALM layer tensor (``decoder.layers.{i}.<suffix>``) from HF tensors read by ``get``."""
    p = f"model.layers.{i}."
    heads, groups = shape["num_attention_heads"], shape["num_query_groups"]
    if suffix == "input_layernorm.weight":
        return get(p + "input_layernorm.weight")
    if suffix == "pre_mlp_layernorm.weight":
        return get(p + "post_attention_layernorm.weight")
    if suffix in ("self_attention.linear_qkv.weight", QKV_BIAS):
        kind = suffix.rsplit(".", 1)[1]
        return fuse_qkv(*(get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv"), heads, groups)
    if suffix == "self_attention.linear_proj.weight":
        return get(p + "self_attn.o_proj.weight")
    if suffix == "mlp.linear_fc1.weight":
        return torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    if suffix == "mlp.linear_fc2.weight":
        return get(p + "mlp.down_proj.weight")
    raise KeyError(suffix)


def ualm_to_hf_layer(tensors: Mapping[str, Tensor], i: int, shape: Mapping) -> dict[str, Tensor]:
    """HF tensors of layer i from its UALM tensors (keyed by layer suffix)."""
    p = f"model.layers.{i}."
    heads, groups, d = shape["num_attention_heads"], shape["num_query_groups"], shape["kv_channels"]
    out = {p + "input_layernorm.weight": tensors["input_layernorm.weight"],
           p + "post_attention_layernorm.weight": tensors["pre_mlp_layernorm.weight"],
           p + "self_attn.o_proj.weight": tensors["self_attention.linear_proj.weight"],
           p + "mlp.down_proj.weight": tensors["mlp.linear_fc2.weight"]}
    for kind, suffix in (("weight", "self_attention.linear_qkv.weight"), ("bias", QKV_BIAS)):
        if suffix in tensors:
            for x, t in zip("qkv", split_qkv(tensors[suffix], heads, groups, d)):
                out[f"{p}self_attn.{x}_proj.{kind}"] = t
    gate, up = torch.chunk(tensors["mlp.linear_fc1.weight"], 2, dim=0)
    out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
    return {k: v.contiguous() for k, v in out.items()}
