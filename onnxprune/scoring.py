"""Importance scores: one float32 score per weight, higher means more worth keeping."""

from __future__ import annotations

import zlib

import numpy as np

from . import kernels
from .targets import WeightTarget


def score(method: str, target: WeightTarget, weights: np.ndarray, seed: int = 0) -> np.ndarray:
    """Scores in the stored layout of `weights` (same shape), float32."""
    if method == "magnitude":
        return kernels.magnitude_scores(weights)
    if method == "random":
        return random_scores(target, weights, seed)
    raise ValueError(f"no scorer for method {method!r}")


def random_scores(target: WeightTarget, weights: np.ndarray, seed: int) -> np.ndarray:
    """Uniform scores, seeded per target; weights that are already zero go first.

    Putting existing zeros first keeps the zero count exact: pruning a zero is free.
    """
    target_seed = (seed << 32) + zlib.crc32(target.name.encode())
    scores = kernels.random_scores(weights.shape, target_seed)
    scores[kernels.magnitude_scores(weights) == 0] = -1.0
    return scores
