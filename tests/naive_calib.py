"""Slow, obviously correct twins of the calibration kernels, for the tests to compare against.

Loops and float64 everywhere; no blocking, no lazy updates, no numba.
"""

from __future__ import annotations

import itertools

import numpy as np


def prune_count(numel: int, sparsity: float) -> int:
    return min(numel, int(np.floor(sparsity * numel + 0.5)))


def im2col(x: np.ndarray, kernel, strides, dilations, begin, end, groups: int) -> list:
    """X_g [N * output positions, kernel positions * channels] per group, by explicit loops."""
    batch, channels_total = x.shape[:2]
    spatial = x.shape[2:]
    channels = channels_total // groups
    out = [
        (size + b + e - ((k - 1) * d + 1)) // s + 1
        for size, b, e, k, d, s in zip(spatial, begin, end, kernel, dilations, strides, strict=True)
    ]
    offsets = list(itertools.product(*(range(k) for k in kernel)))
    result = []
    for group in range(groups):
        rows = []
        for item in range(batch):
            for position in itertools.product(*(range(o) for o in out)):
                row = []
                for offset in offsets:
                    for channel in range(channels):
                        coords = [
                            p * s + k * d - b
                            for p, s, k, d, b in zip(
                                position, strides, offset, dilations, begin, strict=True
                            )
                        ]
                        inside = all(0 <= c < size for c, size in zip(coords, spatial, strict=True))
                        row.append(
                            x[(item, group * channels + channel, *coords)] if inside else 0.0
                        )
                rows.append(row)
        result.append(np.array(rows, dtype=np.float64).reshape(len(rows), -1))
    return result


def gram(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.T @ x


def inverse_cholesky_upper(hessian: np.ndarray, damp: float) -> np.ndarray:
    """U upper with UᵀU = (H + λI)⁻¹ via the explicit inverse."""
    hessian = np.asarray(hessian, dtype=np.float64)
    level = damp * np.mean(np.diag(hessian))
    inverse = np.linalg.inv(hessian + level * np.eye(len(hessian)))
    return np.linalg.cholesky(inverse).T


def sparsegpt(
    weights: np.ndarray,
    hessian: np.ndarray,
    sparsity: float = 0.5,
    keep_n: int = 0,
    group_m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    grid: tuple[np.ndarray, np.ndarray, int, int] | None = None,
) -> np.ndarray:
    """Textbook OBS sweep: every pruned weight updates all later columns at once; with a
    `grid` (scale, zero point [rows, cols], qmin, qmax) every kept weight is rounded to it
    and its rounding error updates the later columns the same way."""
    w = np.array(weights, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    rows, cols = w.shape
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_cholesky_upper(h, damp)
    if group_m:
        block_size = group_m * max(1, -(-block_size // group_m))
    prune = np.zeros(w.shape, dtype=bool)
    for j in range(cols):
        if not group_m and j % block_size == 0:
            stop = min(cols, j + block_size)
            budget = prune_count(rows * stop, sparsity) - prune_count(rows * j, sparsity)
            saliency = (w[:, j:stop] ** 2 / np.diag(u)[j:stop] ** 2).ravel()
            order = np.argsort(saliency, kind="stable")[:budget]
            block = np.zeros(saliency.size, dtype=bool)
            block[order] = True
            prune[:, j:stop] = block.reshape(rows, stop - j)
        for r in range(rows):
            if group_m and j % group_m == 0:
                saliency = w[r, j : j + group_m] ** 2 / np.diag(u)[j : j + group_m] ** 2
                order = np.argsort(saliency, kind="stable")[: group_m - keep_n]
                prune[r, j : j + group_m] = False
                prune[r, j + order] = True
            if prune[r, j]:
                error = w[r, j] / u[j, j]
                w[r, j:] -= error * u[j, j:]
                w[r, j] = 0.0
            elif grid is not None and grid[0][r, j] > 0:
                scale, zero = float(grid[0][r, j]), float(grid[1][r, j])
                q = min(max(round(w[r, j] / scale) + zero, grid[2]), grid[3])
                rounded = (q - zero) * scale
                error = (w[r, j] - rounded) / u[j, j]
                w[r, j:] -= error * u[j, j:]
                w[r, j] = rounded
    return w


def row_keep_mask(scores: np.ndarray, n_prune: int) -> np.ndarray:
    keep = np.ones(scores.shape, dtype=bool)
    for r, row in enumerate(scores):
        ranked = sorted(
            range(len(row)), key=lambda j, row=row: (np.inf if np.isnan(row[j]) else row[j], j)
        )
        for j in ranked[:n_prune]:
            keep[r, j] = False
    return keep


def wanda_scores(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|W_ij| · ‖X_j‖₂ from the raw tokens X [tokens, inputs]."""
    norms = np.sqrt((np.asarray(x, dtype=np.float64) ** 2).sum(axis=0))
    return np.abs(weights) * norms


def obd_scores(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """½ H_jj W_ij² with H = XᵀX."""
    diagonal = (np.asarray(x, dtype=np.float64) ** 2).sum(axis=0)
    return 0.5 * diagonal * np.asarray(weights, dtype=np.float64) ** 2


def output_error(weights: np.ndarray, pruned: np.ndarray, x: np.ndarray) -> float:
    """‖X Wᵀ − X Ŵᵀ‖² / ‖X Wᵀ‖² from the tokens themselves."""
    x = np.asarray(x, dtype=np.float64)
    dense = x @ np.asarray(weights, dtype=np.float64).T
    sparse = x @ np.asarray(pruned, dtype=np.float64).T
    return float(((dense - sparse) ** 2).sum() / (dense**2).sum())
