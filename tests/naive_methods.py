"""Slow, obviously correct twins of RIA, the ADMM update and DSnoT, for the tests.

float64 and loops; errors are computed from their definition, inverses explicitly.
Matrices are [outputs, inputs]; `hessian` is XᵀX.
"""

from __future__ import annotations

import numpy as np


def quadratic_error(weights: np.ndarray, pruned: np.ndarray, hessian: np.ndarray) -> float:
    """‖(W − Ŵ) Xᵀ‖² = Σ_rows (w − ŵ) H (w − ŵ)ᵀ."""
    delta = np.asarray(pruned, np.float64) - np.asarray(weights, np.float64)
    return float(sum(row @ hessian @ row for row in delta))


def lowest_first(scores: np.ndarray, count: int) -> np.ndarray:
    """Keep-mask pruning the `count` lowest scores (ties: lower flat index first)."""
    flat = scores.ravel()
    order = sorted(range(flat.size), key=lambda i: (flat[i], i))
    keep = np.ones(flat.size, dtype=bool)
    keep[order[:count]] = False
    return keep.reshape(scores.shape)


def keep_n_of_m(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the n largest of every m consecutive columns (ties: lower column kept)."""
    keep = np.zeros(scores.shape, dtype=bool)
    for r in range(scores.shape[0]):
        for start in range(0, scores.shape[1], m):
            group = range(start, start + m)
            best = sorted(group, key=lambda c, r=r: (-scores[r, c], c))[:n]
            keep[r, best] = True
    return keep


def ria_scores(weights: np.ndarray, x: np.ndarray, alpha: float) -> np.ndarray:
    """(|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖^alpha from the tokens X."""
    weights = np.asarray(weights, np.float64)
    rows, cols = weights.shape
    scores = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            row_sum = sum(abs(weights[i, k]) for k in range(cols))
            column_sum = sum(abs(weights[k, j]) for k in range(rows))
            norm = np.sqrt(sum(float(t) ** 2 for t in np.asarray(x, np.float64)[:, j]))
            relative = (abs(weights[i, j]) / row_sum if row_sum else 0.0) + (
                abs(weights[i, j]) / column_sum if column_sum else 0.0)
            scores[i, j] = relative * norm ** alpha
    return scores


def admm(weights: np.ndarray, hessian: np.ndarray, *, count: int = 0, keep_n: int = 0,
         group_m: int = 0, fixed: np.ndarray | None = None, iters: int = 20, rho: float = 1.0,
         damp: float = 0.1, gradual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The ADMM reconstruction written out: (weights, keep mask)."""
    hessian = np.asarray(hessian, np.float64)
    cols = hessian.shape[0]
    alive = np.diag(hessian) > 0
    scale = np.where(alive, np.sqrt(np.where(alive, np.diag(hessian), 1.0)), 1.0)
    normal = np.zeros((cols, cols))
    for i in range(cols):
        for j in range(cols):
            if alive[i] and alive[j]:
                normal[i, j] = hessian[i, j] / (scale[i] * scale[j])
    mean = np.mean(np.diag(normal))
    damp_level, rho_level = damp * mean, rho * mean
    inverse = np.linalg.inv(normal + (damp_level + rho_level) * np.eye(cols))
    start = np.asarray(weights, np.float64) * scale
    ramp = max(1, round(0.75 * iters)) if gradual else 0

    def mask(values, iteration):
        if fixed is not None:
            return fixed
        share = 1.0 if iteration >= ramp else 1.0 - (1.0 - (iteration + 1) / ramp) ** 3
        magnitudes = np.abs(values)
        if group_m:
            magnitudes = np.where(keep_n_of_m(magnitudes, keep_n, group_m), np.inf,
                                  magnitudes)
            rest = values.size * (group_m - keep_n) // group_m
            return lowest_first(magnitudes, int(round(rest * share)))
        return lowest_first(magnitudes, int(round(count * share)))

    if iters == 0:
        keep = mask(start, ramp)
        return start * keep / scale, keep
    w, u = start.copy(), np.zeros_like(start)
    keep = mask(start, ramp if not gradual else 0)
    for iteration in range(iters):
        if iteration < ramp:
            keep = mask(w + u, iteration)
        z = (w + u) * keep
        u = u + w - z
        w = (start @ (normal + damp_level * np.eye(cols)) + rho_level * (z - u)) @ inverse
    result = (w + u) * keep
    plain = start * keep
    if quadratic_error(start, result, normal) > quadratic_error(start, plain, normal):
        result = plain
    return result / scale, keep


def dsnot(weights: np.ndarray, hessian: np.ndarray, keep: np.ndarray, cycles: int,
          keep_n: int = 0, group_m: int = 0, growable: np.ndarray | None = None
          ) -> np.ndarray:
    """DSnoT's greedy swaps with every error computed from scratch; the new keep mask."""
    weights = np.asarray(weights, np.float64)
    keep = keep.copy()
    growable = np.ones(keep.shape, bool) if growable is None else growable
    for r in range(weights.shape[0]):
        w = weights[r]

        def error(mask, w=w):
            lost = w * ~mask
            return lost @ hessian @ lost

        def swapped(mask, grow, prune):
            mask = mask.copy()
            mask[grow], mask[prune] = True, False
            return mask

        start_error = error(keep[r])
        for _ in range(cycles):
            row, base = keep[r], error(keep[r])
            kept = [c for c in range(len(w)) if row[c]]
            pruned = [c for c in range(len(w)) if not row[c] and growable[r, c] and w[c] != 0]
            pairs = []  # (ΔE, grow, prune) in the order the kernel prefers them
            if group_m:
                for start in range(0, len(w), group_m):
                    group = range(start, start + group_m)
                    pairs += [(error(swapped(row, j, k)) - base, j, k)
                              for j in group if j in pruned for k in group if k in kept]
            elif kept and pruned:
                grow_only = [error(row | np.eye(1, len(w), j, bool)[0]) - base for j in pruned]
                grow = pruned[int(np.argmin(grow_only))]
                pairs += [(error(swapped(row, grow, k)) - base, grow, k) for k in kept]
                prune_only = [error(row & ~np.eye(1, len(w), k, bool)[0]) - base for k in kept]
                prune = kept[int(np.argmin(prune_only))]
                pairs += [(error(swapped(row, j, prune)) - base, j, prune) for j in pruned]
            best = min(pairs, key=lambda p: p[0], default=None)  # first of equal ones
            if best is None or not best[0] < -1e-9 * abs(start_error):
                break
            keep[r] = swapped(row, best[1], best[2])
    return keep
