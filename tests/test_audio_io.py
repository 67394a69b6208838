"""load_audio: resampling, downmix, crops, error reasons; WAV/FLAC encoders."""
import os
import stat

import numpy as np
import pytest
import soundfile as sf

from megatron_ualm.audio.io import (
    SAMPLE_RATE, AudioError, decode_bytes, encode_audio, load_audio, quantize_pcm16, wav_bytes,
    write_wav,
)


def _sine(freq, sr, seconds, amp=0.5, phase=0.0):
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def _peak_freq(x, sr=SAMPLE_RATE):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]


def test_resample_and_downmix_44k_stereo_flac(tmp_path):
    sr = 44100
    left, right = _sine(1000, sr, 2.0, amp=0.6), _sine(1000, sr, 2.0, amp=0.2)
    path = tmp_path / "s.flac"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="PCM_16")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 2 * SAMPLE_RATE) <= 1
    assert abs(_peak_freq(y) - 1000) < 2
    # Downmix is the channel mean: amplitude (0.6 + 0.2) / 2.
    ref = _sine(1000, SAMPLE_RATE, 2.0, amp=0.4)[: len(y)]
    mid = slice(1000, len(y) - 1000)  # resampler edge transients
    assert np.max(np.abs(y[mid] - ref[mid])) < 2e-3


@pytest.mark.parametrize("sr", [8000, 22050, 48000])
def test_resample_rates(tmp_path, sr):
    path = tmp_path / f"s{sr}.wav"
    sf.write(path, _sine(440, sr, 1.0), sr, subtype="FLOAT")
    y = load_audio(path)
    assert abs(len(y) - SAMPLE_RATE) <= 1
    assert abs(_peak_freq(y) - 440) < 2


def test_16k_mono_wav_is_bit_exact(tmp_path):
    x = _sine(300, SAMPLE_RATE, 0.5)
    path = tmp_path / "x.wav"
    write_wav(path, x)
    np.testing.assert_array_equal(load_audio(path), quantize_pcm16(x) / np.float32(32768))
    assert wav_bytes(x) == path.read_bytes()
    # Stereo WAVs are interleaved and libsndfile reads them back.
    write_wav(path, np.stack([x, -x], axis=1))
    y, sr = sf.read(path, dtype="float32")
    assert sr == SAMPLE_RATE and y.shape == (len(x), 2)
    np.testing.assert_array_equal(y[:, 1], -y[:, 0])


def test_crop_reads_the_right_frames(tmp_path):
    # A ramp makes every sample's position visible.
    x = (np.arange(48000) / 48000 - 0.5).astype(np.float32)
    path = tmp_path / "ramp.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    y = load_audio(path, start_time=1.0, end_time=2.5)
    np.testing.assert_array_equal(y, x[16000:40000])
    # Open-ended crops.
    np.testing.assert_array_equal(load_audio(path, start_time=2.0), x[32000:])
    np.testing.assert_array_equal(load_audio(path, end_time=0.5), x[:8000])


def test_crop_with_resampling(tmp_path):
    sr = 44100
    path = tmp_path / "c.flac"
    sf.write(path, np.concatenate([np.zeros(sr, np.float32), _sine(2000, sr, 1.0)]), sr)
    y = load_audio(path, start_time=1.0, end_time=2.0)
    assert abs(len(y) - SAMPLE_RATE) <= 1 and abs(_peak_freq(y) - 2000) < 2


def test_crop_tolerance_clamps_small_overshoot(tmp_path):
    path = tmp_path / "x.wav"
    write_wav(path, _sine(440, SAMPLE_RATE, 1.0))
    assert len(load_audio(path, 0.5, 1.02)) == 8000


def _reason(path, **kw):
    with pytest.raises(AudioError) as e:
        load_audio(path, **kw)
    assert e.value.path == str(path)
    return e.value.reason


def test_error_reasons(tmp_path):
    good = tmp_path / "good.wav"
    write_wav(good, _sine(440, SAMPLE_RATE, 1.0))
    assert _reason(tmp_path / "nope.wav") == "missing_file"
    (tmp_path / "junk.wav").write_bytes(b"not audio at all " * 50)
    assert _reason(tmp_path / "junk.wav") == "unreadable"
    (tmp_path / "zero.wav").write_bytes(b"")
    assert _reason(tmp_path / "zero.wav") == "empty"
    data = good.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path / "cut.wav") == "truncated"
    assert _reason(good, start_time=2.0, end_time=3.0) == "crop_outside_file"
    assert _reason(good, start_time=0.5, end_time=1.5) == "crop_outside_file"
    assert _reason(good, start_time=0.5, end_time=0.5) == "empty"
    write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32))
    assert _reason(tmp_path / "silent.wav") == "silent"
    assert len(load_audio(tmp_path / "silent.wav", allow_silent=True)) == 16000
    sf.write(tmp_path / "hdr_only.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    assert _reason(tmp_path / "hdr_only.wav") == "empty"
    sf.write(tmp_path / "nan.wav", np.full(100, np.nan, np.float32), SAMPLE_RATE, subtype="FLOAT")
    assert _reason(tmp_path / "nan.wav") == "invalid_samples"


def test_truncated_flac(tmp_path):
    path = tmp_path / "x.flac"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32),
             SAMPLE_RATE)
    data = path.read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path / "cut.flac") == "truncated"


def test_ffmpeg_fallback_used_when_libsndfile_fails(tmp_path, monkeypatch):
    # A stand-in "ffmpeg" that emits 0.25 s of f32le samples proves the fallback path and its
    # argument handling without needing the real binary.
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nhead -c 16000 /dev/zero\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "odd.xyz").write_bytes(b"\x00" * 1000)
    y = load_audio(tmp_path / "odd.xyz", allow_silent=True)
    assert y.shape == (4000,) and y.dtype == np.float32


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_encode_decode_roundtrip(fmt):
    x = np.random.default_rng(1).uniform(-1.2, 1.2, 5000).astype(np.float32)
    y, sr = decode_bytes(encode_audio(x, fmt))
    assert sr == SAMPLE_RATE
    np.testing.assert_array_equal(y, quantize_pcm16(x) / np.float32(32768))
    assert encode_audio(x, fmt) == encode_audio(x, fmt)  # deterministic bytes
