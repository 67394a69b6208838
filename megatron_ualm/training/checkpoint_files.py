"""Training checkpoints on disk: names, manifest, verification, discovery, retention.

A week-long run on many nodes is killed, preempted and requeued many times; a checkpoint
must never be lost and never be half-loaded. On disk::

    <experiment_dir>/checkpoints/
        latest                      "iter_0000200\\n" (advisory; written tmp+fsync+rename)
        iter_0000100/               one complete checkpoint
            __0_0.distcp ...        megatron dist checkpoint (torch_dist): model, optimizer,
            .metadata  common.pt    scheduler, per-rank RNG states (megatron-core >= 0.19
            metadata.json           keeps common.pt's contents inside the .distcp files)
            train_state.json        TrainState (iteration, consumed_rows, trainer extras)
            config.yaml             the resolved run config (megatron_ualm.config.save_config)
            COMPLETE                written last: manifest of every file (size and the sha256
                                    of each 64 MiB piece), layout, contents
        iter_0000200/
        iter_0000300.tmp-<nonce>/   a save in progress, or one killed mid-way: never loaded,
                                    removed by the next save

Why it is safe:
* A save writes into ``iter_N.tmp-<nonce>/``; only after every rank finished (barrier) does
  rank 0 fsync the files, write ``COMPLETE`` and rename the directory into place (a single
  atomic rename on POSIX file systems). A kill at any earlier moment leaves a ``.tmp-`` dir
  that nothing reads. An asynchronous save (``checkpoint.async_save``) is sealed the same way,
  once every rank's background writer has ended.
* Every file is checksummed, whatever its size: each rank hashes the ``.distcp`` files it
  wrote right after writing them (still in the page cache, several threads) and leaves the
  digests in ``.digests.rank<N>.json``; rank 0 adds those and the hashes of the small files
  to ``COMPLETE``. Digests are per ``SHA256_CHUNK_BYTES`` piece of a file (``sha256_chunks``),
  so one large file is hashed by several threads, and a mismatch names the bytes that
  changed; a file no larger than one piece has a single digest, its plain ``sha256sum``.
* A checkpoint is *valid* only if ``COMPLETE`` parses and every file it lists exists with the
  listed size and checksums (manifests written before ``sha256_chunks`` carry a ``sha256`` of
  the files up to 16 MiB only; larger files of those are checked by size).
  ``find_latest_checkpoint`` takes the newest valid one and names every invalid one it skips
  in one warning line; a checkpoint the user names explicitly is refused with the list of
  problems instead of being loaded.
* Older checkpoints are deleted only after the new one is complete, never the one ``latest``
  names, and by renaming to ``*.trash-*`` first so a kill during deletion cannot leave a
  half-deleted directory that still looks like a checkpoint.
* ``latest`` is a convenience for humans and tools; discovery scans the directories, so a
  kill between the rename and the ``latest`` update loses nothing.

Safety of loading: ``common.pt`` and sharded objects are read by megatron with
``torch.load(weights_only=True)`` (torch >= 2.6 default; we check them with
``torch.serialization.get_unsafe_globals_in_checkpoint`` before megatron does), and
torch-DCP's ``.metadata`` pickle is first replayed through an unpickler that only admits
torch.distributed.checkpoint metadata classes. Our own metadata is JSON/YAML.

What megatron state goes into a checkpoint, and how the ranks save and load it together,
is ``megatron_ualm.training.checkpoint``; this module is the file-system side of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from megatron_ualm.errors import UserError
from megatron_ualm.fileutil import write_atomic

__all__ = [
    "CheckpointError", "TrainState", "find_latest_checkpoint", "resolve_checkpoint",
    "verify_checkpoint", "read_manifest", "build_manifest", "seal_checkpoint", "remove_stale",
    "apply_retention", "check_safe_to_unpickle", "checkpoints_dir", "checkpoint_name",
    "has_checkpoint", "chunk_digests", "write_rank_digests", "default_hash_threads",
    "COMPLETE_MARKER", "LATEST_FILE", "TRAIN_STATE_FILE", "CONFIG_FILE", "MANIFEST_FORMAT",
    "MANIFEST_VERSION", "SHA256_CHUNK_BYTES",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FORMAT = "megatron_ualm.checkpoint"
MANIFEST_VERSION = 1  # readers of version 1 without sha256_chunks still check the sizes
# sha256 rather than blake2b: with the SHA extensions of current x86 CPUs OpenSSL's sha256 runs
# at about twice blake2b's speed per core (benchmarks/checkpoint_hash.py prints both).
# A file is hashed in pieces of this many bytes (one digest each), so that threads share the
# work on one large file and a mismatch says where the file changed.
SHA256_CHUNK_BYTES = 64 * 2**20
_READ_BYTES = 8 * 2**20   # one read() while hashing a piece
_DIGESTS_FILE = ".digests.rank{rank}.json"  # a rank's digests of the files it wrote, for rank 0
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_RE = re.compile(r"^iter_\d{7,}\.(tmp|trash)-[0-9a-f]+$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the fix (the
    command-line tools print it as one line and exit 2)."""


