"""Kernel of the channel permutation search: what each channel would add to each group.

For an N:M pattern a group of M input channels keeps, per output, its N largest scores.
With M − 1 channels fixed in a group, a candidate channel c adds exactly
Σ_out max(0, S[c, out] − T[g, out]) to what the group keeps, where T[g, out] is the N-th
largest score of the fixed channels (the one the candidate would push out). The search
(`onnxprune.channel_permutation`) turns these gains into an assignment problem. The groups are small
(M values per output), so their order statistics are taken by sorting M values in place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .flags import NUMBA_CACHE, NUMBA_FASTMATH

__all__ = ["group_gains", "group_thresholds", "kept_per_group"]


def group_gains(candidates: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """gains[c, g] = Σ_out max(0, candidates[c, out] − thresholds[g, out]).

    Summed in float32 (vectorised), returned as float64 for the assignment solver.

    ``candidates`` [C, outputs] and ``thresholds`` [G, outputs] are float32 matrices.
    """
    candidates = np.ascontiguousarray(candidates, dtype=np.float32)
    thresholds = np.ascontiguousarray(thresholds, dtype=np.float32)
    if candidates.ndim != 2 or thresholds.ndim != 2 or (
            candidates.shape[1] != thresholds.shape[1]):
        raise ValueError(f"shapes {candidates.shape} and {thresholds.shape} do not match")
    gains = np.empty((candidates.shape[0], thresholds.shape[0]), dtype=np.float64)
    _gains_kernel(candidates, thresholds, gains)
    return gains


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _gains_kernel(candidates, thresholds, gains):
    n_candidates, outputs = candidates.shape
    n_groups = thresholds.shape[0]
    for c in prange(n_candidates):
        row = candidates[c]
        for g in range(n_groups):
            limit = thresholds[g]
            total = np.float32(0.0)
            for o in range(outputs):
                excess = row[o] - limit[o]
                if excess > 0:
                    total += excess
            gains[c, g] = total


def group_thresholds(scores: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """T[g, out]: the n-th largest of scores[members[g, :], out] (float32 [G, outputs]).

    ``scores`` float32 [channels, outputs]; ``members`` int64 [G, k] with 1 <= n <= k.
    """
    return _group_order_statistics(scores, members, n)[0]


def kept_per_group(scores: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """Σ_out of the n largest of scores[members[g, :], out], per group (float64 [G])."""
    return _group_order_statistics(scores, members, n)[1]


def _group_order_statistics(scores: np.ndarray, members: np.ndarray, n: int):
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    members = np.ascontiguousarray(members, dtype=np.int64)
    if not 1 <= n <= members.shape[1]:
        raise ValueError(f"n = {n} outside 1..{members.shape[1]}")
    thresholds = np.empty((members.shape[0], scores.shape[1]), dtype=np.float32)
    kept = np.empty(members.shape[0], dtype=np.float64)
    _order_kernel(scores, members, n, thresholds, kept)
    return thresholds, kept


@njit(cache=NUMBA_CACHE, parallel=True)
def _order_kernel(scores, members, n, thresholds, kept):
    groups, size = members.shape
    outputs = scores.shape[1]
    for g in prange(groups):
        values = np.empty(size, dtype=np.float32)
        total = 0.0
        for o in range(outputs):
            for i in range(size):
                values[i] = scores[members[g, i], o]
            values.sort()
            thresholds[g, o] = values[size - n]
            for i in range(size - n, size):
                total += values[i]
        kept[g] = total
