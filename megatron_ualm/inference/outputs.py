"""Generated segments -> text and codec codes -> 16 kHz WAV files.

Audio: the delayed rows of a segment are undone (``formats.delay.undo_delay``) over the
frames for which every codebook is present -- all T frames when the segment ended, the
complete ones (rows - K + 1) when the row budget cut it -- and frames holding a pad code
are dropped before the codec decodes them. A clip the model listened to (reasoning) is
written as the waveform it heard.

Reasoning answers also get a ``transcript``: every part in order,
``{"type": "text", "text"}``, ``{"type": "audio", "wav", "frames", "duration_s"}`` and,
after a clip the model heard, ``{"type": "listen", "wav", "encoder_rows"}``.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megatron_ualm.audio.io import write_wav
from megatron_ualm.formats.delay import undo_delay
from megatron_ualm.formats.vocab import UnifiedVocab
from megatron_ualm.inference.state import Segment

SAMPLE_RATE = 16000


def segment_codes(segment: Segment, vocab: UnifiedVocab) -> np.ndarray:
    """Codec codes int64 [K, T'] of an audio segment (T' <= T: pad frames dropped)."""
    K = vocab.num_codebooks
    rows = np.asarray(segment.rows, dtype=np.int64).reshape(-1, K)
    frames = max(len(rows) - K + 1, 0)  # frames with every codebook present
    if segment.num_frames is not None:
        frames = min(frames, segment.num_frames)
    if frames == 0:
        return np.zeros((K, 0), dtype=np.int64)
    codes = vocab.unified_to_codes(undo_delay(rows, frames))
    return codes[:, (codes >= 0).all(axis=0)]


def segment_text(segment: Segment, vocab: UnifiedVocab, decode) -> str:
    """Text of a text segment; special tokens inside it are written by name."""
    parts, run = [], []
    for tok in segment.ids:
        if vocab.kind_of(int(tok)) == "text":
            run.append(vocab.unified_to_text(int(tok)))
            continue
        if run:
            parts.append(decode(run))
            run = []
        parts.append(vocab.special_name(int(tok)) if vocab.kind_of(int(tok)) == "special" else "")
    if run:
        parts.append(decode(run))
    return "".join(parts)


def describe(generation, vocab: UnifiedVocab, decode, codec=None, wav_prefix: Optional[str] = None) -> dict:
    """JSON-ready answer of one Generation: ``text`` (text segments joined), ``segments``
    ([{modality, text} or {modality, frames, duration_s, wav}]), ``wavs``, ``finish_reason``.
    WAVs are written as ``{wav_prefix}_{segment}.wav`` when a codec and a prefix are given."""
    segments, texts, wavs = [], [], []
    for i, seg in enumerate(generation.segments):
        if seg.modality == "text":
            text = segment_text(seg, vocab, decode)
            texts.append(text)
            segments.append({"modality": "text", "text": text, "tokens": len(seg.ids)})
            continue
        codes = segment_codes(seg, vocab)
        entry = {"modality": seg.modality, "frames": int(codes.shape[1]), "rows": len(seg.rows),
                 "complete": seg.end is not None}
        if seg.listened_rows is not None:
            entry["listened_rows"] = seg.listened_rows
        if codec is not None and wav_prefix is not None:
            path = f"{wav_prefix}_{i}.wav"
            if seg.waveform is not None:
                audio = seg.waveform
            elif codes.shape[1] > 0:
                audio = codec.decode(codes)
            else:
                audio = np.zeros(0, dtype=np.float32)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_wav(path, np.clip(audio, -1.0, 1.0), SAMPLE_RATE)
            entry["wav"] = path
            entry["duration_s"] = len(audio) / SAMPLE_RATE
            wavs.append(path)
        segments.append(entry)
    answer = {"text": "".join(texts), "segments": segments, "wavs": wavs,
              "finish_reason": generation.finish_reason, "generated_rows": int(len(generation.rows))}
    if generation.sequence is not None:
        answer["transcript"] = transcript(segments)
        answer["rounds"] = sum(seg["modality"] != "text" for seg in segments)
    return answer


def transcript(segments: list) -> list:
    """The parts of a reasoning answer in order (see the module doc) from ``describe``'s segments."""
    parts = []
    for seg in segments:
        if seg["modality"] == "text":
            parts.append({"type": "text", "text": seg["text"]})
            continue
        parts.append({"type": "audio", "wav": seg.get("wav"), "frames": seg["frames"],
                      "duration_s": seg.get("duration_s")})
        if "listened_rows" in seg:
            parts.append({"type": "listen", "wav": seg.get("wav"), "encoder_rows": seg["listened_rows"]})
    return parts


def format_transcript(record: dict) -> str:
    """Readable lines of one answer record's transcript (the CLI prints them)."""
    lines = [f"[{record['id']}] reasoning, {record.get('rounds', 0)} clip(s), "
             f"finish: {record.get('finish_reason')}"]
    for part in record.get("transcript", []):
        if part["type"] == "text":
            lines.append(f"  text:   {part['text']}")
        elif part["type"] == "audio":
            lines.append(f"  audio:  {part['wav']} ({part['frames']} frames)")
        else:
            lines.append(f"  listen: {part['wav']} ({part['encoder_rows']} encoder rows)")
    return "\n".join(lines)
