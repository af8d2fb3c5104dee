"""Kernel of DSnoT's prune-and-grow: swaps inside each row that lower the row's output error.

Row r of a layer loses d = w ⊙ (1 − m) to its mask m; the error it causes on the calibration
data is E = d H dᵀ (H = XᵀX). With the gradient g = d H kept up to date, the change of E
when pruned weight j grows back and kept weight k is pruned is exact and O(1):

    ΔE = 2 w_k g_k − 2 w_j g_j + w_k² H_kk + w_j² H_jj − 2 w_j w_k H_jk,

and after the swap g += w_k H_k − w_j H_j (O(cols)). Rows are independent: one row per
``prange`` iteration.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .flags import NUMBA_CACHE, NUMBA_FASTMATH

__all__ = ["prune_and_grow"]

# a swap must lower the row's error by more than this share of it (rounding noise)
RELATIVE_TOLERANCE = 1e-9


def prune_and_grow(weights: np.ndarray, hessian: np.ndarray, gradient: np.ndarray,
                   keep: np.ndarray, growable: np.ndarray, cycles: int, keep_n: int = 0,
                   group_m: int = 0) -> np.ndarray:
    """Swap pruned and kept weights of each row while the row's error drops; swaps per row.

    ``weights`` float32 [rows, cols]; ``hessian`` float64 [cols, cols]; ``gradient`` float64
    [rows, cols] = (weights ⊙ ~keep) @ hessian on entry, kept current; ``keep`` bool
    [rows, cols], updated in place; ``growable`` bool [rows, cols] marks the weights that
    may be kept (an earlier step's zeros may not come back). At most ``cycles`` swaps per row.

    Unstructured (``group_m == 0``): each cycle takes the better of two greedy pairs, the
    weight whose regrowth lowers E most with the best weight to prune after it, and the
    weight whose pruning raises E least with the best one to grow after it. N:M: each cycle
    takes the best pair inside any one group of ``group_m`` columns (the group keeps its
    count). A row stops at its first cycle without an improving swap.
    """
    rows, cols = weights.shape
    for name, array, dtype in (("weights", weights, np.float32), ("gradient", gradient,
                                                                  np.float64),
                               ("keep", keep, np.bool_), ("growable", growable, np.bool_)):
        if array.dtype != dtype or array.shape != (rows, cols) or not array.flags.c_contiguous:
            raise TypeError(f"{name} must be a C-contiguous {np.dtype(dtype).name} "
                            f"[{rows}, {cols}] matrix")
    if hessian.dtype != np.float64 or hessian.shape != (cols, cols) \
            or not hessian.flags.c_contiguous:
        raise TypeError(f"hessian must be a C-contiguous float64 [{cols}, {cols}] matrix")
    if group_m and (not 0 < keep_n < group_m or cols % group_m):
        raise ValueError(f"pattern {keep_n}:{group_m} does not fit {cols} columns")
    swaps = np.zeros(rows, dtype=np.int64)
    if rows and cols and cycles > 0:
        _swap_kernel(weights, hessian, gradient, keep, growable, int(cycles), int(group_m),
                     swaps)
    return swaps


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH)
def _best_pair_unstructured(w, hessian, g, keep, grow_ok):
    """(ΔE, grow j, prune k) of the better greedy pair; j = -1 when there is none."""
    cols = w.size
    best_delta, best_j, best_k = np.inf, -1, -1
    # grow first: the most helpful regrowth, then the cheapest pruning after it
    grow_j, grow_gain = -1, np.inf
    prune_k, prune_cost = -1, np.inf
    for c in range(cols):
        wc = np.float64(w[c])
        if keep[c]:
            cost = wc * (wc * hessian[c, c] + 2.0 * g[c])
            if cost < prune_cost:
                prune_cost, prune_k = cost, c
        elif grow_ok[c] and wc != 0.0:
            gain = wc * (wc * hessian[c, c] - 2.0 * g[c])
            if gain < grow_gain:
                grow_gain, grow_j = gain, c
    if grow_j < 0 or prune_k < 0:
        return best_delta, best_j, best_k
    wj = np.float64(w[grow_j])
    for c in range(cols):
        if keep[c]:
            wc = np.float64(w[c])
            delta = grow_gain + wc * (wc * hessian[c, c] + 2.0 * (g[c] - wj * hessian[grow_j, c]))
            if delta < best_delta:
                best_delta, best_j, best_k = delta, grow_j, c
    wk = np.float64(w[prune_k])
    for c in range(cols):
        wc = np.float64(w[c])
        if not keep[c] and grow_ok[c] and wc != 0.0:
            delta = prune_cost + wc * (wc * hessian[c, c]
                                       - 2.0 * (g[c] + wk * hessian[prune_k, c]))
            if delta < best_delta:
                best_delta, best_j, best_k = delta, c, prune_k
    return best_delta, best_j, best_k


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH)
def _best_pair_grouped(w, hessian, g, keep, grow_ok, group_m):
    """(ΔE, grow j, prune k) of the best pair inside one group; j = -1 when there is none."""
    best_delta, best_j, best_k = np.inf, -1, -1
    for start in range(0, w.size, group_m):
        for j in range(start, start + group_m):
            wj = np.float64(w[j])
            if keep[j] or not grow_ok[j] or wj == 0.0:
                continue
            gain = wj * (wj * hessian[j, j] - 2.0 * g[j])
            for k in range(start, start + group_m):
                if keep[k]:
                    wk = np.float64(w[k])
                    delta = gain + wk * (wk * hessian[k, k] + 2.0 * (g[k] - wj * hessian[j, k]))
                    if delta < best_delta:
                        best_delta, best_j, best_k = delta, j, k
    return best_delta, best_j, best_k


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _swap_kernel(weights, hessian, gradient, keep, growable, cycles, group_m, swaps):
    rows, cols = weights.shape
    for r in prange(rows):
        w, g, kept, grow_ok = weights[r], gradient[r], keep[r], growable[r]
        error = 0.0
        for c in range(cols):
            if not kept[c]:
                error += np.float64(w[c]) * g[c]
        tolerance = RELATIVE_TOLERANCE * abs(error)
        for _ in range(cycles):
            if group_m:
                delta, j, k = _best_pair_grouped(w, hessian, g, kept, grow_ok, group_m)
            else:
                delta, j, k = _best_pair_unstructured(w, hessian, g, kept, grow_ok)
            if j < 0 or not delta < -tolerance:
                break
            wj, wk = np.float64(w[j]), np.float64(w[k])
            for c in range(cols):
                g[c] += wk * hessian[k, c] - wj * hessian[j, c]
            kept[j] = True
            kept[k] = False
            swaps[r] += 1
