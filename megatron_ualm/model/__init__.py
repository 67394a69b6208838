"""The UALM model on megatron-core: one decoder for text, audio understanding and
text-to-audio (SPEC sections 3-5).

Modules: ``ualm_model`` (UALMModel), ``transformer_config`` (ModelConfig -> megatron
TransformerConfig), ``layer_spec`` (Qwen2 layer), ``attention`` (packed-aware core
attention backends), ``norm`` (sequence-parallel RMSNorm), ``rope``, ``swiglu`` (each with
Triton kernels for training), ``fusions`` (compiled elementwise paths), ``embedding``
(multi-stream input), ``audio_encoder`` (log-mel, encoder, adapter), ``head``
(multi-stream output and cross entropy), ``loss``, ``batch`` (the batch contract),
``hf_adapter`` (HF Qwen2 <-> UALM state dicts), ``tp_layout`` (full <-> TP-sharded tensors).
"""
