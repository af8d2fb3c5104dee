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
    """Uniform scores, seeded per target; weights that are already zero go first."""
    scores = random_generator(target, seed).random(weights.shape, dtype=np.float32)
    put_zeros_first(scores, weights)
    return scores


def random_generator(target: WeightTarget, seed: int) -> np.random.Generator:
    """The random stream of one target: the user's seed mixed with the target's name."""
    return np.random.default_rng((seed << 32) + zlib.crc32(target.name.encode()))


def put_zeros_first(scores: np.ndarray, weights: np.ndarray) -> None:
    """Give weights that are already zero the lowest score, in place.

    Pruning a zero is free, so this keeps the zero count exact.
    """
    scores.reshape(-1)[kernels.magnitude_scores(weights).reshape(-1) == 0] = -1.0
