"""Sparsity patterns: which weights of one target to keep, given their scores."""

from __future__ import annotations

import numpy as np

from . import kernels
from .config import Pattern
from .targets import WeightTarget


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity removes: round half up, so 0.5 of 3 is 2."""
    return min(numel, int(np.floor(sparsity * numel + 0.5)))


def layer_keep_mask(target: WeightTarget, scores: np.ndarray, pattern: Pattern,
                    sparsity: float) -> np.ndarray:
    """Keep mask for one target on its own: exact count, or N:M along the reduction axis."""
    if pattern.is_nm:
        return nm_keep_mask(target, scores, pattern)
    k = prune_count(scores.size, sparsity)
    if k == 0:
        return np.ones(scores.shape, dtype=bool)
    threshold = kernels.kth_smallest_array(scores, k)
    return kernels.unstructured_keep_mask(scores, threshold.value, k - threshold.n_below)


def nm_keep_mask(target: WeightTarget, scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    matrix = np.ascontiguousarray(target.to_matrix(scores))
    keep = kernels.nm_keep_mask(matrix, pattern.n, pattern.m)
    return target.from_matrix(keep)
