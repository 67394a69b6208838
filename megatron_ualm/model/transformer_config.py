"""ModelConfig + ParallelConfig -> megatron's ``TransformerConfig`` for the Qwen2 decoder.

Qwen2 in megatron terms: RMSNorm, gated SiLU MLP (``gated_linear_unit`` with fc1 = [gate; up]),
no bias on any linear except QKV (``add_bias_linear=False, add_qkv_bias=True``), grouped-query
attention, no dropout. RoPE is applied by the model (see ``rope.py``), so the base is not here.

Activation recomputation:
* ``"full"``: every layer's input is checkpointed and the layer recomputed in backward
  (``recompute_granularity='full'``, uniform, one layer per chunk).
* ``"selective"``: with the unfused attention backend, megatron's default (recompute core
  attention, whose score matrix dominates memory); with fused kernels (sdpa/flex/te) the
  attention keeps no score matrix, so the SwiGLU MLP is recomputed instead.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import TransformerConfig

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def transformer_config_from(model_cfg, parallel_cfg=None, precision: str = "fp32", *,
                            use_cpu_initialization: Optional[bool] = None,
                            perform_initialization: bool = True,
                            wgrad_fusion: bool = False, fp8: Optional[str] = None) -> TransformerConfig:
    """Build the megatron ``TransformerConfig`` of the UALM decoder.

    model_cfg: ``megatron_ualm.config.ModelConfig`` (sizes, init std, recompute, backend).
    parallel_cfg: ``megatron_ualm.config.ParallelConfig`` or None (everything 1).
    precision: "bf16" | "fp16" | "fp32"; sets ``params_dtype``/``pipeline_dtype`` and the
        bf16/fp16 flags megatron's ``Float16Module`` and optimizer read.
    use_cpu_initialization: create and initialise weights on CPU; default: when CUDA is absent.
    wgrad_fusion: linear layers accumulate weight gradients straight into the fp32
        ``main_grad`` buffers (``kernels/wgrad.py``); only for models wrapped in megatron's DDP,
        whose trainable weights all have ``main_grad``.
    fp8: None, or the FP8 scaling recipe ("delayed" | "current") of the decoder's linear
        layers (``fp8.py``); kept as ``config.ualm_fp8`` for the layer spec (megatron's own
        ``fp8`` field means TransformerEngine and stays off).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} not in {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    tp = getattr(parallel_cfg, "tensor_parallel", 1) if parallel_cfg is not None else 1
    pp = getattr(parallel_cfg, "pipeline_parallel", 1) if parallel_cfg is not None else 1
    vpp = getattr(parallel_cfg, "virtual_pipeline_parallel", None) if parallel_cfg is not None else None
    cp = getattr(parallel_cfg, "context_parallel", 1) if parallel_cfg is not None else 1
    first_stage = getattr(parallel_cfg, "first_stage_layers", None) if pp > 1 else None
    sp = bool(getattr(parallel_cfg, "sequence_parallel", False)) and tp > 1
    if cp != 1:
        raise NotImplementedError("context parallelism is not implemented for the UALM model")
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    if wgrad_fusion:
        from megatron_ualm.kernels import wgrad as _wgrad
        _wgrad.install()

    kv_channels = model_cfg.kv_channels or model_cfg.hidden_size // model_cfg.num_attention_heads
    recompute = dict(recompute_granularity=None)
    if model_cfg.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model_cfg.recompute == "selective":
        modules = ["core_attn"] if model_cfg.attention_backend == "unfused" else ["mlp"]
        recompute = dict(recompute_granularity="selective", recompute_modules=modules)
    elif model_cfg.recompute != "none":
        raise ValueError(f"recompute {model_cfg.recompute!r} not in ('none', 'selective', 'full')")

    config = TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=bool(model_cfg.qkv_bias),
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        # megatron's fused kernels need apex/TE; the plain PyTorch paths are used instead
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=wgrad_fusion,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        num_layers_in_first_pipeline_stage=first_stage,
        # The interleaved schedule sends activations forward and gradients backward in one
        # exchange. megatron's batched p2p (batch_isend_irecv, the default) posts send_prev
        # before send_next while the receiver posts recv_prev before recv_next: with PP=2
        # the previous and next stage are the same rank, so the two same-shaped messages
        # match the wrong receives (gloo and ordered transports) and a stage gets a gradient
        # as its input. The unbatched path orders them per rank parity and uses two groups.
        batch_p2p_comm=vpp is None,
        sequence_parallel=sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        **recompute,
    )
    config.ualm_fp8 = fp8
    return config
