"""Calibrated importance scores on a layer's [outputs, inputs] matrix: Wanda and OBD.

Both need only the squared norm of each input feature over the calibration tokens,
‖X_j‖² = (XᵀX)_jj:

- Wanda (Sun et al., 2023): |W_ij| · ‖X_j‖₂, compared within each output row (every row
  loses the same number of weights); no weight update.
- OBD (LeCun et al., 1990), layer-wise: the saliency ½ · H_jj · W_ij² of deleting one weight
  with H = XᵀX the Hessian of the layer's squared output error; one threshold per layer.

The two orders agree within a row (OBD's saliency is half the square of Wanda's score), so
they differ only in where the comparison happens: within rows (Wanda) or across the layer
(OBD). For N:M patterns, where the comparison is within groups of one row, they coincide.
"""

from __future__ import annotations

import numpy as np

from .kernels.stats import row_keep_mask
from .patterns import prune_count


def wanda_scores(weights: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
    """|W| · ‖X_j‖₂ (float32, same shape) for weights [..., inputs] and ‖X_j‖² [inputs]."""
    norms = np.sqrt(np.maximum(np.asarray(sq_norms, dtype=np.float64), 0.0)).astype(np.float32)
    return np.abs(np.asarray(weights, dtype=np.float32)) * norms


def obd_scores(weights: np.ndarray, hessian_diagonal: np.ndarray) -> np.ndarray:
    """½ · H_jj · W² (float32, same shape) for weights [..., inputs] and H_jj [inputs]."""
    weights = np.asarray(weights, dtype=np.float32)
    half_diagonal = (0.5 * np.asarray(hessian_diagonal, dtype=np.float64)).astype(np.float32)
    return weights * weights * half_diagonal


def per_row_keep_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask pruning the same count, ``prune_count(inputs, sparsity)``, from every row."""
    scores = np.asarray(scores, dtype=np.float32)
    matrix = scores.reshape(-1, scores.shape[-1])
    keep = row_keep_mask(matrix, prune_count(matrix.shape[1], sparsity))
    return keep.reshape(scores.shape)
