"""Audio decoding to the one format the rest of the system uses: 16 kHz mono float32 in [-1, 1].

Every audio file that enters the pipeline (SPEC section 1: any common format, rate and channel
count) goes through :func:`load_audio`. It decodes with libsndfile (``soundfile``), reading only
the frames of a crop when a crop is asked for, averages the channels, and resamples with soxr.
Files libsndfile cannot open are handed to an ``ffmpeg`` subprocess when one is on PATH.

Failures raise :class:`AudioError`, which carries a machine-readable ``reason`` so that data
tools can count and report bad inputs instead of crashing (see ``megatron_ualm.data.manifests``).

16-bit storage convention: a float ``x`` is stored as ``clip(round(x * 32768), -32768, 32767)``
and read back as ``int16 / 32768`` (libsndfile's read scale), so decoding a stored clip gives
exactly :func:`quantize_pcm16` of what was written. (libsndfile's own float->int16 writer
truncates toward -inf instead of rounding, which adds a -0.5 LSB bias; we never use it.)
"""
from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000

# Reason codes carried by AudioError; data tools group rejects by these.
MISSING_FILE = "missing_file"
UNREADABLE = "unreadable"
TRUNCATED = "truncated"
CROP_OUTSIDE_FILE = "crop_outside_file"
EMPTY = "empty"
SILENT = "silent"
INVALID_SAMPLES = "invalid_samples"
REASONS = (MISSING_FILE, UNREADABLE, TRUNCATED, CROP_OUTSIDE_FILE, EMPTY, SILENT, INVALID_SAMPLES)

# A crop may overshoot the file end by this much (seconds) before it counts as outside the
# file: manifests round durations, and encoders pad or trim a few milliseconds.
CROP_TOLERANCE_S = 0.05
# Peak amplitude at or below which a clip counts as silent (-80 dBFS, ~3 LSB of 16-bit audio).
SILENCE_PEAK = 1e-4

# libsndfile notes a header that claims more data than the file holds as
# "data : 32000 (should be 15978)" in its log; that is how a cut-off download looks.
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}


class AudioError(Exception):
    """A clip that cannot be used. ``reason`` is one of :data:`REASONS`."""

    def __init__(self, path: str, reason: str, message: str):
        self.path = str(path)
        self.reason = reason
        self.message = message
        super().__init__(f"{self.path}: [{reason}] {message}")

    def __reduce__(self):  # survive pickling across multiprocessing workers
        return (AudioError, (self.path, self.reason, self.message))


def quantize_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples [n] -> int16 [n] with the libsndfile convention (scale 32768, clipped)."""
    x = np.asarray(samples, dtype=np.float32)
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def dequantize_pcm16(pcm: np.ndarray) -> np.ndarray:
    """int16 [n] -> float32 [n] in [-1, 1): the inverse of :func:`quantize_pcm16` on its range."""
    return np.asarray(pcm, dtype=np.int16).astype(np.float32) / np.float32(32768.0)


def wav_bytes(samples: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """A canonical 44-byte-header 16-bit PCM WAV of float ``samples`` [n] or [n, channels].

    Written by hand rather than through libsndfile so the bytes depend on nothing but the
    samples (shards must be byte-identical across runs and machines).
    """
    x = np.asarray(samples, dtype=np.float32)
    channels = 1 if x.ndim == 1 else x.shape[1]
    pcm = quantize_pcm16(x).astype("<i2").tobytes()  # row-major = interleaved channels
    header = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sr, sr * 2 * channels,
                                    2 * channels, 16)
    header += b"data" + struct.pack("<I", len(pcm))
    return header + pcm


def flac_bytes(samples: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """Mono 16-bit FLAC of ``samples`` (float [n]); lossless w.r.t. :func:`quantize_pcm16`."""
    buf = io.BytesIO()
    sf.write(buf, quantize_pcm16(samples), sr, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def encode_audio(samples: np.ndarray, fmt: str = "wav", sr: int = SAMPLE_RATE) -> bytes:
    """Encode float [n] as ``fmt`` ("wav" or "flac") bytes at ``sr`` Hz."""
    if fmt == "wav":
        return wav_bytes(samples, sr)
    if fmt == "flac":
        return flac_bytes(samples, sr)
    raise ValueError(f"audio format must be 'wav' or 'flac', got {fmt!r}")


def decode_bytes(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC bytes written by :func:`encode_audio` -> (float32 [n], sample rate)."""
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return x.mean(axis=1) if x.shape[1] > 1 else x[:, 0], sr


def write_wav(path: str | os.PathLike, samples: np.ndarray, sr: int = SAMPLE_RATE) -> None:
    """Write float samples [n] (mono) or [n, channels] as a 16-bit PCM WAV file."""
    with open(path, "wb") as f:
        f.write(wav_bytes(samples, sr))


def _check_truncated(path: str, f: sf.SoundFile) -> None:
    for _, declared, actual in _SHORT_CHUNK.findall(f.extra_info or ""):
        declared, actual = int(declared), int(actual)
        if actual < declared and declared not in _STREAMING_SIZES:
            raise AudioError(path, TRUNCATED,
                             f"header declares {declared} data bytes but the file holds {actual}; "
                             "the file was cut off (re-download or re-encode it)")


