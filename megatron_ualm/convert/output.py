"""Output directories that appear complete or not at all, and the conversion report.

``atomic_output_dir(path, overwrite)`` yields a temporary sibling directory; only when the
body finishes is it renamed to ``path``. An existing non-empty ``path`` is refused unless
``overwrite``; then the old directory is moved aside, the new one renamed in, and the old
one deleted -- a crash at any point leaves either the old or the new directory whole
(plus, at worst, a ``.<name>.old-<pid>`` / ``.<name>.tmp-<pid>`` sibling). The next run
deletes such leftovers of any pid: ``.tmp-`` ones before it writes, ``.old-`` ones once its
new directory is in place.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

from megatron_ualm.convert.errors import ConversionError


def check_output_dir(path: str, overwrite: bool) -> str:
    """Absolute ``path``; refuses a file or an existing non-empty directory without ``overwrite``."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"{path}: exists and is not a directory; choose another output path")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConversionError(f"{path}: exists and is not empty; choose another output path or pass "
                              "--overwrite (the old directory is replaced only once the new one is complete)")
    return path


@contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary directory that becomes ``path`` when the body succeeds."""
    path = check_output_dir(path, overwrite)
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, base, "tmp")
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.rename(path, os.path.join(parent, f".{base}.old-{os.getpid()}"))
    os.rename(tmp, path)
    _remove_leftovers(parent, base, "old")


def _remove_leftovers(parent: str, base: str, kind: str) -> None:
    """Delete the ``.<base>.<kind>-<pid>`` siblings of ``base`` (any pid)."""
    pattern = re.compile(rf"\.{re.escape(base)}\.{kind}-\d+")
    for name in os.listdir(parent):
        if pattern.fullmatch(name):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


class Report:
    """What a conversion did: tensors by category, rows copied / initialised / dropped, notes.
    ``format()`` gives the one-screen summary the CLIs print."""

    def __init__(self, title: str):
        self.title = title
        self.start = time.time()
        self.counts: Counter = Counter()
        self.params: Counter = Counter()
        self.lines: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def tensor(self, category: str, numel: int, count: int = 1) -> None:
        self.counts[category] += count
        self.params[category] += numel

    def line(self, label: str, text: str) -> None:
        self.lines.append((label, text))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def format(self) -> str:
        out = [f"== {self.title} ({time.time() - self.start:.1f} s) =="]
        width = max([len(k) for k in self.counts] + [len(k) for k, _ in self.lines] + [8])
        for cat in self.counts:
            out.append(f"  {cat:<{width}}  {self.counts[cat]:>5} tensors  {self.params[cat]:>15,} values")
        out.append(f"  {'total':<{width}}  {sum(self.counts.values()):>5} tensors  "
                   f"{sum(self.params.values()):>15,} values")
        for label, text in self.lines:
            out.append(f"  {label:<{width}}  {text}")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


def progress(total: int, desc: str, enabled: Optional[bool] = None):
    """A tqdm bar on stderr (disabled when ``enabled`` is False or stderr is not a terminal
    and ``enabled`` is None)."""
    from tqdm import tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr)
