"""The random baseline: uniform scores, seeded per target; weights already zero go first."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import numpy as np

from ..targets import WeightTarget
from .base import Job, Method


class Random(Method):
    name = "random"
    description = "uniform random scores, seeded per target (a baseline)"
    streams_scores = True

    def scores(self, job: Job) -> np.ndarray:
        scores = generator(job.target, job.seed).random(job.weights.shape, dtype=np.float32)
        put_zeros_first(scores, job.weights)
        return scores

    def score_chunks(self, target: WeightTarget, pieces: Iterable[np.ndarray], seed: int = 0
                     ) -> Iterator[np.ndarray]:
        buffer = np.empty(0, np.float32)
        # one generator run through the pieces gives the same stream as one call for all
        stream = generator(target, seed)
        for piece in pieces:
            if buffer.size < piece.size:
                buffer = np.empty(piece.size, np.float32)
            scores = buffer[:piece.size]
            stream.random(piece.size, dtype=np.float32, out=scores)
            put_zeros_first(scores, piece)
            yield scores


def generator(target: WeightTarget, seed: int) -> np.random.Generator:
    """The random stream of one target: the user's seed mixed with the target's name."""
    return np.random.default_rng((seed << 32) + zlib.crc32(target.name.encode()))


def put_zeros_first(scores: np.ndarray, weights: np.ndarray) -> None:
    """Give weights that are already zero the lowest score, in place.

    Pruning a zero is free, so this keeps the zero count exact.
    """
    from .. import kernels

    scores.reshape(-1)[kernels.magnitude_scores(weights).reshape(-1) == 0] = -1.0