def _crop_frames(path: str, n_frames: int, sr: int, start_time, end_time) -> tuple[int, int]:
    """Seconds -> [first, last) frame indices, validated against the file length."""
    duration = n_frames / sr
    start = 0.0 if start_time is None else float(start_time)
    end = duration if end_time is None else float(end_time)
    if not (np.isfinite(start) and np.isfinite(end)) or start < 0:
        raise AudioError(path, CROP_OUTSIDE_FILE, f"crop [{start}, {end}) s is not a valid range")
    if end <= start:
        raise AudioError(path, EMPTY, f"crop [{start}, {end}) s has no length")
    if start >= duration or end > duration + CROP_TOLERANCE_S:
        raise AudioError(path, CROP_OUTSIDE_FILE,
                         f"crop [{start:.3f}, {end:.3f}) s lies outside the file ({duration:.3f} s); "
                         "fix start_time/end_time in the manifest")
    first = int(round(start * sr))
    last = min(n_frames, int(round(end * sr)))
    return first, last


def _read_soundfile(path: str, start_time, end_time) -> tuple[np.ndarray, int]:
    """Decode with libsndfile -> (float32 [frames, channels], native rate). Raises sf errors on open."""
    with sf.SoundFile(path) as f:
        _check_truncated(path, f)
        sr = f.samplerate
        if f.frames <= 0:
            raise AudioError(path, EMPTY, "the file holds no audio frames")
        first, last = _crop_frames(path, f.frames, sr, start_time, end_time)
        try:
            if first > 0:
                if f.seekable():
                    f.seek(first)  # partial read: decode only the crop
                else:
                    f.read(first, dtype="float32", always_2d=True)
            x = f.read(last - first, dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            raise AudioError(path, TRUNCATED, f"decoding stopped early ({e}); the file is damaged "
                             "or cut off") from None
        if len(x) < last - first:
            raise AudioError(path, TRUNCATED, f"expected {last - first} frames from the header, "
                             f"decoded {len(x)}; the file is cut off")
    return x, sr


def _read_ffmpeg(path: str, start_time, end_time, reason: str) -> tuple[np.ndarray, int]:
    """Decode through an ffmpeg subprocess straight to 16 kHz mono float32."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError(path, UNREADABLE, f"libsndfile cannot read it ({reason}) and ffmpeg is not "
                         "on PATH; convert it to WAV/FLAC or install ffmpeg")
    cmd = [ffmpeg, "-nostdin", "-v", "error"]
    if start_time is not None:
        cmd += ["-ss", f"{float(start_time):.6f}"]
    cmd += ["-i", path]
    if end_time is not None:
        cmd += ["-t", f"{float(end_time) - float(start_time or 0.0):.6f}"]
    cmd += ["-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise AudioError(path, UNREADABLE, f"ffmpeg failed: {err[-1] if err else proc.returncode}")
    x = np.frombuffer(proc.stdout, dtype="<f4").astype(np.float32)
    if end_time is not None and len(x) == 0:
        raise AudioError(path, CROP_OUTSIDE_FILE, f"crop [{start_time}, {end_time}) s gave no audio")
    return x[:, None], SAMPLE_RATE


def to_mono_16k(x: np.ndarray, sr: int) -> np.ndarray:
    """float [frames, channels] or [frames] at ``sr`` Hz -> float32 [n] at 16 kHz, clipped to [-1, 1]."""
    x = np.asarray(x, dtype=np.float32)
    mono = x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x
    if sr != SAMPLE_RATE:
        # soxr "HQ": 20-bit precision, well below 16-bit storage noise, and ~3x faster than VHQ.
        mono = soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)
    return np.clip(mono, -1.0, 1.0)


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, sample rate, channels) from the header, without decoding."""
    info = sf.info(str(path))
    return info.frames, info.samplerate, info.channels


def load_audio(path: str | os.PathLike, start_time: float | None = None,
               end_time: float | None = None, allow_silent: bool = False) -> np.ndarray:
    """Decode ``path`` (optionally only [start_time, end_time) seconds) -> float32 [n], 16 kHz mono.

    Raises :class:`AudioError` with reason missing_file, unreadable, truncated,
    crop_outside_file, empty, invalid_samples (NaN/inf), or silent (peak <= 1e-4; pass
    ``allow_silent=True`` to accept such clips).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(path, MISSING_FILE, "no such file; check the path in the manifest "
                         "(relative paths are resolved against the manifest's directory)")
    if os.path.getsize(path) == 0:
        raise AudioError(path, EMPTY, "the file has zero bytes")
    try:
        x, sr = _read_soundfile(path, start_time, end_time)
    except sf.LibsndfileError as e:  # raised by open: format unknown to libsndfile
        x, sr = _read_ffmpeg(path, start_time, end_time, reason=str(e).split(":")[-1].strip())
    if x.shape[0] == 0:
        raise AudioError(path, EMPTY, "decoded to zero samples")
    if not np.isfinite(x).all():
        raise AudioError(path, INVALID_SAMPLES, "the audio holds NaN or infinite values")
    y = to_mono_16k(x, sr)
    if y.shape[0] == 0:
        raise AudioError(path, EMPTY, "shorter than one sample at 16 kHz")
    if not allow_silent and float(np.abs(y).max()) <= SILENCE_PEAK:
        raise AudioError(path, SILENT, f"peak amplitude <= {SILENCE_PEAK} (digital silence); "
                         "drop the clip or check the source")
    return y
