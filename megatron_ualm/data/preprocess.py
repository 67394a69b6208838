"""Raw manifests or audio shards -> one tokenized dataset (see ``data/indexed.py``).

The input stream (all inputs, in the order given) is cut into chunks of ``chunk_size``
entries by position: chunk c holds entries [c * chunk_size, (c + 1) * chunk_size), rejects
included. Each chunk becomes its own small dataset under ``<out>.parts/chunk-XXXXXX``
(written atomically, sidecar last), so:

* ranks split the work by chunk (rank r does the chunks with c % world_size == r), on one
  node or many (a shared filesystem), and the result does not depend on the world size;
* a re-run skips every chunk whose sidecar exists with the same build fingerprint (inputs'
  sha256, task, tokenizer, codec, options), so an interrupted run resumes;
* rank 0 concatenates the chunks in order once all exist (waiting for other ranks), so the
  merged output is byte-identical to that of an uninterrupted single-process run.

Rejects (manifest errors, undecodable audio, empty text, clips too short...) are written
with file, line and reason to ``<out>.rejects.jsonl``; the run fails (exit code 1) only when
their share of all entries is above ``max_reject_fraction``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Iterator

from tqdm import tqdm

from megatron_ualm.audio.io import SAMPLE_RATE, decode_bytes
from megatron_ualm.data import indexed as I
from megatron_ualm.data.reasoning import ReasoningBuilder
from megatron_ualm.data.tasks import (
    CODEC_TASKS, WAVE_TASKS, ExampleBuilder, Item, TaskOptions, record_from_shard_meta,
)
from megatron_ualm.data.manifests import (
    DEFAULT_MAX_REJECT_FRACTION, Rejects, RunSummary, detect_kind, iter_manifest,
)
from megatron_ualm.data.tokenizer import check_text_vocab, load_tokenizer, tokenizer_identity
from megatron_ualm.fileutil import sha256_file
from megatron_ualm.formats import templates as T
from megatron_ualm.formats.vocab import UnifiedVocab
from megatron_ualm.procutil import die_with_parent

DEFAULT_CHUNK_SIZE = {"text_only": 5000}
DEFAULT_AUDIO_CHUNK_SIZE = 512
KILL_ENV = "UALM_TEST_KILL_AFTER_CHUNKS"  # tests: SIGKILL this process after N new chunks


@dataclass
class PreprocessConfig:
    inputs: list[str]                  # manifests (JSONL / JSON) or shard directories
    task: str                          # one of formats.templates.TASKS
    out: str                           # output prefix: <out>.bin/.idx/.audio.*/.meta.json
    tokenizer: str                     # local HF tokenizer directory
    codec: str | None = None           # local HF XcodecModel directory, or "tiny"
    kind: str = "auto"                 # manifest kind: auto, text, af3, etta, reasoning
    text_vocab_size: int | None = None  # model rows; checked >= tokenizer length when given
    prompt: str | None = None
    prompt_seconds: float = 0.0
    max_seconds: float | None = None
    window_seconds: float = 30.0
    chunk_size: int | None = None      # entries per chunk (default 5000 text, 512 audio)
    workers: int = 2                   # text: processes; audio: decoding threads
    batch_size: int = 16               # codec batch (clips of equal length)
    device: str = "cpu"
    dtype: str = "fp32"
    tf32: bool = False                 # allow TF32 in the codec (faster; codes depend on batching)
    rank: int = 0
    world_size: int = 1
    max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION
    keep_parts: bool = False
    overwrite: bool = False
    merge_timeout: float = 7 * 24 * 3600.0  # rank 0 waits this long for other ranks' chunks
    progress: bool = True

    def __post_init__(self):
        if self.task not in T.TASKS:
            raise ValueError(f"--task {self.task!r}: use one of {', '.join(T.TASKS)}")
        if not self.inputs:
            raise ValueError("no inputs: pass manifests or shard directories")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"--rank {self.rank} must be in [0, --world-size {self.world_size})")
        if self.chunk_size is None:
            self.chunk_size = DEFAULT_CHUNK_SIZE.get(self.task, DEFAULT_AUDIO_CHUNK_SIZE)
        if self.chunk_size <= 0:
            raise ValueError(f"--chunk-size must be positive, got {self.chunk_size}")


# --- inputs -------------------------------------------------------------------------------------
@dataclass
class Source:
    path: str
    kind: str          # text | af3 | etta | shards
    sha256: str        # manifest content hash, or the shard dataset's fingerprint


def describe_inputs(inputs: list[str], kind: str, task: str) -> list[Source]:
    sources = []
    for path in inputs:
        path = os.path.abspath(path)
        if os.path.isdir(path):
            index = os.path.join(path, "index.json")
            if not os.path.exists(index):
                raise FileNotFoundError(f"{path}: a directory input must be an audio shard dataset "
                                        "(index.json missing; build it with data_tools/build_shards.py)")
            with open(index, encoding="utf-8") as f:
                fp = json.load(f).get("fingerprint") or sha256_file(index)
            src = Source(path, "shards", fp)
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such manifest")
        else:
            src = Source(path, detect_kind(path) if kind == "auto" else kind, sha256_file(path))
        need = {"text_only": ("text",), "reasoning": ("reasoning",)}.get(task, ("af3", "etta", "shards"))
        if src.kind not in need:
            what = {"text": "a text-only JSONL", "reasoning": "a reasoning JSONL ({\"messages\": [...]})"}
            raise ValueError(f"{path}: {src.kind} input cannot feed task {task}; it needs "
                             f"{what.get(need[0], 'ETTA/AF3 manifests or audio shards')}")
        sources.append(src)
    return sources


def iter_items(sources: list[Source]) -> Iterator[Item]:
    """Every entry of every input, numbered in order; shard entries are read lazily."""
    from megatron_ualm.data.shard_reader import ShardReader

    ordinal = 0
    for src in sources:
        if src.kind == "shards":
            for i in range(len(ShardReader(src.path))):
                yield Item(ordinal, load=None, key=None, record=("shard", src.path, i))
                ordinal += 1
            continue
        for rec in iter_manifest(src.path, src.kind):
            if hasattr(rec, "reason"):
                yield Item(ordinal, reject=rec)
            else:
                yield Item(ordinal, record=rec)
            ordinal += 1


_READERS: dict = {}


def _materialize(items: list[Item], threads: int) -> None:
    """Shard entries: one read each for (audio bytes, metadata) -> record + lazy decoder."""
    from megatron_ualm.data.shard_reader import ShardReader

    todo = [it for it in items if isinstance(it.record, tuple) and it.record[0] == "shard"]
    if not todo:
        return

    def read(it):
        _, path, i = it.record
        reader = _READERS.get(path) or _READERS.setdefault(path, ShardReader(path))
        return it, reader.read_raw(i)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for it, (key, audio, meta) in pool.map(read, todo):
            it.key, it.record = key, record_from_shard_meta(json.loads(meta))
            it.load = (lambda b: lambda: decode_bytes(b)[0])(audio)


def chunked(items: Iterator[Item], size: int) -> Iterator[tuple[int, list[Item]]]:
    chunk: list[Item] = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield it.ordinal // size, chunk
            chunk = []
    if chunk:
        yield chunk[0].ordinal // size, chunk


# --- one chunk ------------------------------------------------------------------------------------
def parts_dir(out: str) -> str:
    return f"{out}.parts"


def chunk_prefix(out: str, c: int) -> str:
    return os.path.join(parts_dir(out), f"chunk-{c:06d}")


class _Worker:
    """Holds the tokenizer / codec / builder; one per process."""

    def __init__(self, cfg: PreprocessConfig, vocab: UnifiedVocab, base_meta: dict):
        self.cfg, self.base_meta = cfg, base_meta
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        codec = None
        if cfg.task in CODEC_TASKS:
            from megatron_ualm.audio.codec import Codec
            codec = Codec(cfg.codec, device=cfg.device, dtype=cfg.dtype, allow_tf32=cfg.tf32)
        opts = TaskOptions(cfg.task, cfg.prompt, cfg.prompt_seconds, cfg.max_seconds, cfg.window_seconds)
        builder = ReasoningBuilder if cfg.task == "reasoning" else ExampleBuilder
        self.builder = builder(opts, self.tokenizer, vocab, codec, cfg.batch_size, cfg.workers)

    def run(self, c: int, items: list[Item]) -> dict:
        return self.finish(self.prepare(c, items))

    def prepare(self, c: int, items: list[Item]):
        _materialize(items, self.cfg.workers)
        return c, self.builder.prepare(items)

    def finish(self, prepared) -> dict:
        c, prep = prepared
        prefix = chunk_prefix(self.cfg.out, c)
        writer = I.DocumentWriter(prefix, with_audio=self.cfg.task in WAVE_TASKS)
        try:
            res = self.builder.finish(prep, writer)
            meta = dict(self.base_meta, chunk=c, entries=len(prep.items), kept=res.kept,
                        counts=_counts(res.counts, res.kept), reject_list=res.rejects)
            writer.finalize(meta)
        except BaseException:
            writer.abort()
            raise
        return meta


_WORKER: _Worker | None = None


def _init_worker(parent_pid, cfg, vocab, base_meta):
    global _WORKER
    die_with_parent(parent_pid)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER = _Worker(cfg, vocab, base_meta)


def _run_in_worker(c, items):
    return _WORKER.run(c, items)


COUNT_KEYS = ("documents", "sequences", "clips", "rows", "text_tokens", "codec_frames",
              "placeholder_rows", "target_rows", "audio_samples")


def _counts(counter: Counter, kept: int) -> dict:
    out = {k: int(counter.get(k, 0)) for k in COUNT_KEYS}
    out["documents"] = kept
    return out


# --- the run --------------------------------------------------------------------------------------
def _base_meta(cfg: PreprocessConfig, sources: list[Source], tokenizer, vocab: UnifiedVocab,
               codec_identity: dict | None) -> dict:
    uses_codec = cfg.task in CODEC_TASKS
    options = {"prompt": cfg.prompt, "prompt_seconds": cfg.prompt_seconds,
               "max_seconds": cfg.max_seconds, "chunk_size": cfg.chunk_size}
    meta = {
        "format": I.FORMAT_NAME, "version": I.FORMAT_VERSION, "task": cfg.task,
        "vocab": {"text_vocab_size": cfg.text_vocab_size, "tokenizer_length": len(tokenizer),
                  "num_codebooks": vocab.num_codebooks if uses_codec else None,
                  "codebook_size": vocab.codebook_size if uses_codec else None},
        "tokenizer": tokenizer_identity(tokenizer, cfg.tokenizer),
        "codec": codec_identity,
        "sample_rate": SAMPLE_RATE,
        "encoder_window_seconds": cfg.window_seconds if cfg.task in WAVE_TASKS else None,
        "options": options,
        "sources": [asdict(s) for s in sources],
    }
    fp_obj = {k: meta[k] for k in ("version", "task", "vocab", "tokenizer", "codec",
                                   "encoder_window_seconds", "options", "sources")}
    meta["build_fingerprint"] = hashlib.sha256(json.dumps(fp_obj, sort_keys=True).encode()).hexdigest()
    return meta


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _resolve_vocab(cfg: PreprocessConfig, tokenizer):
    """(UnifiedVocab used to validate/build, codec identity or None)."""
    text_rows = cfg.text_vocab_size or len(tokenizer)
    check_text_vocab(tokenizer, text_rows, where=f"tokenizer {cfg.tokenizer}")
    if cfg.task in CODEC_TASKS:
        if cfg.codec is None:
            raise ValueError(f"task {cfg.task} tokenizes audio: pass --codec (a local XcodecModel "
                             "directory, or 'tiny' for a random test codec)")
        from megatron_ualm.audio.codec import codec_config
        xc = codec_config(cfg.codec)  # K, C and hop from the config; weights load in the worker
        k, c = int(xc.num_quantizers), int(xc.codebook_size)
        ident = {"path": cfg.codec if cfg.codec == "tiny" else os.path.abspath(cfg.codec),
                 "num_codebooks": k, "codebook_size": c, "hop_length": int(xc.hop_length),
                 "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.dtype],
                 "tf32": cfg.tf32}
        return UnifiedVocab(text_rows, k, c), ident
    return UnifiedVocab(text_rows, 8, 1024), None


def run_preprocess(cfg: PreprocessConfig) -> RunSummary:
    """Process this rank's chunks, then (rank 0) merge. Returns the run summary."""
    t0 = time.perf_counter()
    sources = describe_inputs(cfg.inputs, cfg.kind, cfg.task)
    tokenizer = load_tokenizer(cfg.tokenizer)
    vocab, codec_identity = _resolve_vocab(cfg, tokenizer)
    base = _base_meta(cfg, sources, tokenizer, vocab, codec_identity)
    summary = RunSummary(f"preprocess {cfg.task} -> {cfg.out}", rejects_file=f"{cfg.out}.rejects.jsonl")

    final = _read_json(I.meta_path(cfg.out))
    if final is not None and not cfg.overwrite:
        if final.get("build_fingerprint") != base["build_fingerprint"]:
            raise FileExistsError(f"{cfg.out}: a dataset built from other inputs/options exists; "
                                  "pass --overwrite to replace it or choose another --out")
        _fill_summary(summary, cfg.out, final, time.perf_counter() - t0, note="already complete; nothing to do")
        return summary
    if cfg.overwrite and cfg.rank == 0:
        for path in I.dataset_files(cfg.out):
            os.remove(path)
    os.makedirs(parts_dir(cfg.out), exist_ok=True)

    mine = lambda c: c % cfg.world_size == cfg.rank  # noqa: E731
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    done_now = 0
    skipped = 0
    num_chunks = 0
    bar = tqdm(desc=f"{cfg.task} rank {cfg.rank}", unit=" entries", disable=not cfg.progress,
               dynamic_ncols=True)

    def chunk_done(c: int) -> bool:
        meta = _read_json(I.meta_path(chunk_prefix(cfg.out, c)))
        if meta is None:
            return False
        if meta.get("build_fingerprint") != base["build_fingerprint"]:
            if cfg.overwrite:
                return False
            raise FileExistsError(f"{chunk_prefix(cfg.out, c)}: left by a run with other inputs/options; "
                                  f"delete {parts_dir(cfg.out)} or pass --overwrite")
        return True

    def todo() -> Iterator[tuple[int, list[Item]]]:
        nonlocal num_chunks, skipped
        for c, items in chunked(iter_items(sources), cfg.chunk_size):
            num_chunks = c + 1
            if not mine(c):
                continue
            if chunk_done(c):
                skipped += 1
                bar.update(len(items))
                continue
            yield c, items

    def finished(meta: dict):
        nonlocal done_now
        done_now += 1
        bar.update(meta["entries"])
        bar.set_postfix(kept=meta["kept"], chunks=done_now + skipped)
        if kill_after and done_now >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    use_pool = cfg.task == "text_only" and cfg.workers > 1
    if use_pool:
        with ProcessPoolExecutor(cfg.workers, initializer=_init_worker,
                                 initargs=(os.getpid(), cfg, vocab, base)) as pool:
            pending = set()
            for c, items in todo():
                pending.add(pool.submit(_run_in_worker, c, items))
                if len(pending) >= 2 * cfg.workers:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        finished(f.result())
            for f in pending:
                finished(f.result())
    else:
        # decode chunk c+1 on a thread while the codec (GPU) works on chunk c
        worker = _Worker(cfg, vocab, base)
        with ThreadPoolExecutor(1) as ahead:
            current = None
            for c, items in todo():
                upcoming = ahead.submit(worker.prepare, c, items)
                if current is not None:
                    finished(worker.finish(current.result()))
                current = upcoming
            if current is not None:
                finished(worker.finish(current.result()))
    bar.close()

    if cfg.rank != 0:
        summary.figures["chunks"] = f"{done_now} written, {skipped} already done (rank {cfg.rank}); rank 0 merges"
        return summary
    wait_for_chunks(cfg, num_chunks, chunk_done)
    merged = merge_chunks(cfg, num_chunks, base)
    if not cfg.keep_parts:  # every chunk is merged; whatever else is there is a leftover too
        shutil.rmtree(parts_dir(cfg.out), ignore_errors=True)
    _fill_summary(summary, cfg.out, merged, time.perf_counter() - t0,
                  note=f"{num_chunks} chunks: {done_now} written now, {skipped} resumed")
    return summary


