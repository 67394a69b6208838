"""A scorer for the demo's synthetic sounds (``data/demo.py``): how well a 16 kHz clip
matches what its caption says, from the caption's own numbers -- no model needed.

``score(captions, waveforms, sample_rate) -> list[float]`` (higher is better) is the
signature ``inference/preference_pairs.py`` takes (``--scorer megatron_ualm.data.demo_scorer:score``):

* pitched captions (tones, chords, beeps, chirps): the share of the clip's spectral energy
  near the caption's frequencies (within a semitone; a chirp: the band it sweeps);
* noise: how close the energy per octave (125 Hz - 8 kHz) rises to white (+1 octave-band
  doubling, i.e. a slope of 1) or pink noise (flat, slope 0), and how smoothly;
* clicks: how close the number of onsets per second is to the caption's rate;
* minus 0.1 per octave that the peak level is off the caption's "loud" (0.6) / "quiet" (0.15).
"""
from __future__ import annotations

import re

import numpy as np

from megatron_ualm.data.demo import NOTES

SEMITONE = 2 ** (1 / 12)
_HZ = re.compile(r"(\d+(?:\.\d+)?) Hz")
_CLICKS = re.compile(r"(\d+) per second")
_CHORD = re.compile(r"(major|minor) chord of sine tones built on ([A-G]\d)")


def target_bands(caption: str) -> list[tuple[float, float]] | None:
    """Frequency bands (Hz) the caption's sound puts its energy in; None for broadband ones."""
    chord = _CHORD.search(caption)
    if chord:
        third = 4 if chord.group(1) == "major" else 3
        root = NOTES[chord.group(2)]
        freqs = [root, root * 2 ** (third / 12), root * 2 ** (7 / 12)]
    else:
        freqs = [float(f) for f in _HZ.findall(caption)]
        if "chirp" in caption and len(freqs) >= 2:
            return [(min(freqs) / SEMITONE, max(freqs) * SEMITONE)]
    return [(f / SEMITONE, f * SEMITONE) for f in freqs] or None


def _score_one(caption: str, wave: np.ndarray, sample_rate: int) -> float:
    x = np.asarray(wave, dtype=np.float64)
    if x.size < 2 or not np.any(x):
        return -1.0
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2 + 1e-12
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    bands = target_bands(caption)
    clicks = _CLICKS.search(caption)
    if clicks:
        match = _click_match(x, sample_rate, int(clicks.group(1)))
    elif bands is None:  # noise
        match = _noise_match(power, freqs, slope=1.0 if "white" in caption else 0.0)
    else:
        inside = np.zeros(len(freqs), dtype=bool)
        for lo, hi in bands:
            inside |= (freqs >= lo) & (freqs <= hi)
        match = float(power[inside].sum() / power.sum())
    want = 0.15 if "quiet" in caption else 0.6
    level = abs(np.log2(max(float(np.abs(x).max()), 1e-6) / want))
    return match - 0.1 * level


def _noise_match(power: np.ndarray, freqs: np.ndarray, slope: float) -> float:
    edges = 125.0 * 2.0 ** np.arange(7)  # 125 Hz .. 8 kHz: six octave bands
    energy = np.array([power[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(edges, edges[1:])])
    steps = np.diff(np.log2(energy + 1e-12))
    return float(np.exp(-abs(steps.mean() - slope) - steps.std()))


def _click_match(x: np.ndarray, sample_rate: int, rate: int) -> float:
    hop = sample_rate // 200  # 5 ms frames
    frames = np.abs(x[: len(x) // hop * hop]).reshape(-1, hop).max(axis=1)
    loud = frames > 0.5 * frames.max()
    onsets = int(loud[0]) + int(np.count_nonzero(loud[1:] & ~loud[:-1]))
    found = onsets / (len(x) / sample_rate)
    return float(np.exp(-abs(found - rate) / rate))


def score(captions: list[str], waveforms: list[np.ndarray], sample_rate: int) -> list[float]:
    """One score per (caption, clip): higher when the clip sounds like the caption says."""
    return [_score_one(c, w, sample_rate) for c, w in zip(captions, waveforms)]
