"""Weighted blending of many datasets, with weights honoured exactly and a fixed order.

Sample j of dataset d is placed at the key (j + 0.5) / w_d (w normalised to sum 1) and
the blended stream is all samples sorted by key. Every prefix of n samples then holds
within one sample of n * w_d samples of each dataset (a low-discrepancy interleaving),
where the public reference samples datasets uniformly and ignores the weights.

Within a dataset, epoch e visits its documents in a permutation seeded by (seed, d, e),
so the stream is a pure function of (sizes, weights, seed): identical across restarts.
"""
from __future__ import annotations

import numpy as np


def blend_order(weights, num_samples: int) -> np.ndarray:
    """[num_samples] dataset index of each position of the blended stream.

    Prefix-stable: the first n positions are the same whatever num_samples >= n is asked,
    so a longer run or a restart never reorders what was already planned.
    """
    w = np.asarray(list(weights), dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"blend weights must be positive and finite, got {list(weights)}")
    w = w / w.sum()
    # Every sample whose key is among the num_samples smallest has index < num_samples*w + 1.
    per = np.ceil(num_samples * w).astype(np.int64) + 1
    keys = np.concatenate([(np.arange(c) + 0.5) / w[d] for d, c in enumerate(per)])
    owner = np.concatenate([np.full(c, d, dtype=np.int64) for d, c in enumerate(per)])
    return owner[np.lexsort((owner, keys))[:num_samples]]


def epoch_permutation(size: int, seed: int, dataset: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, dataset, epoch]).permutation(size)


def blended_samples(sizes, weights, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The blended stream: (dataset index [n], document index [n]).

    A dataset that runs out starts a new epoch with a fresh permutation, so small datasets
    repeat in proportion to their weight rather than being exhausted.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) != len(list(weights)):
        raise ValueError(f"{len(sizes)} datasets but {len(list(weights))} weights")
    for d, s in enumerate(sizes):
        if s <= 0:
            raise ValueError(f"dataset {d} is empty; remove it from the blend or fix its preprocessing")
    order = blend_order(weights, num_samples)
    docs = np.empty(num_samples, dtype=np.int64)
    for d, size in enumerate(sizes):
        where = np.flatnonzero(order == d)
        n = len(where)
        if n:
            epochs = -(-n // size)
            perm = np.concatenate([epoch_permutation(size, seed, d, e) for e in range(epochs)])
            docs[where] = perm[:n]
    return order, docs