def wait_for_chunks(cfg: PreprocessConfig, num_chunks: int, chunk_done) -> None:
    missing = [c for c in range(num_chunks) if not chunk_done(c)]
    if not missing:
        return
    deadline = time.time() + cfg.merge_timeout
    bar = tqdm(total=num_chunks, initial=num_chunks - len(missing), desc="waiting for other ranks",
               unit=" chunks", disable=not cfg.progress)
    while missing:
        if time.time() > deadline:
            raise TimeoutError(f"{len(missing)} chunks (e.g. {chunk_prefix(cfg.out, missing[0])}) are "
                               f"still missing after {cfg.merge_timeout:.0f} s; re-run the ranks that "
                               "failed, then re-run rank 0 to merge")
        time.sleep(5.0)
        still = [c for c in missing if not chunk_done(c)]
        bar.update(len(missing) - len(still))
        missing = still
    bar.close()


def merge_chunks(cfg: PreprocessConfig, num_chunks: int, base: dict) -> dict:
    """Concatenate chunk datasets in order into cfg.out; write the rejects file; return the sidecar."""
    prefixes = [chunk_prefix(cfg.out, c) for c in range(num_chunks)]
    metas = [_read_json(I.meta_path(p)) for p in prefixes]
    counts: Counter = Counter()
    rejected: Counter = Counter()
    with Rejects(f"{cfg.out}.rejects.jsonl") as rejects:
        for m in metas:
            counts.update(m["counts"])
            for r in m["reject_list"]:
                rejects.add(r)
        rejected.update(rejects.counts)
    meta = dict(base)
    meta["counts"] = {k: int(counts.get(k, 0)) for k in COUNT_KEYS}
    meta["kept"] = meta["counts"]["documents"]
    meta["rejected"] = dict(sorted(rejected.items()))
    meta["audio_hours"] = round(meta["counts"]["audio_samples"] / SAMPLE_RATE / 3600, 6)
    if meta["kept"] == 0:
        raise ValueError(f"{cfg.out}: every entry was rejected (see {cfg.out}.rejects.jsonl)")
    I.concat_datasets(prefixes, cfg.out, meta)
    return meta


