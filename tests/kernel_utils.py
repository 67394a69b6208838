"""Running a kernel check under Triton's CPU interpreter (for the Triton kernel tests).

The check is Python source that prints "ok" when it passes; it runs in a child process with
``TRITON_INTERPRET=1`` (the variable must be set before triton is imported) and the repository
on the path. Skips when triton is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_under_triton_interpreter(source: str, timeout: float) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
