"""Kernels for calibration-aware pruning: the SparseGPT column sweep and per-row selection.

Both work on one ``[rows, cols]`` matrix whose rows are independent, so they run one row
per ``prange`` iteration and need no reduction afterwards.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .flags import NUMBA_CACHE, NUMBA_FASTMATH

__all__ = ["obs_sweep_block", "row_keep_mask"]

MAX_M = 256


def obs_sweep_block(
    block: np.ndarray,
    hinv: np.ndarray,
    prune: np.ndarray,
    errors: np.ndarray,
    keep_n: int = 0,
    group_m: int = 0,
    grid: tuple[np.ndarray, np.ndarray, int, int] | None = None,
) -> None:
    """Prune one block of columns in place, spreading each pruned weight's error rightwards.

    ``block`` [rows, width] float32 holds the current weights of the block, ``hinv``
    [width, width] float32 the matching diagonal block of the upper Cholesky factor U of
    H⁻¹. Column by column, every weight marked in ``prune`` becomes exactly 0 and its error
    e = w / U[i, i] is subtracted, times U[i, j], from the later columns j of its row (the
    OBS update); ``errors[:, i]`` receives e (0 for kept weights) for the caller's lazy
    update of the columns after the block.

    With ``group_m > 0`` the mask is chosen here instead, as the sweep reaches each group of
    ``group_m`` columns: the ``group_m - keep_n`` weights of smallest w² / U[j, j]² (on the
    weights as updated so far) are marked in ``prune``; ties prune the lower column. NaN
    saliencies count as the smallest. Weights already marked in ``prune`` stay marked and
    go first (a mask from an earlier step is never undone).

    ``grid`` = (scale, zero point, qmin, qmax), the first two float32 [rows, width]: every
    kept weight is also rounded to its nearest grid value (z + round(w / s) clipped to
    [qmin, qmax], times s after subtracting z) and the rounding error is spread like a
    pruned weight's (SparseGPT's joint sparsification and quantization).
    """
    for name, array, dtype in (
        ("block", block, np.float32),
        ("hinv", hinv, np.float32),
        ("prune", prune, np.bool_),
        ("errors", errors, np.float32),
    ):
        if array.ndim != 2 or array.dtype != dtype or not array.flags.c_contiguous:
            raise TypeError(
                f"{name} must be a C-contiguous 2-D {np.dtype(dtype)} array, "
                f"got {array.dtype}{array.shape}"
            )
    rows, width = block.shape
    if hinv.shape != (width, width) or prune.shape != block.shape or errors.shape != block.shape:
        raise ValueError(
            f"shapes disagree: block {block.shape}, hinv {hinv.shape}, "
            f"prune {prune.shape}, errors {errors.shape}"
        )
    if group_m:
        if not 0 < keep_n < group_m <= MAX_M or width % group_m:
            raise ValueError(f"bad N:M {keep_n}:{group_m} for a block of width {width}")
    if grid is None:
        scale = zero = np.empty((0, 0), np.float32)
        qmin = qmax = 0
    else:
        scale, zero, qmin, qmax = grid
        for name, array in (("scale", scale), ("zero", zero)):
            if array.shape != block.shape or array.dtype != np.float32 or \
                    not array.flags.c_contiguous:
                raise TypeError(f"grid {name} must be C-contiguous float32 {block.shape}")
    _obs_sweep_kernel(block, hinv, prune, errors, int(keep_n), int(group_m), scale, zero,
                      float(qmin), float(qmax), grid is not None)


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _obs_sweep_kernel(block, hinv, prune, errors, keep_n, group_m, scale, zero, qmin, qmax,
                      quantize):
    rows, width = block.shape
    n_prune = group_m - keep_n
    for r in prange(rows):
        saliency = np.empty(max(group_m, 1), dtype=np.float32)
        for i in range(width):
            if group_m > 0 and i % group_m == 0:
                for j in range(group_m):
                    d = hinv[i + j, i + j]
                    s = block[r, i + j] * block[r, i + j] / (d * d)
                    saliency[j] = -1.0 if np.isnan(s) else s
                    if prune[r, i + j]:  # marked by the caller: pruned before, goes first
                        saliency[j] = -2.0
                for j in range(group_m):
                    rank = 0  # how many of the group go before j in pruning order
                    for t in range(group_m):
                        if saliency[t] < saliency[j] or (saliency[t] == saliency[j] and t < j):
                            rank += 1
                    prune[r, i + j] = prune[r, i + j] or rank < n_prune
            if prune[r, i] or (quantize and scale[r, i] > 0):
                w = block[r, i]
                kept = np.float32(0.0)  # pruned; a kept weight goes to its grid point
                if not prune[r, i]:
                    q = min(max(np.rint(w / scale[r, i]) + zero[r, i], qmin), qmax)
                    kept = (q - zero[r, i]) * scale[r, i]
                error = (w - kept) / hinv[i, i]
                block[r, i] = kept
                if np.isfinite(error):
                    errors[r, i] = error
                    for j in range(i + 1, width):
                        block[r, j] -= error * hinv[i, j]
                else:
                    errors[r, i] = 0.0
            else:
                errors[r, i] = 0.0


def row_keep_mask(scores: np.ndarray, n_prune: int) -> np.ndarray:
    """Keep-mask that prunes exactly the ``n_prune`` smallest scores of every row.

    Ties prune the lower column first; NaN scores count as the largest (pruned last).
    """
    if scores.ndim != 2:
        raise TypeError(f"scores must be 2-D, got shape {scores.shape}")
    if not 0 <= n_prune <= scores.shape[1]:
        raise ValueError(f"n_prune {n_prune} outside [0, {scores.shape[1]}]")
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    return _row_keep_kernel(scores, int(n_prune))


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _row_keep_kernel(scores, n_prune):
    rows, cols = scores.shape
    keep = np.ones((rows, cols), dtype=np.bool_)
    for r in prange(rows):
        row = scores[r].astype(np.float64)
        for j in range(cols):
            if np.isnan(row[j]):
                row[j] = np.inf
        order = np.argsort(row, kind="mergesort")
        for j in range(n_prune):
            keep[r, order[j]] = False
    return keep
