"""Spreading sparsity over targets: the same in each layer, or one global threshold."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from . import kernels
from .patterns import prune_count
from .targets import WeightTarget

ScoreChunks = Callable[[WeightTarget], Iterable[np.ndarray]]


class ScoreThreshold:
    """Prunes exactly round(s · total) of a stream of scores: the lowest, under one threshold.

    `chunks()` yields the scores (flat float32 arrays) in a fixed order and is read twice to
    find the threshold, so nothing stream-sized is built. Afterwards `keep_mask` is called
    on the same scores again, chunk by chunk in the same order (chunk boundaries may differ):
    ties at the threshold are pruned in stream order, so the total is exact and
    deterministic.
    """

    def __init__(self, chunks: Callable[[], Iterable[np.ndarray]], total: int,
                 sparsity: float):
        self.k = prune_count(total, sparsity)
        self.value = 0.0
        self.equal_budget = 0
        if self.k:
            threshold = kernels.kth_smallest(chunks, self.k)
            self.value = threshold.value
            self.equal_budget = self.k - threshold.n_below

    def keep_mask(self, scores: np.ndarray) -> np.ndarray:
        """The keep mask of the next scores of the stream."""
        if self.k == 0:
            return np.ones(scores.shape, dtype=bool)
        take = 0
        if self.equal_budget:  # usually spent in the first chunk: ties are rare
            _, equal = kernels.count_below_equal(scores, self.value)
            take = min(equal, self.equal_budget)
            self.equal_budget -= take
        return kernels.unstructured_keep_mask(scores, self.value, take)


class GlobalThreshold(ScoreThreshold):
    """One threshold over all targets: their scores streamed target by target, in order."""

    def __init__(self, targets: list[WeightTarget], score_chunks: ScoreChunks,
                 sparsity: float):
        def chunks() -> Iterator[np.ndarray]:
            for target in targets:
                yield from score_chunks(target)

        super().__init__(chunks, sum(t.numel for t in targets), sparsity)