@dataclass
class TrainState:
    """The trainer's small JSON state, saved as ``train_state.json``.

    iteration: optimizer steps done. consumed_rows: training sequences (packed rows) consumed,
    all data-parallel ranks together. skipped_iterations: steps skipped by the NaN policy.
    extra: anything else JSON-able the trainer needs to resume (e.g. data-loader position);
    it must be the same on every rank (rank 0's is kept).
    """
    iteration: int = 0
    consumed_rows: int = 0
    skipped_iterations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        try:
            return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"TrainState is not JSON-serialisable ({exc}); keep only "
                                  "str/int/float/bool/None/lists/dicts in TrainState.extra") from exc

    @classmethod
    def from_json(cls, text: str, source: str = "train_state.json") -> "TrainState":
        try:
            data = json.loads(text)
            return cls(iteration=int(data["iteration"]), consumed_rows=int(data["consumed_rows"]),
                       skipped_iterations=int(data.get("skipped_iterations", 0)),
                       extra=dict(data.get("extra", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{source}: not a valid TrainState ({exc})") from exc


# --- paths ----------------------------------------------------------------------------------

def checkpoints_dir(experiment_dir: str | os.PathLike) -> Path:
    """Where an experiment keeps its checkpoints: ``<experiment_dir>/checkpoints``."""
    return Path(experiment_dir) / "checkpoints"


def checkpoint_name(iteration: int) -> str:
    """``iter_0000100`` for iteration 100 (zero-padded so names sort by iteration)."""
    return f"iter_{int(iteration):07d}"


def _iteration_of(path: Path) -> Optional[int]:
    m = _ITER_RE.match(path.name)
    return int(m.group(1)) if m else None


def _iter_dirs(root: Path) -> list[Path]:
    """Checkpoint-named directories under root, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _iteration_of(p) is not None]
    return sorted(found, key=lambda p: _iteration_of(p), reverse=True)


# --- small-file durability ------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary sibling + fsync + rename, so readers see old or new, never half."""
    write_atomic(path, text.encode(), path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"))
    _fsync_dir(path.parent)


def _list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- hashing ---------------------------------------------------------------------------------

def _usable_cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_hash_threads() -> int:
    """Threads for hashing while the node's other ranks may do the same: the CPUs this process
    may run on, divided among the node's ranks unless they are pinned to CPUs of their own."""
    allowed = _usable_cpus()
    if allowed == (os.cpu_count() or allowed):  # not pinned: every local rank sees every CPU
        allowed //= max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(allowed, 1)


def _sha256_of_range(path: Path, offset: int, length: int) -> str:
    """Hex sha256 of ``length`` bytes of ``path`` from ``offset`` (fewer if the file is shorter:
    the digest then differs from the manifest's, which is the point)."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(min(_READ_BYTES, max(length, 1))))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = length
        while left > 0:
            n = f.readinto(buffer[:min(left, len(buffer))])
            if not n:
                break
            digest.update(buffer[:n])  # hashlib releases the GIL on buffers this large
            left -= n
    return digest.hexdigest()


def _pieces(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each piece of a ``size``-byte file; an empty file has one, empty."""
    return [(offset, min(chunk_bytes, size - offset)) for offset in range(0, max(size, 1), chunk_bytes)]


def _hash_ranges(ranges: list[tuple[Path, int, int]], threads: Optional[int]) -> list[str]:
    """sha256 of each (path, offset, length), ``threads`` at a time; in the order given."""
    threads = min(threads or default_hash_threads(), len(ranges))
    if threads <= 1:
        return [_sha256_of_range(*r) for r in ranges]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-sha256") as pool:
        return list(pool.map(lambda r: _sha256_of_range(*r), ranges))


def chunk_digests(paths: Iterable[Path], threads: Optional[int] = None,
                  chunk_bytes: int = SHA256_CHUNK_BYTES) -> dict[Path, dict]:
    """``{path: {"size": bytes, "sha256_chunks": [hex digest of each chunk]}}``, the pieces
    of all files hashed in parallel (``threads``; None: ``default_hash_threads()``)."""
    sizes = {Path(p): Path(p).stat().st_size for p in paths}
    ranges = [(p, offset, length) for p, size in sizes.items() for offset, length in _pieces(size, chunk_bytes)]
    digests = iter(_hash_ranges(ranges, threads))
    return {p: {"size": size, "sha256_chunks": [next(digests) for _ in _pieces(size, chunk_bytes)]}
            for p, size in sizes.items()}


def write_rank_digests(directory: str | os.PathLike, rank: int, threads: Optional[int] = None) -> None:
    """In the process that has just written them: hash this rank's torch_dist files
    (``__<rank>_<n>.distcp``, torch DCP's naming) while they are still in the page cache, and
    leave the digests in ``.digests.rank<rank>.json`` for rank 0's manifest."""
    directory = Path(directory)
    digests = chunk_digests(sorted(directory.glob(f"__{rank}_*.distcp")), threads)
    entries = {p.name: entry for p, entry in digests.items()}
    target = directory / _DIGESTS_FILE.format(rank=rank)
    write_atomic(target, json.dumps({"sha256_chunk_bytes": SHA256_CHUNK_BYTES, "files": entries}).encode(),
                 target.with_name(target.name + ".tmp"))


def _collect_rank_digests(directory: Path) -> dict[str, dict]:
    """Rank 0: the digests every rank left (``write_rank_digests``); the files are removed."""
    found = {}
    for f in sorted(directory.glob(_DIGESTS_FILE.format(rank="*"))):
        data = json.loads(f.read_text())
        if data.get("sha256_chunk_bytes") == SHA256_CHUNK_BYTES:
            found.update(data["files"])
        f.unlink()
    return found


# --- manifest and verification --------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed ``COMPLETE`` marker of a checkpoint directory (raises CheckpointError)."""
    marker = Path(path) / COMPLETE_MARKER
    try:
        manifest = json.loads(marker.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {COMPLETE_MARKER} marker (the save did not finish)") from None
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{marker}: unreadable marker ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{marker}: not a {MANIFEST_FORMAT} marker")
    if manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{marker}: manifest version {manifest.get('version')} is not "
                              f"supported (this code reads version {MANIFEST_VERSION})")
    return manifest


def verify_checkpoint(path: str | os.PathLike, *, contents: bool = True,
                      threads: Optional[int] = None) -> list[str]:
    """Problems that make ``path`` unloadable; an empty list means it is complete and intact.

    contents: also hash every file (``threads`` in parallel; None: all this process may use)
    and compare with the manifest's checksums; False checks the marker and the sizes only
    (retention, skipping a save that exists: decisions that must not read tens of GB).
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    chunk_bytes = manifest.get("sha256_chunk_bytes")
    to_hash: list[tuple[str, list[tuple[int, int]], list[str]]] = []  # (file, pieces, expected)
    for rel, info in sorted(manifest.get("files", {}).items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = f.stat().st_size
        if size != info.get("size"):
            problems.append(f"{rel}: {size} bytes on disk, {info.get('size')} in the manifest "
                            "(truncated or overwritten)")
        elif contents and info.get("sha256_chunks") is not None:
            if not chunk_bytes:
                problems.append(f"{rel}: the manifest has sha256_chunks but no sha256_chunk_bytes")
            else:
                to_hash.append((rel, _pieces(size, chunk_bytes), info["sha256_chunks"]))
        elif contents and info.get("sha256"):  # manifests before sha256_chunks: small files only
            to_hash.append((rel, [(0, size)], [info["sha256"]]))
    if not manifest.get("files"):
        problems.append("manifest lists no files")
    ranges = [(path / rel, offset, length) for rel, pieces, _ in to_hash for offset, length in pieces]
    actual = _hash_ranges(ranges, threads or _usable_cpus()) if ranges else []
    first = 0
    for rel, pieces, expected in to_hash:
        digests, first = actual[first:first + len(pieces)], first + len(pieces)
        bad = [piece for piece, want, got in zip(pieces, expected, digests) if want != got]
        if len(expected) != len(pieces):
            problems.append(f"{rel}: {len(expected)} checksums in the manifest for {len(pieces)} pieces")
        elif bad:
            (start, length), more = bad[0], f" and {len(bad) - 1} more pieces" if len(bad) > 1 else ""
            problems.append(f"{rel}: checksum (sha256) of bytes {start}..{start + length} differs from "
                            f"the manifest{more} (corrupted on disk after it was saved)")
    return problems


def build_manifest(path: Path, iteration: int, layout: dict, contents: dict,
                   optimizer_metadata: Optional[dict], checksums: bool = True,
                   threads: Optional[int] = None) -> dict:
    """The ``COMPLETE`` manifest of the files in ``path``. With ``checksums``, the digests the
    ranks left (``write_rank_digests``) are used and every other file is hashed here; a
    ``.distcp`` that its writer did not hash is hashed too, with a warning (it costs a read)."""
    from_ranks = _collect_rank_digests(path)
    files, unhashed = {}, []
    for f in _list_files(path):
        rel = f.relative_to(path).as_posix()
        if rel == COMPLETE_MARKER:
            continue
        size = f.stat().st_size
        entry = from_ranks.get(rel)
        if not checksums:
            files[rel] = {"size": size}
        elif entry is not None and entry["size"] == size:
            files[rel] = entry
        else:
            unhashed.append(f)
    late = [f.name for f in unhashed if f.suffix == ".distcp"]
    if late:
        logger.warning("%s: %d .distcp files had no checksum from the rank that wrote them (%s); "
                       "hashing them on rank 0", path, len(late), ", ".join(late[:4]))
    for f, entry in chunk_digests(unhashed, threads).items():
        files[f.relative_to(path).as_posix()] = entry
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "iteration": iteration,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layout": layout, "contents": contents, "optimizer_metadata": optimizer_metadata,
        "files": dict(sorted(files.items())),
    }
    if checksums:
        manifest["sha256_chunk_bytes"] = SHA256_CHUNK_BYTES
    return manifest


# --- discovery ------------------------------------------------------------------------------

def _one_line(problems: list[str], most: int = 3) -> str:
    more = f"; and {len(problems) - most} more problems" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def has_checkpoint(root: str | os.PathLike) -> bool:
    """Whether ``root`` (a checkpoints dir) holds a checkpoint with a ``COMPLETE`` marker,
    intact or not: cheap (nothing is read), to decide whether a run resumes."""
    return any((p / COMPLETE_MARKER).is_file() for p in _iter_dirs(Path(root)))


def find_latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest valid checkpoint directory under ``root`` (a checkpoints dir), or None.

    Every file of a candidate is hashed and compared with its manifest (in parallel). Every
    newer directory that is skipped (no marker, truncated file, bad checksum) is named in one
    warning line with its problems. ``.tmp-`` directories of unfinished saves are ignored.
    """
    for path in _iter_dirs(Path(root)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s, falling back to an older one: %s", path, _one_line(problems))
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Turn what a user passed (``checkpoint.load``) into one valid checkpoint directory.

    Accepts a checkpoint directory (``.../iter_0000100``), a checkpoints directory (newest
    valid one is taken) or an experiment directory (its ``checkpoints/``). An explicitly named
    checkpoint that is incomplete or corrupt is refused, never silently replaced.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if (path / COMPLETE_MARKER).exists() or _iteration_of(path) is not None:
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(
                f"refusing to load {path}: " + _one_line(problems) + ". Load an older checkpoint "
                f"(e.g. the parent directory {path.parent} picks the newest valid one) or delete it.")
        return path
    root = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
    found = find_latest_checkpoint(root)
    if found is None:
        skipped = " (the warnings above say what is wrong with each)" if has_checkpoint(root) else ""
        raise CheckpointError(f"{root}: no complete checkpoint (iter_NNNNNNN/ with a valid "
                              f"{COMPLETE_MARKER} marker) found{skipped}; move broken ones away to "
                              "start afresh, or name a checkpoint to load")
    return found


# --- sealing a save and deleting old ones ---------------------------------------------------

def seal_checkpoint(tmp: Path, final: Path, root: Path, iteration: int, state_json: str, config,
                    layout: dict, contents: dict, optimizer_metadata: Optional[dict],
                    nonce: str, checksums: bool = True, threads: Optional[int] = None) -> None:
    """Rank 0, after every rank's files are written: add our files, fsync, write COMPLETE
    (with the ranks' checksums, ``build_manifest``) last, rename into place, update latest."""
    (tmp / TRAIN_STATE_FILE).write_text(state_json + "\n")
    if config is not None:
        from megatron_ualm.config import save_config
        save_config(config, str(tmp / CONFIG_FILE))
    for f in _list_files(tmp):  # data must be on disk before the marker claims it is
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in {f.parent for f in _list_files(tmp)} | {tmp}:
        _fsync_dir(d)
    manifest = build_manifest(tmp, iteration, layout, contents, optimizer_metadata, checksums, threads)
    _write_atomic(tmp / COMPLETE_MARKER, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    trash = None
    if final.exists():  # an invalid leftover of the same iteration: replace it
        trash = root / f"{final.name}.trash-{nonce}"
        logger.warning("replacing invalid checkpoint %s: %s", final,
                       _one_line(verify_checkpoint(final, contents=False)))
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / LATEST_FILE, final.name + "\n")
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def remove_stale(root: Path) -> None:
    """Delete ``.tmp-``/``.trash-`` dirs left by killed saves/deletions (rank 0, before a save)."""
    for p in root.iterdir():
        if p.is_dir() and _TMP_RE.match(p.name):
            logger.warning("removing unfinished checkpoint directory %s (a save or deletion "
                           "was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)


def _latest_target(root: Path) -> Optional[Path]:
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except OSError:
        return None
    return root / name if name else None


def apply_retention(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete checkpoints older than the ``keep_last`` newest valid ones; returns the deleted.

    Never deletes the one ``latest`` names, any newer than the kept ones, or directories
    without a ``COMPLETE`` marker (they may be a user's copy in progress). Validity here is
    marker and sizes (``verify_checkpoint(contents=False)``): hashing every kept checkpoint
    at every save would read them all.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    marked = [p for p in _iter_dirs(root) if (p / COMPLETE_MARKER).exists()]
    valid = [p for p in marked if not verify_checkpoint(p, contents=False)]
    if len(valid) <= keep_last:
        return []
    kept = valid[:keep_last]
    oldest_kept = _iteration_of(kept[-1])
    protected = set(kept) | {_latest_target(root)}
    deleted = []
    for p in marked:
        if p in protected or _iteration_of(p) >= oldest_kept:
            continue
        trash = root / f"{p.name}.trash-{uuid.uuid4().hex[:12]}"
        os.replace(p, trash)  # from here on nothing mistakes it for a checkpoint
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(p)
        logger.info("deleted old checkpoint %s (keep_last=%d)", p, keep_last)
    return deleted


# --- safe unpickling ------------------------------------------------------------------------

# torch.distributed.checkpoint's .metadata is a plain pickle; before megatron unpickles it we
# replay it with an unpickler that admits only these classes/functions (and fails otherwise).
_DCP = "torch.distributed.checkpoint"
_METADATA_ALLOWED = {
    *((f"{_DCP}.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not is_dtype and (module, name) not in _METADATA_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def check_safe_to_unpickle(path: Path) -> None:
    """Refuse a checkpoint whose pickled files reference anything but plain data classes."""
    meta = path / ".metadata"
    if meta.exists():
        try:
            _MetadataUnpickler(io.BytesIO(meta.read_bytes())).load()
        except Exception as exc:
            raise CheckpointError(f"{meta}: refusing to unpickle ({exc}); this file was not "
                                  "written by torch.distributed.checkpoint") from exc
    for f in path.rglob("*.pt"):
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        if unsafe:
            raise CheckpointError(f"{f}: holds objects that weights_only loading refuses "
                                  f"({', '.join(unsafe)}); not loading it")
