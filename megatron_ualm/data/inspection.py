"""Human-readable views of a tokenized dataset: totals, length histogram, one example.

Used by ``data_tools/inspect_dataset.py``; everything here reads the dataset the way the
trainer does (``TokenizedDataset`` + ``formats.templates.layout``).
"""
from __future__ import annotations

import os

import numpy as np

from megatron_ualm.data.indexed import TokenizedDataset
from megatron_ualm.errors import UserError
from megatron_ualm.formats import templates as T
from megatron_ualm.formats import vocab as V
from megatron_ualm.formats.vocab import UnifiedVocab

SAMPLE_RATE = 16000


def dataset_vocab(ds: TokenizedDataset) -> UnifiedVocab:
    """The smallest vocabulary that lays out this dataset (for dumps)."""
    v = ds.meta["vocab"]
    text_rows = v.get("text_vocab_size") or v["tokenizer_length"]
    return UnifiedVocab(text_rows, v.get("num_codebooks") or 8, v.get("codebook_size") or 1024)


def length_histogram(rows: np.ndarray, width: int = 40) -> list[str]:
    """Power-of-two buckets of document lengths (LM rows) as text bars."""
    if not len(rows):
        return ["  (no documents)"]
    edges = [0] + [2 ** k for k in range(4, int(np.ceil(np.log2(max(rows.max(), 16)))) + 1)]
    if edges[-1] <= rows.max():
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(rows, bins=edges)
    peak = max(counts.max(), 1)
    lines = []
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        if n:
            lines.append(f"  [{lo:>7,}, {hi:>7,})  {n:>9,}  {'#' * max(1, int(width * n / peak))}")
    return lines


def report(ds: TokenizedDataset) -> str:
    m, c = ds.meta, ds.meta["counts"]
    rows = ds.rows()
    lines = [f"{ds.prefix}: task {m['task']}, {len(ds):,} documents, {ds.num_clips:,} stored clips",
             f"  rows      {c['rows']:,} LM rows ({c['target_rows']:,} predicted), "
             f"{c['sequences']:,} segments",
             f"  text      {c['text_tokens']:,} stream-0 tokens (text + special)"]
    if c["codec_frames"]:
        lines.append(f"  codec     {c['codec_frames']:,} frames x {m['vocab']['num_codebooks']} codebooks "
                     f"({c['codec_frames'] / 50 / 3600:.3f} h at 50 frames/s)")
    if c["placeholder_rows"]:
        lines.append(f"  encoder   {c['placeholder_rows']:,} placeholder rows for {c['clips']:,} clips")
    lines.append(f"  audio     {m.get('audio_hours', 0):.3f} h")
    if len(rows):
        lines.append(f"  length    min {rows.min():,} / mean {rows.mean():,.1f} / max {rows.max():,} rows "
                     f"per document")
    lines.append(f"  vocab     tokenizer {m['tokenizer'].get('path')} ({m['vocab']['tokenizer_length']:,} "
                 f"entries); codec {m['codec']['path'] if m.get('codec') else '-'}")
    kept, rej = m.get("kept", len(ds)), m.get("rejected", {})
    if rej:
        lines.append(f"  rejected  {sum(rej.values()):,} of {kept + sum(rej.values()):,}: "
                     + ", ".join(f"{k} {v:,}" for k, v in sorted(rej.items(), key=lambda kv: -kv[1])))
    lines.append("  sources   " + ", ".join(s["path"] for s in m.get("sources", [])))
    lines.append("  rows per document:")
    lines += length_histogram(rows)
    return "\n".join(lines)


def describe_example(ds: TokenizedDataset, index: int, decode_text=None) -> str:
    """One example, segment by segment: text decoded, codec frames and clips summarised."""
    segments = ds.segments(index)
    vocab = dataset_vocab(ds)
    ex = T.layout(segments, vocab)
    lines = [f"example {index} of {ds.prefix} ({ds.meta['task']}): {ex.num_rows} rows, "
             f"{len(segments)} segments (* = predicted)"]
    row = 0
    for seg in segments:
        name = T.MODE_NAMES[seg.mode]
        if seg.mode in (T.MODE_TEXT, T.MODE_TEXT_TARGET):
            n = len(seg.data)
            lines.append(f"  rows {row:>5}-{row + n - 1:<5} {name:<6} {_text(seg.data, vocab, decode_text)}")
        elif seg.mode in (T.MODE_CODEC, T.MODE_CODEC_TARGET):
            K = vocab.num_codebooks
            codes = seg.data.reshape(K, -1)
            n = codes.shape[1] + K - 1
            lines.append(f"  rows {row:>5}-{row + n - 1:<5} {name:<6} {K} x {codes.shape[1]} codec frames "
                         f"({codes.shape[1] / 50:.2f} s, delay pattern); codebook 0 starts "
                         f"{codes[0, :8].tolist()}")
        else:
            clip, samples, n = (int(x) for x in seg.data)
            lines.append(f"  rows {row:>5}-{row + n - 1:<5} {name:<6} clip {clip}: {samples / SAMPLE_RATE:.2f} s "
                         f"-> {n} placeholder rows")
        row += n
    return "\n".join(lines)


def _text(ids: np.ndarray, vocab: UnifiedVocab, decode_text) -> str:
    """Special tokens by name, runs of text ids decoded."""
    out, run = [], []

    def flush():
        if run:
            out.append(repr(decode_text(run)) if decode_text else f"<{len(run)} text tokens>")
            run.clear()
    for t in ids.tolist():
        if t < V.NUM_SPECIAL_SLOTS:
            flush()
            out.append(vocab.special_name(t))
        else:
            run.append(t - V.NUM_SPECIAL_SLOTS)
    flush()
    return " ".join(out)


def recorded_codec(ds: TokenizedDataset) -> str | None:
    """The codec the dataset was tokenized with, as its .meta.json records it ("tiny" or a
    directory); None if it holds no codec codes. A recorded directory that is gone is a
    UserError saying so and asking for --codec."""
    path = (ds.meta.get("codec") or {}).get("path")
    if path is None or path == "tiny" or os.path.isdir(path):
        return path
    raise UserError(f"{ds.prefix}.meta.json: the dataset was tokenized with the codec {path}, which is "
                    "not a directory here; pass --codec DIR (the same XcodecModel) to decode its audio")


def example_audio(ds: TokenizedDataset, index: int, codec=None) -> np.ndarray:
    """float32 16 kHz audio of an example: its first continuous clip, else its first codec
    segment decoded with ``codec`` (prefers the target)."""
    segments = ds.segments(index)
    refs = [s for s in segments if s.mode == T.MODE_AUDIO_REF]
    if refs:
        return ds.clip(int(refs[0].data[0]))
    codecs = sorted((s for s in segments if s.mode in (T.MODE_CODEC, T.MODE_CODEC_TARGET)),
                    key=lambda s: s.mode != T.MODE_CODEC_TARGET)
    if not codecs:
        raise UserError(f"{ds.prefix}: example {index} holds no audio; pick another --example for --wav-out")
    if codec is None:
        raise UserError(f"{ds.prefix}: example {index} holds codec codes and the dataset records no "
                        "codec; pass --codec DIR to decode them")
    return codec.decode(codecs[0].data.reshape(codec.num_codebooks, -1))
