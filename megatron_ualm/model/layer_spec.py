"""The Qwen2 decoder layer as a megatron ``ModuleSpec``.

Megatron's own modules everywhere except these seams:
* the norm is :class:`~megatron_ualm.model.norm.RMSNorm` (supports sequence parallelism);
* with ``training.fp8`` the four linear layers are FP8 subclasses of megatron's
  (``fp8.py``: the local matmul becomes ``torch._scaled_mm``);
* core attention is :class:`~megatron_ualm.model.attention.UALMCoreAttention` (SDPA /
  FlexAttention / TE backends, packed-example masks) instead of megatron's unfused
  baddbmm path.

Qwen2 shape choices live in the ``TransformerConfig`` (see ``transformer_config.py``):
bias on the QKV projection only, gated SiLU MLP whose fc1 is [gate; up] (``SwiGLUMLP``:
megatron's MLP with the activation fused on CUDA).
"""
from __future__ import annotations

import logging
from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

import torch.nn.functional as F

from megatron_ualm.mcore_compat import mlp_submodule
from megatron_ualm.kernels.profiling import scope
from megatron_ualm.kernels.swiglu import fused_swiglu
from megatron_ualm.model.attention import MaskCache, UALMCoreAttention
from megatron_ualm.model.fp8 import linear_classes
from megatron_ualm.model.norm import RMSNorm


class _QuietUnknownMLP(logging.Filter):
    """megatron-core < 0.18: TransformerLayer passes ``tp_group`` only to the exact ``MLP`` class
    and logs "Unknown MLP type" once per layer for a subclass; SwiGLUMLP takes the default TP
    group, which is the same group, so that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type: <class 'megatron.core.transformer.spec_utils")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_QuietUnknownMLP())


class SwiGLUMLP(MLP):
    """megatron's MLP with the gated SiLU fused on CUDA (``kernels.swiglu.fused_swiglu``, Triton):
    one kernel each way, and backward keeps fc1's output only (eager keeps SiLU(gate) as well);
    eager on CPU or with the kernels switched off (``kernels.ENABLED``). Anything beyond the
    plain Qwen2 case (bias, per-token scales, TE activations, clamping) goes to megatron's own
    forward."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        cfg = self.config
        if (per_token_scale is not None or not cfg.gated_linear_unit or cfg.activation_func is not F.silu
                or cfg.use_te_activation_func or getattr(cfg, "activation_func_clamp_value", None) is not None
                or getattr(cfg, "glu_linear_offset", 0.0) != 0.0):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        with scope("ualm.swiglu"):
            intermediate = fused_swiglu(intermediate)
        return self.linear_fc2(intermediate)


def qwen2_layer_spec(attention_backend: str = "auto", mask_cache: Optional[MaskCache] = None,
                     fp8: Optional[str] = None) -> ModuleSpec:
    """One Qwen2 transformer layer (pre-norm attention + pre-norm SwiGLU MLP). ``fp8``: None
    (bf16 GEMMs) or the FP8 scaling recipe of the four linear layers (``fp8.py``)."""
    column, row = linear_classes(fp8)
    core_attention = ModuleSpec(module=UALMCoreAttention,
                                params={"backend": attention_backend, "mask_cache": mask_cache})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp_submodule(SwiGLUMLP, MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def qwen2_block_spec(config, attention_backend: str = "auto", mask_cache: Optional[MaskCache] = None,
                     vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, plus the final RMSNorm.
    FP8 linear layers when ``transformer_config_from(..., fp8=recipe)`` made ``config``."""
    layer = qwen2_layer_spec(attention_backend, mask_cache, getattr(config, "ualm_fp8", None))
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=RMSNorm)
