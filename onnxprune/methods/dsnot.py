"""DSnoT (Zhang et al., ICLR 2024): training-free prune-and-grow swaps that refine a mask.

After a scoring method has chosen a mask, each output row trades pruned weights back for
kept ones while that lowers the row's reconstruction error; no weight is updated. The paper
judges a swap by the change of the expected output error Σ_j W_ij E[X_j] (it keeps only
means and variances of the inputs). Here XᵀX is at hand, so a swap is judged by the exact
change of the error it stands for, ‖(W − M ⊙ W) Xᵀ‖² of the row (see
`onnxprune.kernels.swaps`): every accepted swap lowers it, and it is what the report's
reconstruction error measures. Each cycle makes at most one swap per row, the better of two
greedy pairs (grow the weight whose regrowth helps most, then prune the cheapest one given
that; or prune the cheapest first, then grow the best one given that); a row stops once no
swap helps, after at most ``--dsnot-iters`` cycles. N:M: swaps stay inside one group
of M, so the pattern holds after every swap. Weights an earlier step removed (`job.keep`)
never come back.

The gradient (W ⊙ ~M) H is formed a block of rows at a time (float64 GEMM), so beside H
the refinement holds a few row blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..kernels.swaps import prune_and_grow
from ..parts import option
from .base import Job, MaskRefinement

log = logging.getLogger(__name__)

DEFAULT_CYCLES = 50
ROW_BLOCK_ELEMENTS = 1 << 22  # gradient rows per GEMM: 32 MiB of float64


class DSnoT(MaskRefinement):
    """`--refine dsnot`: prune-and-grow swaps that lower each row's reconstruction error."""

    name = "dsnot"
    description = "prune-and-grow swaps inside each row that lower its output error"

    @dataclass(frozen=True)
    class Options:
        iters: int = option(DEFAULT_CYCLES, minimum=0, metavar="N",
                            help="prune-and-grow cycles per row")

    def refine(self, job: Job, keep: np.ndarray) -> np.ndarray:
        view, pattern = job.calibration[0], job.plan.pattern
        cycles = self.options.iters
        weights = view.to_obs(job.weights)
        keep_obs = np.ascontiguousarray(view.to_obs(keep), dtype=bool)
        growable = (np.ones(keep_obs.shape, dtype=bool) if job.keep is None
                    else np.ascontiguousarray(view.to_obs(job.keep), dtype=bool))
        swaps = 0
        for group in range(weights.shape[0]):
            swaps += refine_matrix(weights[group], job.hessians[group], keep_obs[group],
                                   growable[group], cycles, pattern.n, pattern.m)
        log.debug("%s: dsnot made %d swaps", job.target.name, swaps)
        return np.ascontiguousarray(view.from_obs(keep_obs), dtype=bool)


def refine_matrix(weights: np.ndarray, hessian: np.ndarray, keep: np.ndarray,
                  growable: np.ndarray, cycles: int, keep_n: int = 0, group_m: int = 0
                  ) -> int:
    """Refine the mask `keep` [rows, cols] of one matrix in place; returns the swaps made.

    `growable` marks positions that may be kept (False: pruned before, stays pruned).
    """
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    hessian = np.ascontiguousarray(hessian, dtype=np.float64)
    rows, cols = weights.shape
    step = max(1, ROW_BLOCK_ELEMENTS // max(1, cols))
    swaps = 0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = weights[start:stop]
        lost = np.where(keep[start:stop], 0.0, block.astype(np.float64))
        gradient = lost @ hessian
        del lost
        block_keep = np.ascontiguousarray(keep[start:stop])
        swaps += int(prune_and_grow(block, hessian, gradient, block_keep,
                                    np.ascontiguousarray(growable[start:stop]), cycles,
                                    keep_n, group_m).sum())
        keep[start:stop] = block_keep
    return swaps
