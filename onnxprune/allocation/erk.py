"""Erdős–Rényi-kernel allocation (Evci et al., RigL, 2020): density by tensor shape.

A target's density is proportional to sum(shape) / prod(shape) — (fan_in + fan_out + kernel
dims) / (fan_in · fan_out · kernel) — so small and thin tensors keep more of their weights.
One scale factor is found so the overall sparsity is met; targets that would exceed density
1 (or leave the per-target bounds) are capped and the others take up the difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import PruneConfig
from ..plan import PrunePlan
from ..targets import WeightTarget
from . import Allocation, AllocationContext
from .exact import bounds, fit_family, nm_fallback


def erk_ratio(shape: Sequence[int]) -> float:
    """sum(shape) / prod(shape): ERK's unscaled density of a tensor."""
    size = float(np.prod(shape, dtype=np.float64))
    return float(sum(shape)) / size if size else 0.0


class ERK(Allocation):
    name = "erk"
    description = "density proportional to sum(shape)/prod(shape) (Erdős–Rényi kernel)"

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext | None = None) -> PrunePlan:
        if config.pattern.is_nm:
            return nm_fallback(targets, config, self.name)
        ratios = np.array([erk_ratio(t.shape) for t in targets])
        low, high = bounds(config)

        def sparsities_at(scale: float) -> np.ndarray:
            # density = ratio / scale: a larger scale prunes more everywhere
            return np.clip(1.0 - ratios / scale, low, high)

        return fit_family(targets, config, self.name, sparsities_at, 1e-12, 1e12,
                          geometric=True)
