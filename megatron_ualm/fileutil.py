"""File helpers shared by the data and training layers: content hashing, atomic writes and
reading the JSON files users hand in.

Each caller names its own temporary path: the formats differ in how leftovers of a killed
writer are recognised and cleaned up (``.tmp<pid>``, ``.tmp.<pid>``, ``.<name>.tmp-<nonce>``).
"""
from __future__ import annotations

import hashlib
import json
import os

from megatron_ualm.errors import UserError

__all__ = ["read_json", "sha256_file", "write_atomic"]


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


def read_json(path: str | os.PathLike, fix: str, error: type[UserError] = UserError):
    """The parsed JSON file at ``path``. A missing, unreadable or malformed file raises
    ``error`` naming the file (and the line), followed by ``fix`` (what the user should do)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); {fix}") from None
    except FileNotFoundError:
        raise error(f"{path}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({e}); {fix}") from None
