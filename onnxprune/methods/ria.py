"""RIA, relative importance and activations (Zhang et al., ICLR 2024): no weight update.

In the calibration view a weight matrix is W [outputs, inputs] (one per group of a grouped
Conv). A weight's relative importance is its share of the total magnitude of its output row
plus its share of the total magnitude of its input column,

    RI_ij = |W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|,

so a weight counts for more where the rest of its row or column is small (every input and
every output keeps some connections). The score multiplies it by the input's activation
norm to the power a (``--ria-alpha``, 0.5 as in the paper): RI_ij · ‖X_j‖₂^a.

Like the official code's default, unstructured masks compare the scores of the whole layer
(an exact count per tensor), and N:M keeps the N best of every M inputs. A row or column
whose magnitudes are all 0 contributes 0, not NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..parts import option
from .base import Job, Method, Needs

DEFAULT_ALPHA = 0.5


class RIA(Method):
    name = "ria"
    description = "(|W|/row sum + |W|/column sum) * ||X_j||^a, per layer (calibrated)"
    needs = Needs.SQ_NORMS

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(DEFAULT_ALPHA, minimum=0.0, metavar="A",
                              help="exponent of the input norm")

    def scores(self, job: Job) -> np.ndarray:
        view, stats = job.calibration
        obs = view.to_obs(job.weights)
        return view.from_obs(ria_scores(obs, stats.sq_norms, self.options.alpha))


def ria_scores(weights: np.ndarray, sq_norms: np.ndarray, alpha: float = DEFAULT_ALPHA
               ) -> np.ndarray:
    """RIA scores (float32 [groups, outputs, inputs]) of OBS matrices of the same shape.

    ``sq_norms`` is ‖X_j‖² per group and input, [groups, inputs].
    """
    magnitude = np.abs(np.asarray(weights, dtype=np.float32))
    # sums in float64, then each share as a float32 array of the weights' size
    row_sums = magnitude.sum(axis=2, keepdims=True, dtype=np.float64).astype(np.float32)
    column_sums = magnitude.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    scores = np.divide(magnitude, row_sums, out=np.zeros_like(magnitude), where=row_sums > 0)
    # where a column sums to 0 its magnitudes are 0, which `out` keeps
    scores += np.divide(magnitude, column_sums, out=magnitude, where=column_sums > 0)
    norms = np.sqrt(np.maximum(np.asarray(sq_norms, dtype=np.float64), 0.0))
    scores *= (norms ** alpha).astype(np.float32)[:, np.newaxis, :]
    return scores
