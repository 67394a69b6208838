"""Packing examples into fixed-length rows (best-fit decreasing within a window).

An example of R rows becomes R - 1 training positions (inputs rows[:-1], labels rows[1:]),
so its "length" here is R - 1. Examples are taken in stream order, a window at a time;
inside a window, longest first, each goes into the open row with the least room that
still fits it. Rows of a window are emitted in order of their first example's position in
the stream, so the packing is a pure function of the lengths (exact resume).

Over-long examples follow an explicit policy: "drop" (skipped and counted) or "truncate"
(cut to the row length and counted).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

OVERLONG_POLICIES = ("drop", "truncate")


@dataclass
class PackingStats:
    examples: int = 0
    dropped_overlong: int = 0
    truncated_overlong: int = 0
    rows: int = 0
    used_positions: int = 0
    total_positions: int = 0

    @property
    def fill(self) -> float:
        return self.used_positions / max(self.total_positions, 1)

    def summary(self) -> str:
        return (f"packed {self.examples} examples into {self.rows} rows, fill {self.fill:.1%}; "
                f"over-long: {self.dropped_overlong} dropped, {self.truncated_overlong} truncated")


@dataclass
class PackPlan:
    """rows[i] = list of (stream position, length used) in row i."""
    rows: list = field(default_factory=list)
    stats: PackingStats = field(default_factory=PackingStats)


def pack(lengths, seq_length: int, overlong: str = "drop", window: int = 1000, packing: bool = True) -> PackPlan:
    """lengths[i]: training positions of stream example i (rows - 1)."""
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r} not in {OVERLONG_POLICIES}")
    lengths = np.asarray(lengths, dtype=np.int64)
    plan = PackPlan()
    stats = plan.stats
    stats.examples = len(lengths)
    for start in range(0, len(lengths), window):
        items = []
        for i in range(start, min(start + window, len(lengths))):
            n = int(lengths[i])
            if n <= 0:
                continue
            if n > seq_length:
                if overlong == "drop":
                    stats.dropped_overlong += 1
                    continue
                stats.truncated_overlong += 1
                n = seq_length
            items.append((i, n))
        if not packing:
            bins = [[item] for item in items]
        else:
            bins = _best_fit(items, seq_length)
        bins.sort(key=lambda b: min(i for i, _ in b))
        for b in bins:
            b.sort()
            plan.rows.append(b)
            stats.used_positions += sum(n for _, n in b)
    stats.rows = len(plan.rows)
    stats.total_positions = stats.rows * seq_length
    return plan


def _best_fit(items, capacity):
    """Best-fit decreasing: open bins kept sorted by remaining room."""
    bins: list[list] = []
    rooms: list[tuple[int, int]] = []  # sorted (room, bin index)
    for i, n in sorted(items, key=lambda x: (-x[1], x[0])):
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append((i, n))
            if room - n > 0:
                bisect.insort(rooms, (room - n, b))
        else:
            bins.append([(i, n)])
            if capacity - n > 0:
                bisect.insort(rooms, (capacity - n, len(bins) - 1))
    return bins
