"""L1 proximal step (soft-threshold): the magnitude mask, survivors shrunk towards zero.

The proximal operator of τ‖W‖₁ maps w to sign(w) · max(|w| − τ, 0). Here τ is the smallest
threshold that reaches the plan: the largest |w| among the weights the plan prunes (the
exact magnitude count, ties by position), so every pruned weight becomes 0 and every kept
one loses τ of its magnitude, sign kept — one step of sparsity-inducing L1 regularization.
For N:M each group of M has its own τ (the largest pruned magnitude in the group). Weights
an existing mask removed do not set τ. A kept weight tied with τ shrinks to 0 as well.
"""

from __future__ import annotations

import numpy as np

from ..patterns import layer_keep_mask, mask_scores, nm_keep_mask
from .base import Job
from .magnitude import Magnitude


class L1(Magnitude):
    name = "l1"
    description = "soft-threshold: magnitude mask, survivors shrink by the threshold"
    reconstructs = True  # the kept weights change

    def reconstruct(self, job: Job) -> np.ndarray:
        target, plan = job.target, job.plan
        if job.fixed:
            if job.keep is None:  # the pipeline sets `fixed` only with a mask
                raise RuntimeError(f"{target.name}: a fixed mask was asked for without one")
            keep = job.keep
        else:
            scores = mask_scores(self.scores(job), job.keep)
            if plan.pattern.is_nm:
                keep = nm_keep_mask(target, scores, plan.pattern)
            else:
                keep = layer_keep_mask(scores, plan.prune_count(target.numel))
            if job.keep is not None:
                keep &= job.keep
        return soft_threshold(job, keep)


def soft_threshold(job: Job, keep: np.ndarray) -> np.ndarray:
    """The weights with `keep` False zeroed and kept ones shrunk by τ (stored layout, dtype)."""
    target, pattern = job.target, job.plan.pattern
    work_dtype = np.float64 if job.weights.dtype == np.float64 else np.float32
    weights = np.asarray(job.weights, dtype=work_dtype)
    magnitudes = np.abs(weights)
    # weights removed by this step only: an earlier mask's positions do not set τ
    cut = ~keep if job.keep is None else ~keep & job.keep
    cut_magnitudes = np.where(cut & np.isfinite(magnitudes), magnitudes, 0)
    if pattern.is_nm:
        groups = target.to_matrix(cut_magnitudes).reshape(target.matrix_rows, -1, pattern.m)
        per_group = np.broadcast_to(groups.max(axis=-1, keepdims=True), groups.shape)
        threshold = target.from_matrix(per_group.reshape(target.matrix_rows, -1))
    else:
        threshold = cut_magnitudes.max() if cut_magnitudes.size else work_dtype(0)
    shrunk = np.sign(weights) * np.maximum(magnitudes - threshold, 0)
    shrunk[~keep] = 0
    return np.ascontiguousarray(shrunk.astype(job.weights.dtype))
