"""How many encoder frames (placeholder rows) a continuous audio clip becomes.

The data tools write this count into every stored audio reference and the model's
encoder wrapper must produce exactly this many frames, so the rule lives in one place.

Qwen2.5-Omni audio tower (the default encoder): 128-bin log-mel at hop 160 (100 frames/s,
the trailing partial hop dropped as Whisper does), a stride-2 convolution, then stride-2
average pooling: 25 frames/s. Clips longer than the 30 s window are encoded window by
window, each window on its own, and the frames concatenated.
"""
from __future__ import annotations

SAMPLE_RATE = 16_000
HOP_LENGTH = 160
DEFAULT_WINDOW_SECONDS = 30.0
MIN_MEL_FRAMES = 3  # the smallest input that gives at least one output frame


def mel_frames(num_samples: int) -> int:
    return num_samples // HOP_LENGTH


def frames_of_mel(num_mel: int) -> int:
    """Output frames of the conv (stride 2) + avg-pool (stride 2) stack for num_mel inputs."""
    if num_mel < MIN_MEL_FRAMES:
        return 0
    after_conv = (num_mel - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def window_sizes(num_samples: int, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> list[int]:
    """Sample counts of the windows a clip is split into (the last may be shorter; a tail
    too short to give a frame is merged into nothing and dropped)."""
    window = int(round(window_seconds * SAMPLE_RATE))
    sizes = [min(window, num_samples - start) for start in range(0, num_samples, window)]
    return [s for s in sizes if frames_of_mel(mel_frames(s)) > 0]


def num_encoder_frames(num_samples: int, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> int:
    """Placeholder rows for a clip of num_samples at 16 kHz."""
    return sum(frames_of_mel(mel_frames(s)) for s in window_sizes(num_samples, window_seconds))
