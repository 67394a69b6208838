#!/usr/bin/env python
"""Cost of the training data plan at the scale of a long run, on CPU, without any data:
start-up of a 10^8-row plan, locating a row deep in it, and resuming from the saved anchor.

    python benchmarks/data_plan.py [--rows 100000000] [--locate 100000]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ualm.data.loader import PackedRows, RowSettings  # noqa: E402
from megatron_ualm.formats import UnifiedVocab  # noqa: E402


class LengthsOnly:
    """A document source that knows only its documents' row counts (the planner needs no more)."""

    def __init__(self, n: int, seed: int):
        self._rows = np.random.default_rng(seed).integers(50, 2000, n)

    def __len__(self):
        return len(self._rows)

    def rows(self):
        return self._rows

    def segments(self, i):
        raise AssertionError("planning must not read documents")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000_000, help="rows the run will read")
    p.add_argument("--locate", type=int, default=100_000, help="row to locate (a resume point)")
    a = p.parse_args()
    sources = [LengthsOnly(1_000_000, 0), LengthsOnly(500_000, 1)]
    build = lambda anchor=(0, 0): PackedRows(sources, [0.6, 0.4], [0, 1], UnifiedVocab(151_936),  # noqa: E731
                                             RowSettings(seq_length=4096), a.rows, anchor=anchor)
    t = time.perf_counter(); plan = build(); start = time.perf_counter() - t
    t = time.perf_counter(); anchor = plan.anchor_for(a.locate); locate = time.perf_counter() - t
    t = time.perf_counter(); resumed = build(anchor); resume = time.perf_counter() - t
    same = resumed.row_plan(a.locate) == plan.row_plan(a.locate)
    print(f"plan of {a.rows:,} rows: start {start:.2f} s; locate row {a.locate:,} from the start {locate:.2f} s; "
          f"start at its anchor {resume:.2f} s (same row: {same}); "
          f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
