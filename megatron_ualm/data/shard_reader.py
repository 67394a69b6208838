"""Reading audio shards: the on-disk format, verification, and one-read random access.

Layout of a dataset directory (written by ``megatron_ualm.data.shards.build_shards``)::

    shard-000000.tar            ustar archive; per sample "<key>.wav" (or .flac) then "<key>.json"
    shard-000000.tar.sha256     "<hex>  shard-000000.tar" (sha256sum -c format)
    shard-000000.index.json     per-shard index, see below; written last = the shard is complete
    rejects.jsonl               every rejected entry: file, line, index, key, reason, message
    index.json                  dataset index, written last of all

Audio members are 16 kHz mono 16-bit WAV (canonical 44-byte header) or FLAC; the JSON member
holds key, kind (af3/etta), audio path, crop, num_samples, duration, source {file, line,
index}, and caption (ETTA) or id + conversations [{role, content}] (AF3).

Shard index (``shard-XXXXXX.index.json``)::

    {"format": "ualm-audio-shard-index", "version": 1, "tar": "shard-000000.tar",
     "tar_bytes": int, "sha256": hex, "fingerprint": hex (build config + manifest contents),
     "audio_format": "wav"|"flac", "record_start": int, "record_end": int,
     "num_samples": int, "seconds": float,
     "members": [[name, data_offset, size], ...],   # 2 per sample: audio then json
     "rejects": [reject objects]}

``data_offset`` is the byte offset of the member's data in the tar; sample i's audio is
members[2i] and its metadata members[2i+1], which follows the audio directly, so both come back
with one positioned read.

Dataset index (``index.json``)::

    {"format": "ualm-audio-shards", "version": 1, "sample_rate": 16000, "audio_format": ...,
     "samples_per_shard": int, "fingerprint": hex, "num_records": int, "num_samples": int,
     "hours": float, "manifests": [{"path", "kind", "sha256"}],
     "shards": [{"tar", "index", "sha256", "tar_bytes", "num_samples", "seconds"}],
     "rejects": {"file": "rejects.jsonl", "total": int, "by_reason": {reason: n}}}
"""
from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict

import numpy as np

from megatron_ualm.audio.io import SAMPLE_RATE, decode_bytes
from megatron_ualm.fileutil import sha256_file

FORMAT_VERSION = 1


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


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
    if check_hash and sha256_file(base + ".tar") != recorded:
        return None
    return index


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
            if not os.path.exists(path) or sha256_file(path) != s["sha256"]:
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
