"""Wanda (Sun et al., 2023): |W_ij| · ‖X_j‖₂ over the calibration tokens, compared within
each output row (every row loses the same number of weights); no weight update."""

from __future__ import annotations

import numpy as np

from .base import Job, Method, Needs


class Wanda(Method):
    name = "wanda"
    description = "|W| * ||X_j||, compared within output rows (calibrated)"
    needs = Needs.SQ_NORMS
    compare = "row"

    def scores(self, job: Job) -> np.ndarray:
        view, stats = job.calibration
        obs = view.to_obs(job.weights)
        return view.from_obs(wanda_scores(obs, stats.sq_norms[:, np.newaxis, :]))


def wanda_scores(weights: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
    """|W| · ‖X_j‖₂ (float32, same shape) for weights [..., inputs] and ‖X_j‖² [inputs]."""
    norms = np.sqrt(np.maximum(np.asarray(sq_norms, dtype=np.float64), 0.0)).astype(np.float32)
    return np.abs(np.asarray(weights, dtype=np.float32)) * norms
