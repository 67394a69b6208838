"""HuggingFace <-> Megatron checkpoint conversion for UALM (SPEC section 7).

* ``hf_to_megatron.convert_hf_to_megatron``: Qwen2.5 HF directory -> initial UALM checkpoint.
* ``megatron_to_hf.convert_megatron_to_hf``: UALM checkpoint -> HF directory + UALM extras.
* ``megatron_to_hf.load_ualm_from_hf``: exported directory -> (UALMModel, UALMConfig).

Both directions stream (``dist_format``: megatron torch_dist read/written per tensor;
``hf_io``: lazy safetensors reads, streamed safetensors writes) and write their output
atomically (``output``). Refusals raise ``ConversionError``.
"""
from megatron_ualm.convert.errors import ConversionError


def __getattr__(name):  # keep `import megatron_ualm.convert` light (no torch.distributed.checkpoint)
    if name == "convert_hf_to_megatron":
        from megatron_ualm.convert.hf_to_megatron import convert_hf_to_megatron
        return convert_hf_to_megatron
    if name in ("convert_megatron_to_hf", "load_ualm_from_hf"):
        from megatron_ualm.convert import megatron_to_hf
        return getattr(megatron_to_hf, name)
    raise AttributeError(name)


__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf", "load_ualm_from_hf"]
