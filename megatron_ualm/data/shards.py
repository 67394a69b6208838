"""Audio shards (SPEC section 2.1): manifests -> uncompressed tars of 16 kHz mono clips + indexes.

Layout of a dataset directory::

    shard-000000.tar            ustar archive; per sample "<key>.wav" (or .flac) then "<key>.json"
    shard-000000.tar.sha256     "<hex>  shard-000000.tar" (sha256sum -c format)
    shard-000000.index.json     per-shard index, see below; written last = the shard is complete
    rejects.jsonl               every rejected entry: file, line, index, key, reason, message
    index.json                  dataset index, written last of all

Shard k holds the manifest entries with ordinals [k * samples_per_shard, (k+1) * samples_per_shard)
across all manifests in the order given; rejected entries leave a shard short. The key of the
entry with ordinal n is ``f"{n:010d}"``, so keys are unique, sort in manifest order and have no
dots (webdataset splits the member name at the first dot).

Shard index (``shard-XXXXXX.index.json``)::

    {"format": "ualm-audio-shard-index", "version": 1, "tar": "shard-000000.tar",
     "tar_bytes": int, "sha256": hex, "fingerprint": hex (build config + manifest contents),
     "audio_format": "wav"|"flac", "record_start": int, "record_end": int,
     "num_samples": int, "seconds": float,
     "members": [[name, data_offset, size], ...],   # 2 per sample: audio then json
     "rejects": [reject objects]}

``data_offset`` is the byte offset of the member's data in the tar; sample i's audio is
members[2i], its metadata members[2i+1], which follows the audio directly, so both come back
with one positioned read (:class:`ShardReader`).

Dataset index (``index.json``)::

    {"format": "ualm-audio-shards", "version": 1, "sample_rate": 16000, "audio_format": ...,
     "samples_per_shard": int, "fingerprint": hex, "num_records": int, "num_samples": int,
     "hours": float, "manifests": [{"path", "kind", "sha256"}],
     "shards": [{"tar", "index", "sha256", "tar_bytes", "num_samples", "seconds"}],
     "rejects": {"file": "rejects.jsonl", "total": int, "by_reason": {reason: n}}}

Builds are deterministic (fixed tar headers, results consumed in manifest order, nothing
time-dependent stored) and resumable: a shard whose three files exist and verify against the
current fingerprint is kept; everything is written to a temp name and renamed.
"""
from __future__ import annotations

import bisect
import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import tarfile
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megatron_ualm.audio.io import SAMPLE_RATE, AudioError, decode_bytes, encode_audio, load_audio
from megatron_ualm.data.manifests import (
    DEFAULT_MAX_REJECT_FRACTION, GenerationRecord, Reject, RunSummary, UnderstandingRecord,
    detect_kind, iter_manifest,
)

FORMAT_VERSION = 1
DEFAULT_SAMPLES_PER_SHARD = 10_000
_SHARD_RE = re.compile(r"^shard-(\d{6})\.(tar|tar\.sha256|index\.json)$")
_TMP_MARK = ".tmp."
_CHUNK = 8  # records per worker task: amortises IPC without hurting ordering latency


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def sample_key(ordinal: int) -> str:
    return f"{ordinal:010d}"


# ----------------------------------------------------------------------------- file helpers

def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, indent=None,
                       separators=(",", ":")) + "\n").encode("utf-8")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
    t0 = time.perf_counter()
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
        return _Result(ordinal, key, reject=rej.to_json(), decode_s=time.perf_counter() - t0)
    t1 = time.perf_counter()
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
                   decode_s=t1 - t0, encode_s=time.perf_counter() - t1)


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


def load_shard_index(dataset_dir: str, k: int) -> dict:
    with open(os.path.join(dataset_dir, shard_name(k) + ".index.json"), "rb") as f:
        return json.loads(f.read())


def verify_shard(dataset_dir: str, k: int, fingerprint: str | None = None,
                 check_hash: bool = True) -> dict | None:
    """The shard's index if tar, .sha256 and index exist and agree (and the tar hashes to the
    recorded sha256 when ``check_hash``), else None. ``fingerprint``, if given, must match."""
    base = os.path.join(dataset_dir, shard_name(k))
    try:
        index = load_shard_index(dataset_dir, k)
        with open(base + ".tar.sha256", "r", encoding="utf-8") as f:
            recorded = f.read().split()[0]
        size = os.path.getsize(base + ".tar")
    except (OSError, ValueError, IndexError):
        return None
    if index.get("version") != FORMAT_VERSION or recorded != index.get("sha256"):
        return None
    if size != index.get("tar_bytes") or (fingerprint and index.get("fingerprint") != fingerprint):
        return None
    if check_hash and _sha256_file(base + ".tar") != recorded:
        return None
    return index


