"""Weighted blending of many datasets, with weights honoured exactly and a fixed order.

Sample j of dataset d has the key (j + 0.5) / w_d and the blended stream is every sample of
every dataset (repeating each dataset epoch after epoch) sorted by key, ties by dataset
index. Every prefix of n samples then holds within one sample of n * w_d samples of each
dataset (a low-discrepancy interleaving), where the public reference samples datasets
uniformly and ignores the weights.

The stream is infinite and random-access: the position of (d, j) is computed in closed form
(how many keys of the other datasets sort before it), so any slice [start, stop) is found
by binary search without generating what comes before it. Weights are turned into integers
(about 24 bits) so that keys compare exactly: no float tie can order two runs differently.

Within a dataset, epoch e visits its documents in a permutation seeded by (seed, d, e), so
the stream is a pure function of (sizes, weights, seed): identical across restarts.

A curriculum (``BlendSchedule``) changes the weights over training. The loader then blends
each packing window on its own, with the weights of the iteration its first row belongs to:
inside the window the interleaving above holds (every stretch of n examples within one of
n * w_d), and per-dataset counters carry on from window to window, so each dataset is still
read epoch after epoch without skipping or repeating a document.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

WEIGHT_SCALE = 1 << 24


def integer_weights(weights) -> np.ndarray:
    """Weights normalised and scaled to positive integers (exact key comparisons)."""
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    return np.maximum(np.rint(w / w.sum() * WEIGHT_SCALE), 1).astype(np.int64)


def stream_position(W: np.ndarray, d: int, j: np.ndarray) -> np.ndarray:
    """Position in the blended stream of sample(s) j of dataset d (int64 array).

    Key of (d, j) is (2j+1) / (2 W_d). Dataset e contributes the samples whose key is smaller,
    or equal when e < d: #{j' >= 0 : (2j'+1) W_d < (2j+1) W_e}  (<= for e < d).
    """
    j = np.asarray(j, dtype=np.int64)
    pos = j.copy()
    for e in range(len(W)):
        if e == d:
            continue
        numerator = (2 * j + 1) * W[e] - W[d]  # (2j'+1) W_d < (2j+1) W_e  <=>  2 j' W_d < numerator
        if e < d:  # ties count as before: 2 j' W_d <= numerator
            pos += np.where(numerator >= 0, numerator // (2 * W[d]) + 1, 0)
        else:
            pos += np.where(numerator > 0, (numerator + 2 * W[d] - 1) // (2 * W[d]), 0)
    return pos


def _first_at_or_after(W, d: int, start: int) -> int:
    """Smallest j with stream_position(d, j) >= start."""
    lo, hi = 0, 1
    while stream_position(W, d, np.array([hi]))[0] < start:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if stream_position(W, d, np.array([mid]))[0] < start:
            lo = mid + 1
        else:
            hi = mid
    return lo


def blend_slice(weights, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions [start, stop) of the stream: (dataset index, sample index j within it)."""
    W = integer_weights(weights)
    owners, samples, positions = [], [], []
    for d in range(len(W)):
        j0 = _first_at_or_after(W, d, start)
        j1 = _first_at_or_after(W, d, stop)
        j = np.arange(j0, j1, dtype=np.int64)
        owners.append(np.full(len(j), d, dtype=np.int64))
        samples.append(j)
        positions.append(stream_position(W, d, j))
    pos = np.concatenate(positions)
    order = np.argsort(pos, kind="stable")
    if not np.array_equal(pos[order], np.arange(start, stop)):
        raise AssertionError("blended stream positions are not a permutation (a bug)")
    return np.concatenate(owners)[order], np.concatenate(samples)[order]


def blend_order(weights, num_samples: int) -> np.ndarray:
    """[num_samples] dataset index of each of the first positions of the stream."""
    return blend_slice(weights, 0, num_samples)[0]


def epoch_permutation(size: int, seed: int, dataset: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, dataset, epoch]).permutation(size)


class DocumentOrder:
    """Sample j of dataset d -> its document: epoch j // size, permuted by (seed, d, epoch).
    Keeps the last permutation of each dataset (consecutive slices reuse it)."""

    def __init__(self, sizes, seed: int):
        self.sizes = [int(s) for s in sizes]
        for d, s in enumerate(self.sizes):
            if s <= 0:
                raise ValueError(f"dataset {d} is empty; remove it from the blend or fix its preprocessing")
        self.seed = seed
        self._cache: dict[int, tuple[int, np.ndarray]] = {}

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._cache.get(d)
        if cached is None or cached[0] != epoch:
            cached = (epoch, epoch_permutation(self.sizes[d], self.seed, d, epoch))
            self._cache[d] = cached
        return cached[1]

    def documents(self, owners: np.ndarray, samples: np.ndarray) -> np.ndarray:
        docs = np.empty(len(owners), dtype=np.int64)
        for d in np.unique(owners):
            sel = np.flatnonzero(owners == d)
            j = samples[sel]
            size = self.sizes[d]
            for epoch in np.unique(j // size):
                in_epoch = (j // size) == epoch
                docs[sel[in_epoch]] = self._perm(int(d), int(epoch))[j[in_epoch] % size]
        return docs


def blended_samples(sizes, weights, num_samples: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions [start, start + num_samples) of the blended stream: (dataset, document)."""
    if len(list(sizes)) != len(list(weights)):
        raise ValueError(f"{len(list(sizes))} datasets but {len(list(weights))} weights")
    owners, samples = blend_slice(weights, start, start + num_samples)
    return owners, DocumentOrder(sizes, seed).documents(owners, samples)


@dataclass(frozen=True)
class BlendSchedule:
    """Blend weights over training iterations (``data.schedule``).

    ``iterations`` increase from 0; ``weights[i]`` (one per dataset, >= 0, some > 0) hold from
    ``iterations[i]``. ``interpolation`` "constant": they hold until the next point;
    "linear": they move linearly to the next point's weights. After the last point its weights
    hold. ``rows_per_iteration`` (the global batch) turns a training row into its iteration.
    """
    iterations: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]
    interpolation: str = "constant"
    rows_per_iteration: int = 1

    def weights_at_iteration(self, iteration: int) -> np.ndarray:
        i = bisect.bisect_right(self.iterations, iteration) - 1
        if i < 0:
            raise ValueError(f"data.schedule starts at iteration {self.iterations[0]}, not 0")
        w = np.asarray(self.weights[i], dtype=np.float64)
        if self.interpolation == "linear" and i + 1 < len(self.iterations):
            a, b = self.iterations[i], self.iterations[i + 1]
            w = w + (np.asarray(self.weights[i + 1], dtype=np.float64) - w) * ((iteration - a) / (b - a))
        return w

    def weights_at_row(self, row: int) -> np.ndarray:
        return self.weights_at_iteration(row // self.rows_per_iteration)


def window_blend(weights: Sequence[float], counts: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One packing window of a scheduled blend: ``size`` examples interleaved by ``weights``
    (datasets of weight 0 sit out), continuing each dataset at ``counts[d]`` samples already
    read. Returns (dataset index, sample index j, counts after the window)."""
    w = np.asarray(weights, dtype=np.float64)
    active = np.flatnonzero(w > 0)
    if len(active) == 0:
        raise ValueError(f"blend weights {list(weights)} have no positive entry")
    local_owner, local_j = blend_slice(w[active], 0, size)
    owners = active[local_owner]
    samples = np.asarray(counts, dtype=np.int64)[owners] + local_j
    after = np.asarray(counts, dtype=np.int64).copy()
    after[active] += np.bincount(local_owner, minlength=len(active))
    return owners, samples, after
