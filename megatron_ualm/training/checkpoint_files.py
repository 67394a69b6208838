"""Training checkpoints on disk: names, manifest, verification, discovery, retention.

A week-long run on many nodes is killed, preempted and requeued many times; a checkpoint
must never be lost and never be half-loaded. On disk::

    <experiment_dir>/checkpoints/
        latest                      "iter_0000200\\n" (advisory; written tmp+fsync+rename)
        iter_0000100/               one complete checkpoint
            __0_0.distcp ...        megatron dist checkpoint (torch_dist): model, optimizer,
            .metadata  common.pt    scheduler, per-rank RNG states
            metadata.json
            train_state.json        TrainState (iteration, consumed_rows, trainer extras)
            config.yaml             the resolved run config (megatron_ualm.config.save_config)
            COMPLETE                written last: manifest of every file (size; sha256 of the
                                    small ones), layout, contents
        iter_0000200/
        iter_0000300.tmp-<nonce>/   a save in progress, or one killed mid-way: never loaded,
                                    removed by the next save

Why it is safe:
* A save writes into ``iter_N.tmp-<nonce>/``; only after every rank finished (barrier) does
  rank 0 fsync the files, write ``COMPLETE`` and rename the directory into place (a single
  atomic rename on POSIX file systems). A kill at any earlier moment leaves a ``.tmp-`` dir
  that nothing reads.
* A checkpoint is *valid* only if ``COMPLETE`` parses and every file it lists exists with the
  listed size (and checksum for small files). ``find_latest_checkpoint`` takes the newest
  valid one and names every invalid one it skips; a checkpoint the user names explicitly is
  refused with the list of problems instead of being loaded.
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
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_ualm.fileutil import sha256_file, write_atomic

__all__ = [
    "CheckpointError", "TrainState", "find_latest_checkpoint", "resolve_checkpoint",
    "verify_checkpoint", "read_manifest", "build_manifest", "seal_checkpoint", "remove_stale",
    "apply_retention", "check_safe_to_unpickle", "checkpoints_dir", "checkpoint_name",
    "COMPLETE_MARKER", "LATEST_FILE", "TRAIN_STATE_FILE", "CONFIG_FILE", "MANIFEST_FORMAT",
    "MANIFEST_VERSION", "HASH_LIMIT_BYTES",
]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FORMAT = "megatron_ualm.checkpoint"
MANIFEST_VERSION = 1
# Files up to this size get a sha256 in the manifest (metadata, common state, json, yaml).
# Bulk tensor files are checked by size only: hashing tens of GB on every resume is too slow.
HASH_LIMIT_BYTES = 16 * 2**20
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_RE = re.compile(r"^iter_\d{7,}\.(tmp|trash)-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the fix."""


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


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems that make ``path`` unloadable; an empty list means it is complete and intact."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = []
    for rel, info in sorted(manifest.get("files", {}).items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = f.stat().st_size
        if size != info.get("size"):
            problems.append(f"{rel}: {size} bytes on disk, {info.get('size')} in the manifest "
                            "(truncated or overwritten)")
        elif info.get("sha256") and sha256_file(f) != info["sha256"]:
            problems.append(f"{rel}: checksum differs from the manifest (corrupted)")
    if not manifest.get("files"):
        problems.append("manifest lists no files")
    return problems


def build_manifest(path: Path, iteration: int, layout: dict, contents: dict,
                    optimizer_metadata: Optional[dict]) -> dict:
    files = {}
    for f in _list_files(path):
        rel = f.relative_to(path).as_posix()
        if rel == COMPLETE_MARKER:
            continue
        size = f.stat().st_size
        files[rel] = {"size": size, "sha256": sha256_file(f) if size <= HASH_LIMIT_BYTES else None}
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "iteration": iteration,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "layout": layout, "contents": contents, "optimizer_metadata": optimizer_metadata,
        "files": files,
    }


# --- discovery ------------------------------------------------------------------------------

def find_latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest valid checkpoint directory under ``root`` (a checkpoints dir), or None.

    Every newer directory that is skipped (no marker, truncated file, bad checksum) is named
    in a warning with its problems. ``.tmp-`` directories of unfinished saves are ignored.
    """
    for path in _iter_dirs(Path(root)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
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
                f"refusing to load {path}: " + "; ".join(problems) + ". Load an older checkpoint "
                f"(e.g. the parent directory {path.parent} picks the newest valid one) or delete it.")
        return path
    root = checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path
    found = find_latest_checkpoint(root)
    if found is None:
        raise CheckpointError(f"{root}: no complete checkpoint (iter_NNNNNNN/ with a valid "
                              f"{COMPLETE_MARKER} marker) found")
    return found


# --- sealing a save and deleting old ones ---------------------------------------------------

def seal_checkpoint(tmp: Path, final: Path, root: Path, iteration: int, state_json: str, config,
                    layout: dict, contents: dict, optimizer_metadata: Optional[dict],
                    nonce: str) -> None:
    """Rank 0: add our files, fsync, write COMPLETE last, rename into place, update latest."""
    (tmp / TRAIN_STATE_FILE).write_text(state_json + "\n")
    if config is not None:
        from megatron_ualm.config import save_config
        save_config(config, str(tmp / CONFIG_FILE))
    for f in _list_files(tmp):  # data must be on disk before the marker claims it is
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    for d in {f.parent for f in _list_files(tmp)} | {tmp}:
        _fsync_dir(d)
    manifest = build_manifest(tmp, iteration, layout, contents, optimizer_metadata)
    _write_atomic(tmp / COMPLETE_MARKER, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    trash = None
    if final.exists():  # an invalid leftover of the same iteration: replace it
        trash = root / f"{final.name}.trash-{nonce}"
        logger.warning("replacing invalid checkpoint %s: %s", final, "; ".join(verify_checkpoint(final)))
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
    without a ``COMPLETE`` marker (they may be a user's copy in progress).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    marked = [p for p in _iter_dirs(root) if (p / COMPLETE_MARKER).exists()]
    valid = [p for p in marked if not verify_checkpoint(p)]
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
