"""Preference JSONL (DPO, SPEC section 9) -> a paired tokenized dataset.

Input, one object a line (relative paths resolve against the JSONL's directory):

    {"prompt": "a dog barks", "chosen": "good.wav", "rejected": "codes/bad.npy", "id": "p1"}

``chosen`` / ``rejected`` are an audio file (anything ``audio.io.load_audio`` decodes) or a
``.npy`` int array [K, T] of codec codes (values in [0, C)), used as they are.

Output at prefix ``<out>``:

* ``<out>.chosen`` and ``<out>.rejected``: two ordinary ``caption_to_audio`` datasets
  (exactly what ``data/preprocess.py`` writes for that task) with the same number of
  documents; document i of both is pair i.
* ``<out>.pairs.json``: ``{"pairs": N, "source": [[file, line], ...], "build_fingerprint",
  "rejects": {reason: count}, ...}`` -- written last, it marks the build complete.
* ``<out>.rejects.jsonl``: one line per dropped pair (file, line, reason, side, message).
  A pair is dropped whole when either side fails, so the two datasets stay aligned.

The preprocessing machinery is reused as it is: the same chunks (resume by build
fingerprint, ``KILL_ENV`` for tests), the same ``ExampleBuilder`` for each side, the same
merge, so reruns are byte-identical and interrupted runs resume.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from tqdm import tqdm

from megatron_ualm.audio.io import MISSING_FILE, SAMPLE_RATE, AudioError
from megatron_ualm.data import indexed as I
from megatron_ualm.data.manifests import (
    DEFAULT_MAX_REJECT_FRACTION, GenerationRecord, Rejects, RunSummary, _Bad, _get,
    _iter_jsonl_records, _resolve,
)
from megatron_ualm.data.preprocess import (
    COUNT_KEYS, KILL_ENV, PreprocessConfig, Source, _base_meta, _counts, _fill_summary, _read_json,
    _resolve_vocab, _Worker, chunk_prefix, chunked, parts_dir,
)
from megatron_ualm.data.tasks import Item
from megatron_ualm.data.tokenizer import load_tokenizer
from megatron_ualm.fileutil import sha256_file

SIDES = ("chosen", "rejected")
BAD_CODES = "bad_codes"
TASK = "caption_to_audio"


@dataclass
class PreferenceConfig:
    inputs: list[str]                  # preference JSONL files, read in order
    out: str                           # output prefix: <out>.chosen, <out>.rejected, <out>.pairs.json
    tokenizer: str                     # local HF tokenizer directory
    codec: str                         # local HF XcodecModel directory, or "tiny"
    text_vocab_size: int | None = None
    prompt: str | None = None          # task prompt (default: the caption_to_audio template's)
    max_seconds: float | None = None   # reject pairs with a longer side
    chunk_size: int = 256              # pairs per resumable chunk
    workers: int = 2                   # decoding threads
    batch_size: int = 16               # codec batch
    device: str = "cpu"
    dtype: str = "fp32"
    tf32: bool = False
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION
    keep_parts: bool = False
    overwrite: bool = False
    progress: bool = True

    def side_config(self) -> PreprocessConfig:
        """The caption_to_audio preprocessing settings both sides are built with."""
        return PreprocessConfig(
            inputs=list(self.inputs), task=TASK, out=self.out, tokenizer=self.tokenizer, codec=self.codec,
            text_vocab_size=self.text_vocab_size, prompt=self.prompt, max_seconds=self.max_seconds,
            chunk_size=self.chunk_size, workers=self.workers, batch_size=self.batch_size,
            device=self.device, dtype=self.dtype, tf32=self.tf32,
            max_reject_fraction=self.max_reject_fraction, progress=self.progress)


def side_prefix(out: str, side: str) -> str:
    return f"{out}.{side}"


def pairs_path(out: str) -> str:
    return f"{out}.pairs.json"


# --- input --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairRecord:
    file: str
    line: int
    prompt: str
    chosen: str     # absolute path: audio file or .npy codes
    rejected: str
    id: str | None = None


def _parse_pair(path: str, line: int, obj: dict) -> PairRecord:
    prompt = _get(obj, "prompt", str)
    sides = [_get(obj, side, str) for side in SIDES]
    for side, value in zip(SIDES, sides):
        if not value.strip():
            raise _Bad("bad_value", f"field '{side}' is empty")
    ident = _get(obj, "id", (str, int), required=False)
    return PairRecord(path, line, prompt, _resolve(path, sides[0]), _resolve(path, sides[1]),
                      None if ident is None else str(ident))


def iter_pairs(path: str) -> Iterator:
    """Preference JSONL -> PairRecord / manifests.Reject per non-blank line, in file order."""
    return _iter_jsonl_records(path, _parse_pair)


def load_codes(path: str, num_codebooks: int, codebook_size: int) -> np.ndarray:
    """A ``.npy`` of codec codes -> int64 [K, T]; AudioError (reason missing_file / bad_codes)
    when it is absent, unreadable, not an integer [K, T] array or out of [0, C)."""
    if not os.path.isfile(path):
        raise AudioError(path, MISSING_FILE, "no such codes file (relative paths are resolved "
                         "against the JSONL's directory)")
    try:
        codes = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise AudioError(path, BAD_CODES, f"not a readable .npy array ({e})") from None
    if codes.dtype.kind not in "iu":
        raise AudioError(path, BAD_CODES, f"codes must be integers, got dtype {codes.dtype}")
    if codes.ndim != 2 or codes.shape[0] != num_codebooks:
        raise AudioError(path, BAD_CODES, f"codes must be [K={num_codebooks}, T], got {list(codes.shape)}")
    if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
        raise AudioError(path, BAD_CODES, f"codes outside [0, {codebook_size}): "
                         f"min {codes.min()}, max {codes.max()}")
    return codes.astype(np.int64)


@dataclass
class _Pair:
    ordinal: int
    record: PairRecord | None = None
    reject: object = None                     # manifests.Reject for a bad line


def _side_item(pair: _Pair, side: str, vocab) -> Item:
    if pair.reject is not None:
        return Item(pair.ordinal, reject=pair.reject)
    rec = pair.record
    path = getattr(rec, side)
    item = Item(pair.ordinal, record=GenerationRecord(rec.file, rec.line, path, 0.0, None, None,
                                                      rec.prompt, None))
    if path.lower().endswith(".npy"):
        item.codes = lambda: load_codes(path, vocab.num_codebooks, vocab.codebook_size)
    return item


# --- the run ------------------------------------------------------------------------------------
def _process_chunk(worker: _Worker, cfg: PreferenceConfig, c: int, pairs: list[_Pair], vocab,
                   base: dict) -> dict:
    """Both sides of one chunk; a pair with any failing side is dropped from both."""
    builder = worker.builder
    preps = {side: builder.prepare([_side_item(p, side, vocab) for p in pairs]) for side in SIDES}
    rejects, sources = [], []
    for i, pair in enumerate(pairs):
        failed = [(side, preps[side].outcome[i]) for side in SIDES if isinstance(preps[side].outcome[i], dict)]
        if not failed:
            sources.append([pair.record.file, pair.record.line])
            continue
        side, first = failed[0]
        rej = dict(first)
        if pair.reject is None:  # a manifest-level reject is the line's, not a side's
            rej["side"] = "both" if len(failed) == 2 else side
        rejects.append(rej)
        for s in SIDES:  # drop the pair from both sides before the codec runs
            preps[s].outcome[i] = rej
            preps[s].audio.pop(i, None)
            preps[s].codes.pop(i, None)
    metas = {}
    for side in SIDES:
        writer = I.DocumentWriter(chunk_prefix(side_prefix(cfg.out, side), c), with_audio=False)
        try:
            res = builder.finish(preps[side], writer)
            if res.kept != len(sources):
                raise RuntimeError(f"chunk {c}: {side} kept {res.kept} of {len(sources)} pairs")
            meta = dict(base, chunk=c, entries=len(pairs), kept=res.kept, counts=_counts(res.counts, res.kept))
            if side == SIDES[-1]:  # the last sidecar written marks the chunk done
                meta.update(pair_sources=sources, pair_rejects=rejects)
            writer.finalize(meta)
        except BaseException:
            writer.abort()
            raise
        metas[side] = meta
    return metas[SIDES[-1]]


def _chunk_metas(out: str, c: int) -> list[dict | None]:
    return [_read_json(I.meta_path(chunk_prefix(side_prefix(out, s), c))) for s in SIDES]


def run_preferences(cfg: PreferenceConfig) -> RunSummary:
    """Build ``<out>.chosen`` / ``<out>.rejected`` / ``<out>.pairs.json``; returns the summary."""
    t0 = time.perf_counter()
    pcfg = cfg.side_config()
    sources = []
    for path in cfg.inputs:
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such preference JSONL")
        sources.append(Source(path, "preference", sha256_file(path)))
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab, codec_identity = _resolve_vocab(pcfg, tokenizer)
    base = _base_meta(pcfg, sources, tokenizer, vocab, codec_identity)
    fingerprint = base["build_fingerprint"]
    summary = RunSummary(f"preference pairs -> {cfg.out}", rejects_file=f"{cfg.out}.rejects.jsonl")

    final = _read_json(pairs_path(cfg.out))
    if final is not None and not cfg.overwrite:
        if final.get("build_fingerprint") != fingerprint:
            raise FileExistsError(f"{cfg.out}: pairs built from other inputs/options exist; "
                                  "pass --overwrite to replace them or choose another --out")
        _summarize(summary, cfg.out, final, time.perf_counter() - t0, "already complete; nothing to do")
        return summary
    if cfg.overwrite:
        for path in [pairs_path(cfg.out)] + [f for s in SIDES for f in I.dataset_files(side_prefix(cfg.out, s))]:
            os.remove(path)

    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    done_now = skipped = num_chunks = 0
    bar = tqdm(desc="preference pairs", unit=" pairs", disable=not cfg.progress, dynamic_ncols=True)
    worker = None

    def chunk_done(c: int) -> bool:
        metas = _chunk_metas(cfg.out, c)
        if any(m is None for m in metas):
            return False
        if any(m.get("build_fingerprint") != fingerprint for m in metas):
            if cfg.overwrite:
                return False
            raise FileExistsError(f"{chunk_prefix(side_prefix(cfg.out, SIDES[0]), c)}: left by a run with "
                                  "other inputs/options; delete the .parts directories or pass --overwrite")
        return True

    for c, pairs in chunked(_iter_all(sources), cfg.chunk_size):
        num_chunks = c + 1
        if chunk_done(c):
            skipped += 1
            bar.update(len(pairs))
            continue
        if worker is None:
            worker = _Worker(pcfg, vocab, base)
        meta = _process_chunk(worker, cfg, c, pairs, vocab, base)
        done_now += 1
        bar.update(len(pairs))
        bar.set_postfix(pairs=meta["kept"], chunks=done_now + skipped)
        if kill_after and done_now >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if num_chunks == 0:
        raise ValueError(f"{', '.join(cfg.inputs)}: no preference lines")
    pairs = _merge(cfg, num_chunks, base)
    if not cfg.keep_parts:
        for side in SIDES:
            shutil.rmtree(parts_dir(side_prefix(cfg.out, side)), ignore_errors=True)
    _summarize(summary, cfg.out, pairs, time.perf_counter() - t0,
               f"{num_chunks} chunks: {done_now} written now, {skipped} resumed")
    return summary


def _iter_all(sources: list[Source]) -> Iterator[_Pair]:
    ordinal = 0
    for src in sources:
        for rec in iter_pairs(src.path):
            yield _Pair(ordinal, reject=rec) if hasattr(rec, "reason") else _Pair(ordinal, record=rec)
            ordinal += 1


def _merge(cfg: PreferenceConfig, num_chunks: int, base: dict) -> dict:
    """Concatenate the chunks of each side, write the rejects, then ``<out>.pairs.json``."""
    last = [_chunk_metas(cfg.out, c)[-1] for c in range(num_chunks)]
    with Rejects(f"{cfg.out}.rejects.jsonl") as rejects:
        for m in last:
            for r in m["pair_rejects"]:
                rejects.add(r)
        rejected = dict(sorted(rejects.counts.items()))
    kept = sum(m["kept"] for m in last)
    if kept == 0:
        raise ValueError(f"{cfg.out}: every pair was rejected (see {cfg.out}.rejects.jsonl)")
    for side in SIDES:
        prefix = side_prefix(cfg.out, side)
        parts = [chunk_prefix(prefix, c) for c in range(num_chunks)]
        counts: Counter = Counter()
        for p in parts:
            counts.update(_read_json(I.meta_path(p))["counts"])
        meta = dict(base, preference_side=side)
        meta["counts"] = {k: int(counts.get(k, 0)) for k in COUNT_KEYS}
        meta["kept"] = meta["counts"]["documents"]
        meta["rejected"] = rejected
        meta["audio_hours"] = round(meta["counts"]["audio_samples"] / SAMPLE_RATE / 3600, 6)
        I.concat_datasets(parts, prefix, meta)
    pairs = {"pairs": kept, "entries": sum(m["entries"] for m in last),
             "task": TASK, "build_fingerprint": base["build_fingerprint"], "rejects": rejected,
             "source": [s for m in last for s in m["pair_sources"]]}
    I.write_json_atomic(pairs_path(cfg.out), pairs)
    return pairs


def _summarize(summary: RunSummary, out: str, pairs: dict, seconds: float, note: str) -> None:
    meta = I.read_meta(side_prefix(out, "chosen"))
    _fill_summary(summary, side_prefix(out, "chosen"), meta, seconds, note)
    summary.kept = pairs["pairs"]
    summary.rejected = Counter(pairs["rejects"])
    summary.figures["output"] = f"{out}.{{chosen,rejected}}.{{bin,idx,meta.json}} + {out}.pairs.json"
    summary.figures["rows"] = summary.figures["rows"] + " (chosen side)"


# --- command line -------------------------------------------------------------------------------
def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Preference JSONL -> paired caption_to_audio datasets for DPO.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", dest="inputs", action="append", required=True,
                   help='preference JSONL ({"prompt", "chosen", "rejected"[, "id"]}); repeat for several')
    p.add_argument("--out", required=True, help="output prefix: <out>.chosen, <out>.rejected, <out>.pairs.json")
    p.add_argument("--tokenizer", help="local HF tokenizer directory (default: paths.tokenizer of --config)")
    p.add_argument("--codec", help="local HF XcodecModel directory ('tiny': random test codec); "
                                   "default: paths.codec of --config")
    p.add_argument("--config", help="UALM YAML: supplies tokenizer, codec and text_vocab_size")
    p.add_argument("--text-vocab-size", type=int, help="model text rows; must be >= the tokenizer length")
    p.add_argument("--prompt", help="task prompt text (default: the caption_to_audio template's)")
    p.add_argument("--max-seconds", type=float, help="drop pairs with a longer side")
    p.add_argument("--chunk-size", type=int, default=256, help="pairs per resumable chunk")
    p.add_argument("--workers", type=int, default=2, help="audio decoding threads")
    p.add_argument("--batch-size", type=int, default=16, help="codec batch (equal-length clips)")
    p.add_argument("--device", default="cpu", help="codec device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="codec dtype")
    p.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION)
    p.add_argument("--keep-parts", action="store_true", help="keep the .parts/ directories after merging")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if outputs exist")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    tokenizer, codec, text_rows = args.tokenizer, args.codec, args.text_vocab_size
    if args.config:
        from megatron_ualm.config import load_config
        ucfg = load_config(args.config)
        tokenizer = tokenizer or ucfg.paths.tokenizer
        codec = codec or ucfg.paths.codec
        text_rows = text_rows or ucfg.model.text_vocab_size
    if tokenizer is None or codec is None:
        print("error: --tokenizer and --codec (or a --config naming them) are required", file=sys.stderr)
        return 2
    cfg = PreferenceConfig(
        inputs=args.inputs, out=args.out, tokenizer=tokenizer, codec=codec, text_vocab_size=text_rows,
        prompt=args.prompt, max_seconds=args.max_seconds, chunk_size=args.chunk_size, workers=args.workers,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        max_reject_fraction=args.max_reject_fraction, keep_parts=args.keep_parts,
        overwrite=args.overwrite, progress=not args.no_progress)
    try:
        summary = run_preferences(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return summary.finish(cfg.max_reject_fraction)