def _fill_summary(summary: RunSummary, out: str, meta: dict, seconds: float, note: str) -> None:
    c = meta["counts"]
    summary.kept = meta["kept"]
    summary.rejected = Counter(meta.get("rejected", {}))
    f = summary.figures
    f["output"] = f"{out}.{{bin,idx{',audio.bin,audio.idx' if c['clips'] else ''},meta.json}}"
    f["rows"] = f"{c['rows']:,} LM rows ({c['target_rows']:,} predicted), {c['sequences']:,} segments"
    f["text"] = f"{c['text_tokens']:,} stream-0 tokens (text + special)"
    if meta.get("codec"):
        f["codec"] = f"{c['codec_frames']:,} frames x {meta['vocab']['num_codebooks']} codebooks"
    if c["clips"]:
        f["waveforms"] = f"{c['clips']:,} clips, {c['placeholder_rows']:,} placeholder rows"
    if c["audio_samples"]:
        f["audio"] = f"{c['audio_samples'] / SAMPLE_RATE / 3600:.3f} h"
    f["time"] = (f"{seconds:.1f} s: {summary.kept / max(seconds, 1e-9):,.0f} docs/s, "
                 f"{c['rows'] / max(seconds, 1e-9):,.0f} rows/s")
    f["chunks"] = note


