"""Audio I/O: decode anything to 16 kHz mono float32, write 16-bit WAV, typed decode errors."""
from megatron_ualm.audio.io import (
    SAMPLE_RATE,
    AudioError,
    decode_bytes,
    encode_audio,
    load_audio,
    quantize_pcm16,
    write_wav,
)

__all__ = ["SAMPLE_RATE", "AudioError", "decode_bytes", "encode_audio", "load_audio",
           "quantize_pcm16", "write_wav"]
