"""Streaming statistics of layer inputs: ‖X_j‖² and ΣX_j per input feature and, where asked,
H = XᵀX.

Only running sums are kept per target input (float64 sums of float32 products over chunks
of at most `layouts.CHUNK_ROWS` tokens); the activations are dropped as soon as they are
added.
"""

from __future__ import annotations

import numpy as np

from .layouts import Layout


class ActivationStats:
    """Running sums over calibration tokens of one layer input: ‖X_j‖², ΣX_j (for means and
    variances: structured pruning's FLAP score and bias compensation) and optionally XᵀX."""

    def __init__(self, groups: int, features: int, hessian: bool):
        self.groups = groups
        self.features = features
        self.tokens = 0
        self.nonfinite = 0
        self._sq_norms = np.zeros((groups, features), dtype=np.float64)
        self.sums = np.zeros((groups, features), dtype=np.float64)
        self.hessian = (np.zeros((groups, features, features), dtype=np.float64)
                        if hessian else None)

    def add(self, group: int, rows: np.ndarray) -> None:
        """Add a chunk of tokens [n, features] (float32) of one group."""
        if not np.isfinite(rows).all():
            bad = ~np.isfinite(rows).all(axis=1)
            self.nonfinite += int(bad.sum())
            rows = rows[~bad]
        if group == 0:
            self.tokens += rows.shape[0]
        self.sums[group] += rows.sum(axis=0, dtype=np.float64)
        if self.hessian is not None:
            gram = rows.T @ rows
            self.hessian[group] += gram
        else:
            self._sq_norms[group] += np.einsum("ij,ij->j", rows, rows)

    def add_activation(self, layout: Layout, activation: np.ndarray) -> None:
        for group, rows in layout.rows(activation):
            self.add(group, rows)

    @property
    def sq_norms(self) -> np.ndarray:
        """‖X_j‖² per group and input feature, [groups, features] float64."""
        if self.hessian is not None:
            return np.diagonal(self.hessian, axis1=1, axis2=2).copy()
        return self._sq_norms

    @property
    def means(self) -> np.ndarray:
        """E[X_j] per group and input feature over the tokens, [groups, features] float64."""
        return self.sums / max(self.tokens, 1)

    @property
    def variances(self) -> np.ndarray:
        """Var(X_j) per group and input feature over the tokens (population), float64."""
        tokens = max(self.tokens, 1)
        return np.maximum(self.sq_norms / tokens - self.means ** 2, 0.0)

    def merge(self, other: ActivationStats) -> None:
        """Add another consumer's sums (a weight shared by several nodes)."""
        self.tokens += other.tokens
        self.nonfinite += other.nonfinite
        self._sq_norms += other._sq_norms
        self.sums += other.sums
        if self.hessian is not None and other.hessian is not None:
            self.hessian += other.hessian


def relative_output_error(original: np.ndarray, pruned: np.ndarray,
                          hessian: np.ndarray) -> tuple[float, float]:
    """(‖ΔW Xᵀ‖², ‖W Xᵀ‖²) for W [rows, features] given H = XᵀX, computed as traces with H."""
    hessian32 = hessian.astype(np.float32)
    original = np.asarray(original, dtype=np.float32)
    delta = original - np.asarray(pruned, dtype=np.float32)
    error = float(np.einsum("ij,ij->", delta @ hessian32, delta, dtype=np.float64))
    total = float(np.einsum("ij,ij->", original @ hessian32, original, dtype=np.float64))
    return max(error, 0.0), max(total, 0.0)