# --- command line (shared by data_tools/preprocess_audio.py and preprocess_text.py) ---------------
def add_arguments(p, text_only: bool = False) -> None:
    p.add_argument("--input", "--manifest", dest="inputs", action="append", required=True,
                   help="manifest (text JSONL, AF3 JSON, ETTA JSONL) or audio shard directory; "
                        "repeat for several, read in order")
    if not text_only:
        p.add_argument("--task", required=True, choices=[t for t in T.TASKS if t != "text_only"] + ["text_only"])
        p.add_argument("--kind", choices=("auto", "text", "af3", "etta", "reasoning"), default="auto",
                       help="manifest kind of every --input (auto: detect per file)")
        p.add_argument("--codec", help="local HF XcodecModel directory ('tiny': random test codec); "
                                       "default: paths.codec of --config")
        p.add_argument("--prompt", help="task prompt text (default: the template's)")
        p.add_argument("--prompt-seconds", type=float, default=0.0,
                       help="audio_only: seconds of context before the target")
        p.add_argument("--max-seconds", type=float, help="reject longer clips")
        p.add_argument("--window-seconds", type=float,
                       help="audio encoder window (default: model.encoder.window_seconds or 30)")
        p.add_argument("--device", default="cpu", help="codec device: cpu, cuda, cuda:N "
                       "(cuda under torchrun means cuda:LOCAL_RANK)")
        p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="codec dtype")
        p.add_argument("--batch-size", type=int, default=16, help="codec batch (equal-length clips)")
        p.add_argument("--codec-tf32", action="store_true",
                       help="allow TF32 in fp32 codec runs on GPU (~1.6x faster; a clip's codes then "
                            "depend slightly on its batch)")
    p.add_argument("--out", required=True, help="output prefix: <out>.bin/.idx/.meta.json (+ .audio.*)")
    p.add_argument("--tokenizer", help="local HF tokenizer directory (default: paths.tokenizer of --config)")
    p.add_argument("--config", help="UALM YAML: supplies tokenizer, codec, text_vocab_size, K, C to check")
    p.add_argument("--text-vocab-size", type=int, help="model text rows; must be >= the tokenizer length")
    p.add_argument("--chunk-size", type=int, help="entries per resumable chunk (default 5000 text, 512 audio)")
    p.add_argument("--workers", type=int, default=2,
                   help="text: tokenizer processes; audio: decoding threads")
    p.add_argument("--rank", type=int, help="this process's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, help="number of ranks (default: $WORLD_SIZE or 1)")
    p.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION)
    p.add_argument("--merge-timeout", type=float, default=7 * 24 * 3600.0,
                   help="seconds rank 0 waits for the other ranks' chunks before giving up")
    p.add_argument("--keep-parts", action="store_true", help="keep <out>.parts/ after merging")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if outputs exist")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args, text_only: bool = False) -> PreprocessConfig:
    tokenizer, codec, text_rows, window, model = args.tokenizer, getattr(args, "codec", None), \
        args.text_vocab_size, getattr(args, "window_seconds", None), None
    if args.config:
        from megatron_ualm.config import load_config
        ucfg = load_config(args.config)
        model = ucfg.model
        tokenizer = tokenizer or ucfg.paths.tokenizer
        codec = codec or ucfg.paths.codec
        text_rows = text_rows or model.text_vocab_size
        window = window or model.encoder.window_seconds
    if tokenizer is None:
        raise SystemExit("error: --tokenizer (or paths.tokenizer in --config) is required")
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    device = getattr(args, "device", "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    cfg = PreprocessConfig(
        inputs=args.inputs, task="text_only" if text_only else args.task, out=args.out,
        tokenizer=tokenizer, codec=codec, kind="text" if text_only else args.kind,
        text_vocab_size=text_rows, prompt=getattr(args, "prompt", None),
        prompt_seconds=getattr(args, "prompt_seconds", 0.0), max_seconds=getattr(args, "max_seconds", None),
        window_seconds=window or 30.0, chunk_size=args.chunk_size, workers=args.workers,
        batch_size=getattr(args, "batch_size", 16), device=device, dtype=getattr(args, "dtype", "fp32"),
        tf32=getattr(args, "codec_tf32", False),
        rank=rank, world_size=world, max_reject_fraction=args.max_reject_fraction,
        keep_parts=args.keep_parts, overwrite=args.overwrite, merge_timeout=args.merge_timeout,
        progress=not args.no_progress)
    cfg.model_check = model  # checked against the codec in main()
    return cfg


def main(argv=None, text_only: bool = False) -> int:
    import argparse
    doc = ("Text-only JSONL -> tokenized dataset." if text_only else
           "Raw manifests or audio shards -> tokenized dataset for one task.")
    p = argparse.ArgumentParser(description=doc)
    add_arguments(p, text_only)
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args, text_only)
        model = cfg.__dict__.pop("model_check", None)
        summary = run_preprocess(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model is not None and summary.kept:
        meta = I.read_meta(cfg.out) if cfg.rank == 0 else None
        if meta is not None:
            I.check_meta(meta, cfg.out, model.vocab(), None)
    return summary.finish(cfg.max_reject_fraction)
