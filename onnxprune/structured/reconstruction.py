"""The arithmetic of refitting a consumer after some of its input channels are removed.

A consumer weight is seen as a matrix W [rows, features] acting on its layer input x
(`TargetView.to_obs`: a MatMul's columns, a Conv's output channels over im2col patches),
with the calibration sums of x: H = Σ xxᵀ, Σ x and the token count. Removing channels
removes some features; K are the features left.

- Plain cut: W_K, the removed features' weights dropped.
- Least squares (ZipLM, SlimGPT): the kept columns refitted to the dense output,
  W'_K = argmin ‖X (W − W')ᵀ‖² + λ‖W − W'‖² = W H_d[:, K] (H_d,KK)⁻¹ with H_d = H + λI,
  damped like SparseGPT's Hessian (λ = damp × mean diagonal of H). A row whose refit would
  not beat its plain cut on the calibration data (possible only through the damping) keeps
  the cut, so the refit never raises the layer's error.
- Structured OBS (ZipLM): which channels go, chosen with the refit: removed a few at a
  time by the smallest OBS error from H_d⁻¹, the others updated after each step
  (`obs_select`). Its weights are the same damped least-squares refit of the channels it
  keeps.
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
    damped = damped_hessian(hessian, damp)
    if damped is None:  # no signal reached these features: nothing to fit against
        return cut
    try:
        fitted = np.linalg.solve(damped[np.ix_(kept, kept)], (weights @ damped[:, kept]).T).T
    except np.linalg.LinAlgError:
        return cut
    refit = np.zeros_like(weights)
    refit[:, kept] = fitted
    better = layer_errors(weights, refit, hessian) < layer_errors(weights, cut, hessian)
    return np.where(better[:, None], refit, cut)


def damped_hessian(hessian: np.ndarray, damp: float) -> np.ndarray | None:
    """H + λI with λ = damp × mean diagonal of H (SparseGPT's damping: the fit is pulled
    towards the dense weights, not towards zero); None where H is zero."""
    damped = np.array(hessian, dtype=np.float64, copy=True)
    scale = float(np.mean(np.diagonal(damped))) if damped.size else 0.0
    if scale <= 0.0:
        return None
    damped[np.diag_indices_from(damped)] += damp * scale
    return damped


def bias_shift(weights: np.ndarray, refitted: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(W − W') μ per row: what the bias must gain for the output's mean to stay."""
    return (np.asarray(weights, np.float64) - np.asarray(refitted, np.float64)) @ means


def obs_select(weights: list[np.ndarray], hessians: list[np.ndarray],
               features: list[np.ndarray], count: int, damp: float, rounds: int = 32
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Structured OBS (ZipLM): keep `count` of a group's channels, removing the others in
    about `rounds` steps by the smallest OBS error given the inverse Hessian, and updating
    the remaining weights after each step.

    Per consumer m: its weights [rows, F_m], H_m = XᵀX [F_m, F_m] and `features[m]`
    [channels, per]: the features channel c occupies. Removing the set S of features costs
    Σ_r w_r,S (H⁻¹_SS)⁻¹ w_r,Sᵀ and the best update of the others is
    W ← W − W_S (H⁻¹_SS)⁻¹ H⁻¹_S:, H⁻¹ ← H⁻¹ − H⁻¹_:S (H⁻¹_SS)⁻¹ H⁻¹_S: (damped by `damp` ×
    the mean diagonal). Each step removes the channels of lowest single-channel cost
    (summed over the consumers), at most ⌈removals / rounds⌉ at a time. Returns the kept
    channels (sorted) and each consumer's new weights (zero on the removed features); a row
    that ends worse than its plain cut keeps the cut.
    """
    channels = features[0].shape[0]
    inverses, current = [], []
    for matrix, hessian in zip(weights, hessians, strict=True):
        damped = damped_hessian(hessian, max(damp, 1e-8))
        size = len(hessian)
        inverses.append(np.linalg.inv(damped) if damped is not None else np.eye(size))
        current.append(np.array(matrix, dtype=np.float64, copy=True))
    alive = np.ones(channels, dtype=bool)
    to_remove = channels - count
    step = max(1, -(-to_remove // max(1, rounds)))
    while alive.sum() > count:
        candidates = np.flatnonzero(alive)
        costs = np.zeros(candidates.size)
        for matrix, inverse, where in zip(current, inverses, features, strict=True):
            costs += _single_costs(matrix, inverse, where[candidates])
        order = np.argsort(costs, kind="stable")
        chosen = candidates[order[:min(step, candidates.size - count)]]
        alive[chosen] = False
        for index, (matrix, inverse, where) in enumerate(zip(current, inverses, features,
                                                             strict=True)):
            gone = where[chosen].reshape(-1)
            block = np.linalg.inv(inverse[np.ix_(gone, gone)])
            matrix -= (matrix[:, gone] @ block) @ inverse[gone, :]
            updated = inverse - inverse[:, gone] @ block @ inverse[gone, :]
            dead = where[~alive].reshape(-1)  # exactly zero, not rounding noise
            matrix[:, dead] = 0.0
            updated[dead, :] = 0.0
            updated[:, dead] = 0.0
            inverses[index] = updated
    kept = np.flatnonzero(alive)
    results = []
    for matrix, original, hessian, where in zip(current, weights, hessians, features,
                                                strict=True):
        cut = np.zeros_like(matrix)
        columns = where[kept].reshape(-1)
        cut[:, columns] = np.asarray(original, np.float64)[:, columns]
        better = layer_errors(original, matrix, hessian) <= layer_errors(original, cut, hessian)
        results.append(np.where(better[:, None], matrix, cut))
    return kept, results


def _single_costs(matrix: np.ndarray, inverse: np.ndarray, where: np.ndarray) -> np.ndarray:
    """OBS error of removing each channel alone: Σ_r w_r,c (H⁻¹_cc)⁻¹ w_r,cᵀ."""
    if where.shape[1] == 1:
        columns = where[:, 0]
        diagonal = np.maximum(np.diagonal(inverse)[columns], 1e-300)
        return np.einsum("rc,rc->c", matrix[:, columns], matrix[:, columns]) / diagonal
    blocks = inverse[where[:, :, None], where[:, None, :]]  # [channels, per, per]
    pieces = np.moveaxis(matrix[:, where], 0, 1)  # [channels, rows, per]
    solved = np.linalg.solve(blocks, np.swapaxes(pieces, 1, 2))  # [channels, per, rows]
    return np.einsum("crp,cpr->c", pieces, solved)
