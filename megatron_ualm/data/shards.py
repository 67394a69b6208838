"""Audio shard builder (SPEC section 2.1): AF3 / ETTA manifests -> indexed tars of 16 kHz clips.

File layout and index formats are documented in ``megatron_ualm.data.shard_reader``.

Shard k holds the manifest entries with ordinals [k * samples_per_shard, (k+1) * samples_per_shard)
across all manifests in the order given; rejected entries leave a shard short (the shard's
index lists them). The key of the entry with ordinal n is ``f"{n:010d}"``: unique, sorted in
manifest order, and free of dots (webdataset splits member names at the first dot).

Decoding runs in ``num_workers`` processes; the main process consumes results in manifest order
and writes the tars, so output bytes do not depend on the worker count. Tar headers carry
fixed mtime/uid/gid/names and nothing time-dependent is stored anywhere.

Resume: a shard whose tar, .sha256 and index exist, agree, hash correctly and carry the current
build fingerprint (config + manifest contents) is kept untouched and its entries are not
decoded again. Every file is written to a ``.tmp.<pid>`` name and renamed; a shard's index is
renamed last (it marks the shard complete) and the dataset index last of all.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from tqdm import tqdm

from megatron_ualm.audio.io import SAMPLE_RATE, AudioError, encode_audio, load_audio
from megatron_ualm.data.manifests import (
    DEFAULT_MAX_REJECT_FRACTION, GenerationRecord, Reject, RunSummary, UnderstandingRecord,
    detect_kind, iter_manifest,
)
from megatron_ualm.data.shard_reader import (
    FORMAT_VERSION, ShardReader, shard_name, verify_shard,
)
from megatron_ualm.fileutil import sha256_file, write_atomic
from megatron_ualm.procutil import die_with_parent

__all__ = ["DEFAULT_SAMPLES_PER_SHARD", "BuildResult", "ShardReader", "build_shards",
           "sample_key", "verify_shard"]

DEFAULT_SAMPLES_PER_SHARD = 10_000
_SHARD_RE = re.compile(r"^shard-(\d{6})\.(tar|tar\.sha256|index\.json)$")
_TMP_MARK = ".tmp."
_CHUNK = 8  # records per worker task: amortises IPC without hurting ordering latency


def sample_key(ordinal: int) -> str:
    return f"{ordinal:010d}"


# ----------------------------------------------------------------------------- file helpers

def _atomic_write(path: str, data: bytes) -> None:
    write_atomic(path, data, f"{path}{_TMP_MARK}{os.getpid()}")


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=None,
                       separators=(",", ":")) + "\n").encode("utf-8")


class _HashingWriter:
    """File wrapper that hashes what tarfile writes, so the checksum costs no second read."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self):
        return self.n


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: bytes depend only on names and contents (no clock, no user).
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


# ----------------------------------------------------------------------------- worker side

@dataclass
class _Result:
    ordinal: int
    key: str
    audio: bytes | None = None
    meta: bytes | None = None
    seconds: float = 0.0
    reject: dict | None = None
    decode_s: float = 0.0
    encode_s: float = 0.0


def _turns(turns) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in turns]


def _process_one(ordinal: int, item, audio_format: str) -> _Result:
    """Decode one manifest entry and encode it for the tar (runs in a worker process)."""
    key = sample_key(ordinal)
    if isinstance(item, Reject):
        return _Result(ordinal, key, reject=dict(item.to_json(), key=key))
    # CPU time, not wall time: the decode/ours split must not depend on neighbours' load.
    t0 = time.process_time()
    try:
        if isinstance(item, GenerationRecord):
            path, crop = item.location, [item.start_time, item.end_time]
            samples = load_audio(path, item.start_time, item.end_time)
        elif isinstance(item, UnderstandingRecord):
            path, crop = item.sound, None
            samples = load_audio(path)
        else:
            raise TypeError(f"{item.file}:{item.line}: text-only entries have no audio")
    except AudioError as e:
        rej = Reject(item.file, item.line, e.reason, f"{e.path}: {e.message}",
                     index=getattr(item, "index", None), key=key)
        return _Result(ordinal, key, reject=rej.to_json(), decode_s=time.process_time() - t0)
    t1 = time.process_time()
    meta = {"key": key, "kind": item.kind, "audio": path, "crop": crop,
            "num_samples": int(len(samples)), "sample_rate": SAMPLE_RATE,
            "duration": round(len(samples) / SAMPLE_RATE, 6),
            "source": {"file": item.file, "line": item.line}}
    if isinstance(item, GenerationRecord):
        meta.update(caption=item.caption, manifest_duration=item.duration,
                    manifest_sample_rate=item.sample_rate)
    else:
        meta.update(id=item.id, conversations=_turns(item.conversations),
                    manifest_duration=item.duration)
        meta["source"]["index"] = item.index
    audio = encode_audio(samples, audio_format)
    meta_b = _json_bytes(meta)
    return _Result(ordinal, key, audio, meta_b, len(samples) / SAMPLE_RATE,
                   decode_s=t1 - t0, encode_s=time.process_time() - t1)


