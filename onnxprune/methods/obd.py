"""Optimal Brain Damage (LeCun et al., 1990), layer-wise: the saliency ½ · H_jj · W_ij² of
deleting one weight, with H = XᵀX the Hessian of the layer's squared output error; one
threshold per layer.

Within a row its order is Wanda's (the saliency is half the square of Wanda's score), so the
two differ only in where the comparison happens: across the layer here, within rows for
Wanda. For N:M patterns, where the comparison is within groups of one row, they coincide.
"""

from __future__ import annotations

import numpy as np

from .base import Job, Method, Needs


class OBD(Method):
    name = "obd"
    description = "1/2 * H_jj * W^2, one threshold per layer (calibrated)"
    needs = Needs.SQ_NORMS

    def scores(self, job: Job) -> np.ndarray:
        view, stats = job.calibration
        obs = view.to_obs(job.weights)
        return view.from_obs(obd_scores(obs, stats.sq_norms[:, np.newaxis, :]))


def obd_scores(weights: np.ndarray, hessian_diagonal: np.ndarray) -> np.ndarray:
    """½ · H_jj · W² (float32, same shape) for weights [..., inputs] and H_jj [inputs]."""
    weights = np.asarray(weights, dtype=np.float32)
    half_diagonal = (0.5 * np.asarray(hessian_diagonal, dtype=np.float64)).astype(np.float32)
    return weights * weights * half_diagonal
