"""Test-wide hooks.

A CPU runtime (``init_runtime(device="cpu")``) redirects CUDA to the CPU for the rest of the
process (``runtime.cpu_compat``), so after any test that starts one in-process, GPU tests in the
same pytest process cannot use the GPU: they are skipped with that reason instead of failing.
On a GPU machine, run them on their own: ``bash scripts/test.sh -m gpu``.
"""
from __future__ import annotations

import pytest


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is None:
        return
    from megatron_ualm.runtime.cpu_compat import is_cpu_compat_applied
    if is_cpu_compat_applied():
        pytest.skip("an earlier test in this process redirected CUDA to the CPU (CPU runtime); "
                    "run the GPU tests on their own: -m gpu")


def pytest_report_header(config):
    import sys

    import torch

    from megatron_ualm.mcore_compat import megatron_core_version
    return f"megatron_ualm: megatron-core {megatron_core_version()}, torch {torch.__version__}, Python {sys.version.split()[0]}"
