"""A small, real and learnable demo corpus: synthesized sounds with true captions and Q&A.

``make_demo_data(out_dir, ...)`` writes::

    out_dir/audio/clip_00000.{wav,flac}   1-3 s sounds in mixed rates/channels/formats
    out_dir/etta.jsonl                    text-to-audio: caption + [start_time, end_time) crop
    out_dir/af3.json                      understanding: Audio-Flamingo-3 list, some multi-turn
    out_dir/text.jsonl                    text-only Q&A (arithmetic, facts about the sounds;
                                          never HELD_OUT_QUESTION, which the demo asks)
    out_dir/reasoning.jsonl               UALM-Reason conversations: plan, clip, listen, critique,
    out_dir/reasoning/*.wav               revised clip (16 kHz mono tones and noise bursts)

Every caption and answer is true of its clip by construction (a tone's pitch, a chirp's
direction, a beep count), so a model can actually learn the mapping. Files deliberately mix
16 kHz mono WAV, 44.1 kHz stereo FLAC, 22.05 kHz WAV, 48 kHz stereo 24-bit WAV to exercise the
resampler and downmix, and each sound sits between short faint-noise margins that the ETTA crop
cuts away. If ``espeak-ng`` is on PATH a few spoken sentences are added as transcription
examples. Output is a pure function of the arguments (seeded RNG, deterministic encoders).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from megatron_ualm.audio.io import write_wav

NOTES = {"A2": 110.0, "C3": 130.81, "E3": 164.81, "A3": 220.0, "C4": 261.63, "E4": 329.63,
         "G4": 392.0, "A4": 440.0, "C5": 523.25, "E5": 659.25, "A5": 880.0, "C6": 1046.5,
         "E6": 1318.5, "A6": 1760.0}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
KINDS = ("tone", "chord", "noise", "chirp", "beeps", "clicks")
# (extension, sample rate, channels, soundfile subtype): cycled over clips.
STORAGE = (("wav", 16000, 1, "PCM_16"), ("flac", 44100, 2, "PCM_16"), ("wav", 22050, 1, "PCM_16"),
           ("wav", 48000, 2, "PCM_24"), ("flac", 16000, 1, "PCM_16"))
# The demo's generation test asks HELD_OUT_QUESTION, which no training example contains: the
# text Q&A asks the same thing of other sweeping sounds ("Does an upward siren rise or fall in
# pitch?") and of downward chirps, so the answer needs upward -> rise, not a memorised line.
HELD_OUT_QUESTION = "Does an upward chirp rise or fall in pitch?"
HELD_OUT_ANSWER = "rise"
SWEEPS = ("chirp", "sweep", "glide", "siren", "slide")
SPEECH_LINES = ("the cat sat on the mat", "a high tone then a low tone",
                "listen to the rising chirp", "three short beeps", "white noise sounds like rain")


@dataclass
class DemoData:
    out_dir: str
    etta: str
    af3: str
    text: str
    num_clips: int
    num_text: int
    num_speech: int
    reasoning: str | None = None
    num_reasoning: int = 0


@dataclass
class _Clip:
    signal: np.ndarray  # float32 [n] at the clip's sample rate
    caption: str
    qa: list  # [(question, answer)]
    peak: float = 0.6  # peak amplitude the signal is normalised to


def _register(freq: float) -> str:
    return "low" if freq < 200 else ("high" if freq > 600 else "medium")


def _fade(x: np.ndarray, sr: int, ms: float = 10.0) -> np.ndarray:
    n = min(len(x) // 2, int(sr * ms / 1000))
    if n:
        ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _pink(rng, n: int) -> np.ndarray:
    # 1/f power: shape white noise in the frequency domain by 1/sqrt(f).
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return x / (np.abs(x).max() + 1e-9)


def _synth(kind: str, rng, sr: int, seconds: float) -> _Clip:
    """One sound of ``kind`` with a caption and Q&A that are true of it."""
    n = int(round(sr * seconds))
    t = np.arange(n, dtype=np.float64) / sr
    loud = bool(rng.integers(2))
    level = "loud" if loud else "quiet"
    level_qa = ("Is the sound loud or quiet?", level)
    clip = _describe(kind, rng, sr, seconds, t, n, level, level_qa)
    clip.peak = 0.6 if loud or kind == "clicks" else 0.15
    return clip


def _describe(kind, rng, sr, seconds, t, n, level, level_qa) -> _Clip:
    if kind == "tone":
        note = str(rng.choice(list(NOTES)))
        freq = NOTES[note]
        x = np.sin(2 * np.pi * freq * t)
        reg = _register(freq)
        return _Clip(x, f"a {level} {reg} sine tone at {note} ({freq:g} Hz)",
                     [("Is the pitch high, medium or low?", reg), ("Which note is played?", note),
                      ("Is the pitch rising, falling or steady?", "steady"), level_qa])
    if kind == "chord":
        root = str(rng.choice(["C3", "A3", "C4", "E4", "G4", "A4", "C5"]))
        quality = "major" if rng.integers(2) else "minor"
        ratios = (1.0, 2 ** (4 / 12) if quality == "major" else 2 ** (3 / 12), 2 ** (7 / 12))
        x = sum(np.sin(2 * np.pi * NOTES[root] * r * t) for r in ratios) / 3
        return _Clip(x, f"a {level} {quality} chord of sine tones built on {root}",
                     [("Is the chord major or minor?", quality),
                      ("How many notes are in the chord?", "three"), level_qa])
    if kind == "noise":
        color = "white" if rng.integers(2) else "pink"
        x = rng.uniform(-1, 1, n) if color == "white" else _pink(rng, n)
        return _Clip(x, f"a {level} burst of {color} noise",
                     [("Is this white noise or pink noise?", color),
                      ("Does the sound have a clear pitch?", "no"), level_qa])
    if kind == "chirp":
        up = bool(rng.integers(2))
        lo, hi = float(rng.choice([150.0, 200.0, 300.0])), float(rng.choice([1500.0, 2500.0, 4000.0]))
        f0, f1 = (lo, hi) if up else (hi, lo)
        k = np.log(f1 / f0) / seconds  # exponential sweep: equal time per octave
        x = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
        word = "upward" if up else "downward"
        return _Clip(x, f"a {level} {word} chirp sweeping from {f0:g} Hz to {f1:g} Hz",
                     [("Is the pitch rising or falling?", "rising" if up else "falling"),
                      ("Which way does the chirp go?", "up" if up else "down"), level_qa])
    if kind == "beeps":
        count = int(rng.integers(2, 7))
        freq = float(rng.choice([500.0, 1000.0, 2000.0]))
        x = np.zeros(n)
        slot = n // count
        beep = int(min(0.12 * sr, slot * 0.6))
        for i in range(count):
            s = i * slot + (slot - beep) // 2
            x[s:s + beep] = _fade(np.sin(2 * np.pi * freq * t[:beep]).astype(np.float32), sr, 5)
        return _Clip(x, f"{NUMBER_WORDS[count]} short {level} beeps at {freq:g} Hz",
                     [("How many beeps are there?", NUMBER_WORDS[count]),
                      ("Are the beeps high or low in pitch?", _register(freq)), level_qa])
    if kind == "clicks":
        rate = int(rng.choice([2, 4, 8]))
        x = np.zeros(n)
        period = sr // rate
        width = max(1, sr // 2000)
        for s in range(period // 2, n - width, period):
            x[s:s + width] = 1.0
        speed = {2: "slow", 4: "moderate", 8: "fast"}[rate]
        return _Clip(x, f"a {speed} train of clicks, {rate} per second",
                     [("How many clicks per second?", str(rate)),
                      ("Are the clicks slow, moderate or fast?", speed)])
    raise ValueError(f"unknown demo sound kind {kind!r}; use one of {KINDS}")


def _text_examples(rng, count: int) -> list[dict]:
    """Simple learnable text-only Q&A; some with a system turn or an earlier exchange."""
    out = []
    notes = list(NOTES)
    for i in range(count):
        form = i % 5
        if form == 0:
            a, b = (int(v) for v in rng.integers(0, 50, 2))
            q, ans = f"What is {a} + {b}?", str(a + b)
        elif form == 1:
            a, b = (int(v) for v in rng.integers(0, 13, 2))
            q, ans = f"What is {a} times {b}?", str(a * b)
        elif form == 2:
            n1, n2 = rng.choice(notes, 2, replace=False)
            hi = n1 if NOTES[n1] > NOTES[n2] else n2
            q, ans = f"Which note is higher, {n1} or {n2}?", str(hi)
        elif form == 3:
            note = str(rng.choice(notes))
            q, ans = f"What is the frequency of {note} in hertz?", f"{NOTES[note]:g}"
        else:
            q, ans = _sweep_question(rng)
        turns = [{"role": "user", "content": q}]
        if i % 11 == 0:  # an earlier exchange in the same conversation
            turns = [{"role": "user", "content": "What is 1 + 1?"},
                     {"role": "assistant", "content": "2"}] + turns
        if i % 7 == 0:
            turns.insert(0, {"role": "system", "content": "Answer with one word or number."})
        out.append({"input": turns, "output": ans})
    return out


def _sweep_question(rng) -> tuple[str, str]:
    """"Does an upward glide rise or fall in pitch?" and its answer, for any sweeping sound
    and direction but the held-out pair (upward, chirp)."""
    up = bool(rng.integers(2))
    sound = str(rng.choice(SWEEPS[1:] if up else SWEEPS))  # SWEEPS[0] is the held-out chirp
    q = f"Does {'an upward' if up else 'a downward'} {sound} rise or fall in pitch?"
    assert q != HELD_OUT_QUESTION
    return q, "rise" if up else "fall"


def _speech_clips(audio_dir: str) -> list[tuple[str, str]]:
    """(relative path, transcript) for espeak-ng sentences; none if espeak-ng is missing."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return []
    out = []
    for i, line in enumerate(SPEECH_LINES):
        name = f"speech_{i:02d}.wav"
        try:
            subprocess.run([espeak, "-w", os.path.join(audio_dir, name), "-s", "150", line],
                           check=True, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return out  # speech is optional; keep what worked
        out.append((f"audio/{name}", line))
    return out


# --- reasoning conversations (UALM-Reason) -----------------------------------------------------
REASONING_FLAWS = ("too_short", "too_long", "too_quiet", "too_loud", "pitch_low", "pitch_high", "none")
_REASON_NOTES = ("C4", "E4", "G4", "A4", "C5", "E5", "A5")  # an octave away stays in NOTES
_LEVEL_PEAK = {"loud": 0.6, "quiet": 0.15}


@dataclass(frozen=True)
class SoundRequest:
    """What a reasoning example asks for, or what one of its clips actually is."""
    kind: str          # "tone" | "noise"
    seconds: float
    level: str         # "loud" | "quiet"
    note: str | None = None  # tones only

    def caption(self) -> str:
        what = f"sine tone at {self.note}" if self.kind == "tone" else "burst of white noise"
        return f"a {self.level} {what}, {self.seconds:g} second{'' if self.seconds == 1 else 's'} long"

    def plan(self) -> str:
        pitch = (f"a steady pitch at {self.note} ({NOTES[self.note]:g} Hz)" if self.kind == "tone"
                 else "no clear pitch, a flat noise spectrum")
        return (f"Plan: {self.kind} with {pitch}, {self.level} (peak {_LEVEL_PEAK[self.level]:g}), "
                f"{self.seconds:g} s from start to end, no other sounds.")


REASONING_SYSTEM = "Plan, generate, listen, then revise if needed."  # the system turn of every conversation


def _flawed(req: SoundRequest, flaw: str) -> tuple[SoundRequest, str]:
    """(the first attempt, the critique that is true of it relative to ``req``)."""
    shift = lambda step: _REASON_NOTES[_REASON_NOTES.index(req.note) + step]  # noqa: E731
    if flaw == "too_short":
        got = SoundRequest(req.kind, req.seconds / 2, req.level, req.note)
        return got, f"The clip is too short: {got.seconds:g} s instead of {req.seconds:g} s. Trying again."
    if flaw == "too_long":
        got = SoundRequest(req.kind, req.seconds * 1.5, req.level, req.note)
        return got, f"The clip is too long: {got.seconds:g} s instead of {req.seconds:g} s. Trying again."
    if flaw in ("too_quiet", "too_loud"):
        got = SoundRequest(req.kind, req.seconds, "quiet" if flaw == "too_quiet" else "loud", req.note)
        return got, f"The clip is {flaw.replace('_', ' ')}; the request asks for a {req.level} sound. Trying again."
    if flaw in ("pitch_low", "pitch_high"):
        got = SoundRequest(req.kind, req.seconds, req.level, shift(-2 if flaw == "pitch_low" else 2))
        word = "low" if flaw == "pitch_low" else "high"
        return got, (f"The pitch is too {word}: {got.note} ({NOTES[got.note]:g} Hz) instead of "
                     f"{req.note} ({NOTES[req.note]:g} Hz). Trying again.")
    return req, "The clip matches the request."


def _request_sound(req: SoundRequest, rng) -> np.ndarray:
    """16 kHz mono samples of ``req``."""
    n = int(round(16000 * req.seconds))
    if req.kind == "tone":
        x = np.sin(2 * np.pi * NOTES[req.note] * np.arange(n) / 16000)
    else:
        x = rng.uniform(-1, 1, n)
    return _fade((x / (np.abs(x).max() + 1e-9) * _LEVEL_PEAK[req.level]).astype(np.float32), 16000)


def reasoning_example(i: int, seed: int = 0) -> tuple[dict, dict]:
    """Conversation ``i`` (JSON object, clip paths relative to the demo directory) and the clips
    it needs: {relative path: 16 kHz samples}."""
    rng = np.random.default_rng([seed, 2 << 30, i])
    kind = "tone" if i % 3 else "noise"
    flaws = REASONING_FLAWS if kind == "tone" else ("too_short", "too_long", "too_quiet", "too_loud", "none")
    flaw = flaws[(i // 3) % len(flaws)] if kind == "noise" else flaws[i % len(flaws)]
    note = str(rng.choice(_REASON_NOTES[2:-2])) if kind == "tone" else None
    req = SoundRequest(kind, float(rng.choice([1.0, 1.5, 2.0])), "quiet" if flaw == "too_loud" else
                       ("loud" if flaw == "too_quiet" else str(rng.choice(["loud", "quiet"]))), note)
    first, critique = _flawed(req, flaw)
    clips = {f"reasoning/r{i:05d}_a.wav": _request_sound(first, rng)}
    answer = [{"text": req.plan()}, {"audio_out": f"reasoning/r{i:05d}_a.wav"},
              {"audio_in": f"reasoning/r{i:05d}_a.wav"}, {"text": critique}]
    if flaw != "none":
        clips[f"reasoning/r{i:05d}_b.wav"] = _request_sound(req, rng)
        answer.append({"audio_out": f"reasoning/r{i:05d}_b.wav"})
    conv = {"id": f"reason-{i:05d}", "flaw": flaw,
            "messages": [{"role": "system", "content": REASONING_SYSTEM},
                         {"role": "user", "content": f"Generate {req.caption()}."},
                         {"role": "assistant", "content": answer}]}
    return conv, clips


def write_reasoning_data(out_dir: str, count: int, seed: int = 0) -> str:
    """Write ``count`` reasoning conversations to out_dir/reasoning.jsonl (+ their clips)."""
    os.makedirs(os.path.join(out_dir, "reasoning"), exist_ok=True)
    path = os.path.join(out_dir, "reasoning.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            conv, clips = reasoning_example(i, seed)
            for rel, samples in clips.items():
                write_wav(os.path.join(out_dir, rel), samples, 16000)
            f.write(json.dumps(conv) + "\n")
    return path


def reasoning_texts(path: str) -> list[str]:
    """Every text part of a reasoning JSONL (e.g. to train the demo's tiny tokenizer on)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for msg in json.loads(line)["messages"]:
                parts = msg["content"] if isinstance(msg["content"], list) else [{"text": msg["content"]}]
                texts += [p["text"] for p in parts if "text" in p]
    return texts


def make_demo_data(out_dir: str, num_clips: int = 200, min_seconds: float = 1.0,
                   max_seconds: float = 3.0, num_text: int = 200, seed: int = 0,
                   speech: bool = True, num_reasoning: int | None = None) -> DemoData:
    """Write the demo corpus to ``out_dir`` (see module docstring) and return its paths.
    ``num_reasoning`` reasoning conversations (default: num_clips // 2)."""
    if num_clips < 0 or not 0 < min_seconds <= max_seconds:
        raise ValueError(f"need num_clips >= 0 and 0 < min_seconds <= max_seconds, got "
                         f"{num_clips}, {min_seconds}, {max_seconds}")
    audio_dir = os.path.join(out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    etta, af3 = [], []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, i])  # per-clip stream: clip i ignores num_clips
        ext, sr, channels, subtype = STORAGE[i % len(STORAGE)]
        kind = KINDS[i % len(KINDS)]
        seconds = round(float(rng.uniform(min_seconds, max_seconds)), 2)
        clip = _synth(kind, rng, sr, seconds)
        body = _fade((clip.signal / (np.abs(clip.signal).max() + 1e-9) * clip.peak)
                     .astype(np.float32), sr)
        lead, tail = (round(float(v), 2) for v in rng.uniform(0.0, 0.5, 2))
        margin = lambda s: (rng.uniform(-1, 1, int(round(s * sr))) * 0.002).astype(np.float32)
        x = np.concatenate([margin(lead), body, margin(tail)])
        if channels == 2:  # unequal channel gains make the downmix observable
            x = np.stack([x, 0.8 * x], axis=1)
        rel = f"audio/clip_{i:05d}.{ext}"
        if ext == "wav" and subtype == "PCM_16":
            write_wav(os.path.join(out_dir, rel), x, sr)
        else:
            sf.write(os.path.join(out_dir, rel), x, sr, subtype=subtype)
        total = round(len(x) / sr, 6)
        etta.append({"location": rel, "start_time": lead, "end_time": round(lead + seconds, 6),
                     "duration": total, "caption": clip.caption, "sample_rate": sr})
        first_q = ("Describe the sound." if i % 3 else "What do you hear?")
        conv = [{"from": "human", "value": f"<sound>\n{first_q}"},
                {"from": "gpt", "value": clip.caption[0].upper() + clip.caption[1:] + "."}]
        n_follow = int(rng.integers(0, min(3, len(clip.qa)) + 1))
        for j in rng.permutation(len(clip.qa))[:n_follow]:
            q, a = clip.qa[int(j)]
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        af3.append({"id": f"demo-{i:05d}", "sound": rel, "duration": total,
                    "conversations": conv})
    speech_clips = _speech_clips(audio_dir) if speech else []
    for j, (rel, line) in enumerate(speech_clips):
        af3.append({"id": f"speech-{j:02d}", "sound": rel,
                    "conversations": [{"from": "human", "value": "<sound>\nTranscribe the speech."},
                                      {"from": "gpt", "value": line}]})
    paths = {name: os.path.join(out_dir, name) for name in ("etta.jsonl", "af3.json", "text.jsonl")}
    with open(paths["etta.jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in etta)
    with open(paths["af3.json"], "w", encoding="utf-8") as f:
        json.dump(af3, f, indent=1)
        f.write("\n")
    text = _text_examples(np.random.default_rng([seed, 1 << 30]), num_text)
    with open(paths["text.jsonl"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in text)
    num_reasoning = num_clips // 2 if num_reasoning is None else num_reasoning
    reasoning = write_reasoning_data(out_dir, num_reasoning, seed)
    return DemoData(out_dir, paths["etta.jsonl"], paths["af3.json"], paths["text.jsonl"],
                    num_clips, num_text, len(speech_clips), reasoning, num_reasoning)