def _process_chunk(args) -> list[_Result]:
    chunk, audio_format = args
    return [_process_one(o, it, audio_format) for o, it in chunk]


# ----------------------------------------------------------------------------- shard writer

class _ShardWriter:
    """Writes one shard: tar to a temp name while hashing, then tar, .sha256, index (renames)."""

    def __init__(self, out_dir: str, k: int, record_start: int, record_end: int,
                 audio_format: str, fingerprint: str):
        self.out_dir, self.k, self.fmt = out_dir, k, audio_format
        self.name = shard_name(k)
        self.tar_path = os.path.join(out_dir, self.name + ".tar")
        self.tmp = f"{self.tar_path}{_TMP_MARK}{os.getpid()}"
        self._file = open(self.tmp, "wb")
        self._hw = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hw, mode="w", format=tarfile.USTAR_FORMAT)
        self.index = {"format": "ualm-audio-shard-index", "version": FORMAT_VERSION,
                      "tar": self.name + ".tar", "audio_format": audio_format,
                      "fingerprint": fingerprint, "record_start": record_start,
                      "record_end": record_end, "num_samples": 0, "seconds": 0.0,
                      "members": [], "rejects": []}
        self._seconds = 0.0

    def _add(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        # After addfile, tar.offset points past the data and its padding to 512 bytes.
        offset = self._tar.offset - ((len(data) + 511) // 512) * 512
        self.index["members"].append([name, offset, len(data)])

    def add(self, r: _Result) -> None:
        if r.reject is not None:
            self.index["rejects"].append(r.reject)
            return
        self._add(f"{r.key}.{self.fmt}", r.audio)
        self._add(f"{r.key}.json", r.meta)
        self.index["num_samples"] += 1
        self._seconds += r.seconds

    def close(self) -> dict:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = self._hw.h.hexdigest()
        self.index.update(sha256=digest, tar_bytes=self._hw.n, seconds=round(self._seconds, 6))
        os.replace(self.tmp, self.tar_path)
        _atomic_write(self.tar_path + ".sha256", f"{digest}  {self.name}.tar\n".encode())
        _atomic_write(os.path.join(self.out_dir, self.name + ".index.json"),
                      _json_bytes(self.index))
        return self.index


# ----------------------------------------------------------------------------- builder

@dataclass
class BuildResult:
    summary: RunSummary
    index: dict
    shards_written: int = 0
    shards_reused: int = 0
    wall_s: float = 0.0
    # CPU seconds (process_time), so the split holds on a loaded machine:
    decode_s: float = 0.0  # summed over workers: load_audio (file read, decode, resample)
    encode_s: float = 0.0  # summed over workers: WAV/FLAC + JSON encoding
    write_s: float = 0.0  # main process: tar writing, hashing, renames (fsync waits excluded)
    bytes_written: int = 0
    exit_code: int = 0  # 1 when the reject fraction is above max_reject_fraction
    stats: dict = field(default_factory=dict)


def _manifest_entries(manifests, kind: str) -> list[dict]:
    entries = []
    for m in manifests:
        path, k = (m if isinstance(m, tuple) else (m, kind))
        path = os.path.abspath(os.fspath(path))
        if k == "auto":
            k = detect_kind(path) if os.path.exists(path) else "etta"
        if k not in ("af3", "etta"):
            raise ValueError(f"{path}: manifest kind {k!r} has no audio; shards take af3 or etta")
        sha = sha256_file(path) if os.path.exists(path) else None
        entries.append({"path": path, "kind": k, "sha256": sha})
    return entries


def _ordered_results(tasks: Iterable, num_workers: int, audio_format: str) -> Iterator[_Result]:
    """Process (ordinal, item) tasks, yielding results in task order with a bounded window."""
    def chunks():
        buf = []
        for t in tasks:
            buf.append(t)
            if len(buf) == _CHUNK:
                yield buf
                buf = []
        if buf:
            yield buf

    if num_workers <= 1:
        for c in chunks():
            yield from _process_chunk((c, audio_format))
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        window = 4 * num_workers  # chunks in flight: keeps workers busy, bounds memory
        for c in chunks():
            pending.append(pool.apply_async(_process_chunk, ((c, audio_format),)))
            if len(pending) >= window:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def build_shards(manifests, out_dir: str, kind: str = "auto",
                 samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, num_workers: int | None = None,
                 audio_format: str = "wav",
                 max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION,
                 progress: bool = True, verify_hashes: bool = True) -> BuildResult:
    """Build (or finish building) audio shards from AF3 / ETTA manifests into ``out_dir``.

    ``manifests``: paths, or (path, kind) pairs, read in order. Bad entries are rejected and
    listed, never raised. Returns a :class:`BuildResult`; ``result.exit_code`` is the
    reject-fraction verdict (``result.summary.finish(max_reject_fraction)`` prints and returns it).
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if audio_format not in ("wav", "flac"):
        raise ValueError(f"audio_format must be 'wav' or 'flac', got {audio_format!r}")
    t_start = time.perf_counter()
    num_workers = max(1, num_workers or os.cpu_count() or 1)
    os.makedirs(out_dir, exist_ok=True)
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), f"*{_TMP_MARK}*")):
        os.remove(tmp)  # leftovers of a crashed run
    entries = _manifest_entries(manifests, kind)
    fingerprint = hashlib.sha256(_json_bytes(
        {"version": FORMAT_VERSION, "samples_per_shard": samples_per_shard,
         "audio_format": audio_format, "sample_rate": SAMPLE_RATE,
         "manifests": entries})).hexdigest()
    reuse: dict[int, dict] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "shard-*.index.json"))):
        k = int(_SHARD_RE.match(os.path.basename(path)).group(1))
        index = verify_shard(out_dir, k, fingerprint, check_hash=verify_hashes)
        if index is not None:
            reuse[k] = index
    _drop_stale_dataset_index(out_dir, fingerprint, reuse)
    res = BuildResult(RunSummary("build_shards"), {})
    counter = {"records": 0}

    def tasks():
        ordinal = 0
        for e in entries:
            for item in iter_manifest(e["path"], e["kind"]):
                if ordinal // samples_per_shard not in reuse:
                    yield ordinal, item
                ordinal += 1
        counter["records"] = ordinal

    bar = tqdm(unit="clip", disable=not progress, desc="shards", smoothing=0.1)
    writer: _ShardWriter | None = None
    written: dict[int, dict] = {}
    for r in _ordered_results(tasks(), num_workers, audio_format):
        k = r.ordinal // samples_per_shard
        if writer is None or writer.k != k:
            t0 = time.process_time()
            if writer is not None:
                written[writer.k] = writer.close()
            writer = _ShardWriter(out_dir, k, k * samples_per_shard, (k + 1) * samples_per_shard,
                                  audio_format, fingerprint)
            res.write_s += time.process_time() - t0
        t0 = time.process_time()
        writer.add(r)
        res.write_s += time.process_time() - t0
        res.decode_s += r.decode_s
        res.encode_s += r.encode_s
        bar.update(1)
    if writer is not None:
        t0 = time.process_time()
        # The task generator is exhausted here, so the record count is known: the last
        # shard's range ends at it rather than at a multiple of samples_per_shard.
        writer.index["record_end"] = min(writer.index["record_end"], counter["records"])
        written[writer.k] = writer.close()
        res.write_s += time.process_time() - t0
    bar.close()

    num_records = counter["records"]
    num_shards = -(-num_records // samples_per_shard)
    for k in range(num_shards):
        index = written.get(k) or reuse.get(k)
        if index is None:  # cannot happen unless files vanished mid-run
            raise RuntimeError(f"{out_dir}: shard {k} was neither written nor reusable; re-run")
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "shard-*")):
        m = _SHARD_RE.match(os.path.basename(stale))
        if m and int(m.group(1)) >= num_shards:
            os.remove(stale)  # from an older build of a longer manifest
    res.index = _write_dataset_index(out_dir, entries, fingerprint, samples_per_shard,
                                     audio_format, num_records,
                                     [written.get(k) or reuse[k] for k in range(num_shards)],
                                     res.summary)
    res.shards_written, res.shards_reused = len(written), num_shards - len(written)
    res.bytes_written = sum(i["tar_bytes"] for i in written.values())
    res.wall_s = time.perf_counter() - t_start
    _fill_figures(res, len(written), num_workers)
    res.exit_code = res.summary.exit_code(max_reject_fraction)
    return res


def _drop_stale_dataset_index(out_dir: str, fingerprint: str, reuse: dict) -> None:
    """Remove index.json unless it describes exactly the verified shards of this build: while
    shards are rewritten, readers must fail loudly rather than mix old offsets with new tars."""
    path = os.path.join(out_dir, "index.json")
    try:
        with open(path, "rb") as f:
            old = json.loads(f.read())
        current = (old.get("fingerprint") == fingerprint
                   and all(k in reuse and reuse[k]["sha256"] == s["sha256"]
                           for k, s in enumerate(old.get("shards", []))))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        current = False
    if not current and os.path.exists(path):
        os.remove(path)


def _write_dataset_index(out_dir, entries, fingerprint, samples_per_shard, audio_format,
                         num_records, indexes, summary: RunSummary) -> dict:
    rejects = [r for index in indexes for r in index["rejects"]]
    by_reason = Counter(r["reason"] for r in rejects)
    _atomic_write(os.path.join(out_dir, "rejects.jsonl"),
                  b"".join(_json_bytes(r) for r in rejects))
    seconds = sum(i["seconds"] for i in indexes)
    index = {"format": "ualm-audio-shards", "version": FORMAT_VERSION,
             "sample_rate": SAMPLE_RATE, "audio_format": audio_format,
             "samples_per_shard": samples_per_shard, "fingerprint": fingerprint,
             "num_records": num_records, "num_samples": sum(i["num_samples"] for i in indexes),
             "hours": round(seconds / 3600, 6), "manifests": entries,
             "shards": [{"tar": i["tar"], "index": i["tar"][:-4] + ".index.json",
                         "sha256": i["sha256"], "tar_bytes": i["tar_bytes"],
                         "num_samples": i["num_samples"], "seconds": i["seconds"]}
                        for i in indexes],
             "rejects": {"file": "rejects.jsonl", "total": len(rejects),
                         "by_reason": dict(sorted(by_reason.items()))}}
    _atomic_write(os.path.join(out_dir, "index.json"), _json_bytes(index))
    summary.kept, summary.rejected = index["num_samples"], by_reason
    summary.rejects_file = os.path.join(out_dir, "rejects.jsonl")
    return index


def _fill_figures(res: BuildResult, written: int, num_workers: int) -> None:
    idx, wall = res.index, max(res.wall_s, 1e-9)
    work = res.decode_s + res.encode_s + res.write_s
    res.stats = {"clips": idx["num_samples"], "hours": idx["hours"], "wall_s": res.wall_s,
                 "clips_per_s": idx["num_samples"] / wall if written else 0.0,
                 "mb_per_s": res.bytes_written / 1e6 / wall, "decode_s": res.decode_s,
                 "encode_s": res.encode_s, "write_s": res.write_s,
                 "decode_share": res.decode_s / work if work else 0.0, "workers": num_workers}
    s = res.stats
    res.summary.figures.update({
        "clips": f"{s['clips']:,} ({s['hours']:.3f} h)",
        "shards": f"{len(idx['shards'])} ({written} written, {res.shards_reused} reused)",
        "speed": f"{s['clips_per_s']:.1f} clips/s, {s['mb_per_s']:.1f} MB/s written, "
                 f"{s['wall_s']:.1f} s wall, {num_workers} workers",
        "CPU": f"decode {s['decode_s']:.1f} s, encode {s['encode_s']:.1f} s (workers), "
               f"tar write {s['write_s']:.1f} s (main); decode share "
               f"{100 * s['decode_share']:.0f}%",
    })


