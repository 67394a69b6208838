"""The UALM model on megatron-core: one decoder for text, audio understanding and
text-to-audio (SPEC sections 3-5).

Modules: ``ualm_model`` (UALMModel), ``transformer_config`` (ModelConfig -> megatron
TransformerConfig), ``layer_spec`` (Qwen2 layer), ``attention`` (packed-aware core
attention backends), ``norm`` (sequence-parallel RMSNorm), ``rope`` (angles from position
ids, megatron's RoPE routed to the kernel), ``fp8`` (FP8 linear layers), ``embedding``
(multi-stream input), ``audio_encoder`` (log-mel, encoder, adapter), ``head``
(multi-stream output and cross entropy), ``loss``, ``batch`` (the batch contract),
``hf_adapter`` (HF Qwen2 <-> UALM state dicts), ``tp_layout`` (full <-> TP-sharded tensors).
The hand-written GPU kernels these call (RMSNorm, SwiGLU, RoPE, head cross entropy, weight
gradients, FP8 cast) and their one switch are in ``megatron_ualm.kernels``.
"""
