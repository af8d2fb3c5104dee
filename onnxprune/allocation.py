"""Spreading sparsity over targets: the same in each layer, or one global threshold."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from . import kernels
from .patterns import prune_count
from .targets import WeightTarget

ScoreFn = Callable[[WeightTarget], np.ndarray]


class GlobalThreshold:
    """One score threshold over all targets that prunes exactly round(s · total) weights.

    The threshold is found by streaming each target's scores through the selector, so no
    model-sized array is built. Ties at the threshold are pruned in target order, then in
    flat index order, so the total is exact and deterministic.
    """

    def __init__(self, targets: list[WeightTarget], score_fn: ScoreFn, sparsity: float):
        total = sum(t.numel for t in targets)
        self.k = prune_count(total, sparsity)
        self.value = 0.0
        self.equal_budget = 0
        if self.k:
            def chunks() -> Iterator[np.ndarray]:
                for target in targets:
                    yield score_fn(target).reshape(-1)
            threshold = kernels.kth_smallest(chunks, self.k)
            self.value = threshold.value
            self.equal_budget = self.k - threshold.n_below

    def keep_mask(self, scores: np.ndarray) -> np.ndarray:
        """The mask of the next target, in the order the targets were given."""
        if self.k == 0:
            return np.ones(scores.shape, dtype=bool)
        _, equal = kernels.count_below_equal(scores, self.value)
        take = min(equal, self.equal_budget)
        self.equal_budget -= take
        return kernels.unstructured_keep_mask(scores, self.value, take)
