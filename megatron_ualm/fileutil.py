"""File helpers shared by the data and training layers: content hashing and atomic writes.

Each caller names its own temporary path: the formats differ in how leftovers of a killed
writer are recognised and cleaned up (``.tmp<pid>``, ``.tmp.<pid>``, ``.<name>.tmp-<nonce>``).
"""
from __future__ import annotations

import hashlib
import os

__all__ = ["sha256_file", "write_atomic"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes, tmp: str | os.PathLike) -> None:
    """Write ``data`` to ``tmp``, fsync it and rename it to ``path``, so readers see the old
    file or the new one, never half of one. ``tmp`` must be on the same file system."""
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
