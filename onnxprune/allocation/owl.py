"""Outlier-weighted layer-wise sparsity (OWL; Yin et al., ICML 2024).

Per target, the outlier ratio D is the share of its Wanda scores |W_ij|·‖X_j‖ above
M × their mean (`--owl-threshold`, M = 5). Targets with more outliers keep more weights:
the ratios are mapped linearly onto offsets spanning 2λ (`--owl-lambda`, λ = 0.08), the
most outlier-rich target at −λ from the rest, and one shift of all offsets (the weighted
mean) makes the overall sparsity exact. The official code ranks transformer blocks; here
every target is ranked on its own, since ONNX graphs name no blocks.

‖X_j‖² comes from one pass of the dense model over the calibration data, whatever method
prunes afterwards (wanda, sparsegpt, ...). Targets that cannot be calibrated get the mean
ratio of the others.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..config import PruneConfig
from ..io import read_array
from ..methods.wanda import wanda_scores
from ..plan import PrunePlan
from ..targets import WeightTarget
from . import AllocationContext
from .exact import bounds, fit_family, nm_fallback

log = logging.getLogger(__name__)


def outlier_ratio(scores: np.ndarray, threshold: float) -> float:
    """Share of `scores` above `threshold` × their mean."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    return float(np.count_nonzero(scores > threshold * scores.mean()) / scores.size)


def outlier_ratios(targets: Sequence[WeightTarget], config: PruneConfig,
                   context: AllocationContext) -> np.ndarray:
    """D per target (in target order) from Wanda scores on the dense model."""
    from ..calib import load_calibration
    from ..calib.one_pass import dense_statistics

    loaded = context.loaded
    feeds = context.feeds if context.feeds is not None else load_calibration(
        config.calib, loaded.proto, config.calib_samples, config.seed)
    found = dense_statistics(loaded, targets, feeds, hessian=False)
    ratios = np.full(len(targets), np.nan)
    for i, target in enumerate(targets):
        entry = found.get(target.name)
        if isinstance(entry, str) or entry is None:
            log.warning("%s: no outlier ratio (%s); it gets the mean of the others",
                        target.name, entry)
            continue
        view, stats = entry
        obs = view.to_obs(read_array(target.tensor, loaded.base_dir))
        scores = wanda_scores(obs, stats.sq_norms[:, np.newaxis, :])
        ratios[i] = outlier_ratio(scores, config.owl_threshold)
    known = ratios[np.isfinite(ratios)]
    ratios[~np.isfinite(ratios)] = known.mean() if known.size else 0.0
    return ratios


def owl_offsets(ratios: np.ndarray, spread: float) -> np.ndarray:
    """Sparsity offsets in [−λ, λ]: the highest outlier ratio gets the lowest sparsity."""
    ratios = np.asarray(ratios, dtype=np.float64)
    span = ratios.max() - ratios.min() if ratios.size else 0.0
    if span <= 0:
        return np.zeros_like(ratios)
    return spread - (ratios - ratios.min()) / span * 2 * spread


class OWL:
    name = "owl"
    description = "lower sparsity where Wanda scores have more outliers (calibrated)"

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext) -> PrunePlan:
        if config.pattern.is_nm:
            return nm_fallback(targets, config, self.name)
        if config.owl_lambda < 0 or config.owl_threshold <= 0:
            from ..errors import ConfigError

            raise ConfigError(f"--owl-lambda must be >= 0 and --owl-threshold > 0, got "
                              f"{config.owl_lambda:g} and {config.owl_threshold:g}")
        ratios = outlier_ratios(targets, config, context)
        offsets = config.target_sparsity + owl_offsets(ratios, config.owl_lambda)
        low, high = bounds(config)
        for target, ratio in zip(targets, ratios, strict=True):
            log.debug("owl %s: outlier ratio %.4g", target.name, ratio)

        def sparsities_at(shift: float) -> np.ndarray:
            return np.clip(offsets + shift, low, high)

        return fit_family(targets, config, self.name, sparsities_at, -2.0, 2.0)
