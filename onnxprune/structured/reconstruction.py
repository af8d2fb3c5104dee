"""The arithmetic of refitting a consumer after some of its input channels are removed.

A consumer weight is seen as a matrix W [rows, features] acting on its layer input x
(`TargetView.to_obs`: a MatMul's columns, a Conv's output channels over im2col patches),
with the calibration sums of x: H = Σ xxᵀ, Σ x and the token count. Removing channels
removes some features; K are the features left.

- Plain cut: W_K, the removed features' weights dropped.
- Least squares (ZipLM, SlimGPT): the kept columns refitted to the dense output,
  W'_K = argmin ‖X W_Kᵀ' − X Wᵀ‖² + λ‖W'‖² = W H[:, K] (H_KK + λI)⁻¹, damped like
  SparseGPT's Hessian (λ = damp × mean diagonal of H_KK). A row whose refit would not beat
  its plain cut on the calibration data (possible only through the damping) keeps the cut,
  so the refit never raises the layer's error.
- Bias compensation (FLAP): the consumer's bias gains (W − W') E[x], so that its output's
  mean over the calibration data equals the dense one's. With least squares as well, the
  fit is made on the centred statistics (H − N·μμᵀ): weights and bias together are then the
  best affine fit.

Everything here is float64 numpy on small matrices; the tests hold naive twins.
"""

from __future__ import annotations

import numpy as np


def centred(hessian: np.ndarray, sums: np.ndarray, tokens: int) -> np.ndarray:
    """Σ (x − μ)(x − μ)ᵀ from Σ xxᵀ, Σ x and the token count."""
    tokens = max(int(tokens), 1)
    return hessian - np.outer(sums, sums) / tokens


def layer_errors(weights: np.ndarray, refitted: np.ndarray, hessian: np.ndarray
                 ) -> np.ndarray:
    """Per row, ‖X (W − W')ᵀ‖² from H: W, W' [rows, features] (W' zero where removed)."""
    delta = np.asarray(weights, np.float64) - np.asarray(refitted, np.float64)
    return np.einsum("rf,fg,rg->r", delta, hessian, delta)


def least_squares(weights: np.ndarray, hessian: np.ndarray, kept: np.ndarray,
                  damp: float) -> np.ndarray:
    """W' [rows, features]: the kept features' columns refitted (see the module doc), zero
    on the removed ones; rows whose refit does not lower their error keep the plain cut."""
    weights = np.asarray(weights, np.float64)
    kept = np.asarray(kept, np.int64)
    cut = np.zeros_like(weights)
    cut[:, kept] = weights[:, kept]
    if kept.size == 0:
        return cut
    inner = hessian[np.ix_(kept, kept)].copy()
    diagonal = np.diagonal(inner)
    scale = float(np.mean(diagonal)) if diagonal.size else 0.0
    if scale <= 0.0:  # no signal reached these features: nothing to fit against
        return cut
    inner[np.diag_indices_from(inner)] += damp * scale
    cross = weights @ hessian[:, kept]  # [rows, kept]
    try:
        fitted = np.linalg.solve(inner, cross.T).T
    except np.linalg.LinAlgError:
        return cut
    refit = np.zeros_like(weights)
    refit[:, kept] = fitted
    better = layer_errors(weights, refit, hessian) < layer_errors(weights, cut, hessian)
    return np.where(better[:, None], refit, cut)


def bias_shift(weights: np.ndarray, refitted: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(W − W') μ per row: what the bias must gain for the output's mean to stay."""
    return (np.asarray(weights, np.float64) - np.asarray(refitted, np.float64)) @ means
