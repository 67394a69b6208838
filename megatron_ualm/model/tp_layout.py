"""Full tensors <-> tensor-parallel shards and pipeline stages of a ``UALMModel``.

Megatron splits each tensor-parallel weight into contiguous chunks along one dimension,
except the gated MLP's fc1 whose rank-r shard is [gate_r; up_r]:

======================================== ====== ===========================================
UALM name (suffix)                       dim    split
======================================== ====== ===========================================
``embedding.word_embeddings.weight``     0      vocabulary rows (VocabParallelEmbedding)
``head.output_layer.weight``             0      vocabulary rows (ColumnParallelLinear)
``self_attention.linear_qkv.weight/bias`` 0     contiguous rows of the group-interleaved
                                                layout (whole groups when G >= TP; megatron
                                                all-gathers QKV itself when G < TP)
``mlp.linear_fc1.weight``                0      gate and up each split, shard = [gate_r; up_r]
``self_attention.linear_proj.weight``    1      input columns (RowParallelLinear)
``mlp.linear_fc2.weight``                1      input columns (RowParallelLinear)
everything else                          --     replicated (norms, stream embeddings, audio)
======================================== ====== ===========================================

Pipeline stages number their layers locally (``decoder.layers.{local}``); full state dicts
use global indices. ``stage_layer_offset`` / ``to_stage`` / ``from_stage`` translate.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def split_rule(name: str) -> tuple[str, int] | None:
    """('chunk' | 'glu', dim) for a TP-split tensor, None for a replicated one."""
    if name.endswith("embedding.word_embeddings.weight") or name.endswith("head.output_layer.weight"):
        return "chunk", 0
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        return "chunk", 0
    if name.endswith("linear_fc1.weight"):
        return "glu", 0
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return "chunk", 1
    return None


def shard_tensor(name: str, full: Tensor, tp_rank: int, tp_size: int) -> Tensor:
    """This rank's piece of a full tensor."""
    rule = split_rule(name)
    if rule is None or tp_size == 1:
        return full
    kind, dim = rule
    if full.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of {list(full.shape)} not divisible by TP={tp_size}")
    if kind == "glu":
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, tp_size, dim)[tp_rank], torch.chunk(up, tp_size, dim)[tp_rank]], dim)
    return torch.chunk(full, tp_size, dim=dim)[tp_rank].contiguous()


def gather_tensor(name: str, shards: Sequence[Tensor]) -> Tensor:
    """Inverse of ``shard_tensor``: the full tensor from all ranks' pieces (rank order)."""
    rule = split_rule(name)
    if rule is None or len(shards) == 1:
        return shards[0]
    kind, dim = rule
    if kind == "glu":
        halves = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim)
    return torch.cat(list(shards), dim=dim)


def stage_layer_offset(model) -> int:
    """Global index of this stage's first layer (0 when it builds none)."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def _renumber(name: str, delta: int) -> str:
    m = _LAYER.match(name)
    if not m:
        return name
    return f"decoder.layers.{int(m.group(1)) + delta}." + name[m.end():]


def to_stage(full: Mapping[str, Tensor], model, tp_rank: int, tp_size: int) -> dict[str, Tensor]:
    """The part of a full state dict that ``model`` (one TP rank of one stage) holds, sharded,
    under the model's own (local) names. Load with ``model.load_state_dict(sd, strict=False)``."""
    offset = stage_layer_offset(model)
    out = {}
    for local in model.state_dict():
        if local.endswith("_extra_state"):
            continue
        name = _renumber(local, offset)
        if name not in full:
            raise KeyError(f"full state dict lacks {name!r} (needed for {local!r})")
        out[local] = shard_tensor(name, full[name], tp_rank, tp_size)
    return out


def from_stage(stage_state: Mapping[str, Tensor], model) -> dict[str, Tensor]:
    """A stage's (local) state dict under global layer names (still TP-sharded)."""
    offset = stage_layer_offset(model)
    return {_renumber(k, offset): v for k, v in stage_state.items() if not k.endswith("_extra_state")}
