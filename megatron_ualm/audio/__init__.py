"""Audio: decode anything to 16 kHz mono float32 (``io``), the encoder frame rule
(``frames``), the X-Codec wrapper (``codec``).

Names from ``io`` are loaded on first use, so ``audio.frames`` imports on machines without
soundfile (e.g. a bare GPU box running the model).
"""
SAMPLE_RATE = 16000
_IO_NAMES = ("AudioError", "decode_bytes", "encode_audio", "load_audio", "quantize_pcm16", "write_wav")


def __getattr__(name):
    if name in _IO_NAMES:
        from megatron_ualm.audio import io
        return getattr(io, name)
    raise AttributeError(f"module 'megatron_ualm.audio' has no attribute {name!r}")


__all__ = ["SAMPLE_RATE", *_IO_NAMES]