# ----------------------------------------------------------------------------- builder

@dataclass
class BuildResult:
    summary: RunSummary
    index: dict
    shards_written: int = 0
    shards_reused: int = 0
    wall_s: float = 0.0
    decode_s: float = 0.0  # summed over workers: load_audio (file read, decode, resample)
    encode_s: float = 0.0  # summed over workers: WAV/FLAC + JSON encoding
    write_s: float = 0.0  # main process: tar writing, hashing, fsync, renames
    bytes_written: int = 0
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
        sha = _sha256_file(path) if os.path.exists(path) else None
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
    with ctx.Pool(num_workers) as pool:
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
    listed, never raised. Returns a :class:`BuildResult`; ``result.summary.exit_code(...)`` is
    the reject-fraction verdict.
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
            t0 = time.perf_counter()
            if writer is not None:
                written[writer.k] = writer.close()
            writer = _ShardWriter(out_dir, k, k * samples_per_shard, (k + 1) * samples_per_shard,
                                  audio_format, fingerprint)
            res.write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.add(r)
        res.write_s += time.perf_counter() - t0
        res.decode_s += r.decode_s
        res.encode_s += r.encode_s
        bar.update(1)
    if writer is not None:
        t0 = time.perf_counter()
        # The task generator is exhausted here, so the record count is known: the last
        # shard's range ends at it rather than at a multiple of samples_per_shard.
        writer.index["record_end"] = min(writer.index["record_end"], counter["records"])
        written[writer.k] = writer.close()
        res.write_s += time.perf_counter() - t0
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
    return res


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
        "time": f"decode {s['decode_s']:.1f} s, encode {s['encode_s']:.1f} s (worker CPU), "
                f"tar write {s['write_s']:.1f} s; decode share {100 * s['decode_share']:.0f}%",
    })


# ----------------------------------------------------------------------------- reader

class ShardReader:
    """Random access to a shard dataset: ``get(i) -> (key, float32 [n] at 16 kHz, meta dict)``.

    Each ``get`` is one positioned read (``os.pread``) of the audio member plus the metadata
    member that follows it. Per-shard indexes load lazily; file descriptors are cached (LRU),
    and pread keeps the reader safe to share between threads and forked workers.
    """

    def __init__(self, dataset_dir: str, max_open: int = 64):
        self.dir = os.fspath(dataset_dir)
        with open(os.path.join(self.dir, "index.json"), "rb") as f:
            self.index = json.loads(f.read())
        self.shards = self.index["shards"]
        self._starts = np.cumsum([0] + [s["num_samples"] for s in self.shards]).tolist()
        self._indexes: dict[int, tuple] = {}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._max_open = max_open

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples in {self.dir}")
        i %= len(self)
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def _shard(self, k: int) -> tuple:
        if k not in self._indexes:
            with open(os.path.join(self.dir, self.shards[k]["index"]), "rb") as f:
                members = json.loads(f.read())["members"]
            names = [m[0] for m in members[0::2]]
            table = np.array([m[1:] for m in members], dtype=np.int64).reshape(-1, 2, 2)
            self._indexes[k] = (names, table)  # table[j] = [[audio off, size], [json off, size]]
        return self._indexes[k]

    def _fd(self, k: int) -> int:
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k]
        if len(self._fds) >= self._max_open:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[k] = os.open(os.path.join(self.dir, self.shards[k]["tar"]), os.O_RDONLY)
        return self._fds[k]

    def key(self, i: int) -> str:
        k, j = self._locate(i)
        return self._shard(k)[0][j].split(".", 1)[0]

    def read_raw(self, i: int) -> tuple[str, bytes, bytes]:
        """(key, audio file bytes, metadata JSON bytes) of sample i with one read."""
        k, j = self._locate(i)
        names, table = self._shard(k)
        (a_off, a_size), (m_off, m_size) = table[j].tolist()
        blob = os.pread(self._fd(k), m_off + m_size - a_off, a_off)
        return names[j].split(".", 1)[0], blob[:a_size], blob[m_off - a_off:]

    def get(self, i: int) -> tuple[str, np.ndarray, dict]:
        key, audio, meta = self.read_raw(i)
        samples, sr = decode_bytes(audio)
        if sr != SAMPLE_RATE:
            raise ValueError(f"{self.dir}: sample {i} ({key}) is {sr} Hz, expected {SAMPLE_RATE}")
        return key, samples, json.loads(meta)

    __getitem__ = get

    def verify(self) -> list[str]:
        """Names of shards whose tar does not hash to the recorded sha256 (empty: all good)."""
        bad = []
        for s in self.shards:
            path = os.path.join(self.dir, s["tar"])
            if not os.path.exists(path) or _sha256_file(path) != s["sha256"]:
                bad.append(s["tar"])
        return bad

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
