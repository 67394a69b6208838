"""The delay pattern: codebook k is shifted right by k frames.

T frames of K codebooks become T + K - 1 rows; row r, stream k holds frame r - k of
codebook k when 0 <= r - k < T and that codebook's pad id otherwise (the corners).
"""
from __future__ import annotations

import numpy as np


def apply_delay(ids: np.ndarray, pads) -> np.ndarray:
    """ids [K, T] (unified ids or raw codes) -> rows [T + K - 1, K] with pads[k] in the corners."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"apply_delay expects [K, T], got shape {list(ids.shape)}")
    num_codebooks, num_frames = ids.shape
    pads = np.broadcast_to(np.asarray(pads, dtype=ids.dtype), (num_codebooks,))
    rows = np.empty((num_frames + num_codebooks - 1, num_codebooks), dtype=ids.dtype)
    rows[:] = pads[None, :]
    for k in range(num_codebooks):
        rows[k:k + num_frames, k] = ids[k]
    return rows


def undo_delay(rows: np.ndarray, num_frames: int | None = None) -> np.ndarray:
    """rows [R, K] in the delay pattern -> ids [K, T], the exact inverse of apply_delay.

    num_frames defaults to R - K + 1 (complete rows). Generated audio may stop early; pass
    the number of frames for which every codebook is present (R - K + 1 of R rows).
    """
    rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ValueError(f"undo_delay expects [R, K], got shape {list(rows.shape)}")
    num_rows, num_codebooks = rows.shape
    if num_frames is None:
        num_frames = num_rows - num_codebooks + 1
    if num_frames < 0 or num_frames + num_codebooks - 1 > num_rows:
        raise ValueError(f"{num_rows} rows of {num_codebooks} streams cannot hold {num_frames} frames")
    return np.stack([rows[k:k + num_frames, k] for k in range(num_codebooks)], axis=0)
