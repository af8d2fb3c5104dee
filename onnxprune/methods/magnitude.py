"""Magnitude pruning: the score of a weight is |w|."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from .base import Job, Method


class Magnitude(Method):
    name = "magnitude"
    description = "|W| (no calibration)"
    streams_scores = True

    def scores(self, job: Job) -> np.ndarray:
        from .. import kernels

        return kernels.magnitude_scores(job.weights)

    def score_chunks(self, target, pieces: Iterable[np.ndarray], seed: int = 0
                     ) -> Iterator[np.ndarray]:
        from .. import kernels

        buffer = np.empty(0, np.float32)
        for piece in pieces:
            if buffer.size < piece.size:
                buffer = np.empty(piece.size, np.float32)
            scores = buffer[:piece.size]
            kernels.magnitude_scores(piece, out=scores)
            yield scores
