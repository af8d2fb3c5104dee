"""Outlier-weighted layer-wise sparsity (OWL; Yin et al., ICML 2024).

Per layer block, the outlier ratio D is the share of the Wanda scores |W_ij|·‖X_j‖ of all
its targets above M × their mean (`--owl-threshold`, M = 5). Blocks with more outliers keep
more weights: the ratios are mapped linearly onto offsets spanning 2λ (`--owl-lambda`,
λ = 0.08), the most outlier-rich block at −λ, and one shift of all offsets makes the overall
sparsity exact. Blocks are what the official code ranks (transformer layers); they are read
from the names of the targets or of their consumer nodes (``layer.3``, ``layers_3``,
``blocks/3``, ``h.3``). Where some target names no block, every target is its own block.

‖X_j‖² comes from one pass of the dense model over the calibration data, whatever method
prunes afterwards (wanda, sparsegpt, ...). Targets that cannot be calibrated get the mean
ratio of the others.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import PruneConfig
from ..methods.wanda import wanda_scores
from ..parts import option
from ..plan import PrunePlan
from ..targets import WeightTarget, read_weights
from . import Allocation, AllocationContext
from .exact import bounds, fit_family, nm_fallback

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 5.0  # M: the official code's range is 5-7
DEFAULT_LAMBDA = 0.08

# a transformer block index in a tensor or node name: layer.3, layers_3, blocks/3, h.3
_BLOCK = re.compile(r"(?:^|[/._:])(?:layers?|blocks?|h)[/._]+(\d+)(?=[/._:]|$)", re.IGNORECASE)


def block_of(target: WeightTarget) -> str | None:
    """The block index the target's name (or its first consumer's) shows, else None."""
    for text in (target.name, *(c.node for c in target.consumers)):
        match = _BLOCK.search(text)
        if match:
            return match.group(1)
    return None


def blocks(targets: Sequence[WeightTarget]) -> list[str]:
    """A block key per target: the named block where every target names one, else itself."""
    found = [block_of(t) for t in targets]
    if None in found or len(set(found)) < 2:
        return [t.name for t in targets]
    return [f"block {b}" for b in found]


def outlier_ratio(scores: np.ndarray, threshold: float) -> float:
    """Share of `scores` above `threshold` × their mean."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    return float(np.count_nonzero(scores > threshold * scores.mean()) / scores.size)


def outlier_ratios(targets: Sequence[WeightTarget], config: PruneConfig,
                   context: AllocationContext, threshold: float = DEFAULT_THRESHOLD
                   ) -> np.ndarray:
    """D per target (in target order; the same for the targets of one block) from Wanda
    scores on the dense model."""
    from ..calib import calibration_feeds
    from ..calib.one_pass import dense_statistics

    loaded = context.loaded_model("owl")
    feeds = context.feeds if context.feeds is not None else calibration_feeds(
        config, loaded.proto)
    found = dense_statistics(loaded, targets, feeds, hessian=False)
    keys = blocks(targets)
    scores_of: dict[str, list[np.ndarray]] = {}
    for target, key in zip(targets, keys, strict=True):
        entry = found.get(target.name)
        if isinstance(entry, str) or entry is None:
            log.warning("%s: no outlier ratio (%s); it gets the mean of the others",
                        target.name, entry)
            continue
        view, stats = entry
        obs = view.to_obs(read_weights(target, loaded.base_dir))
        scores_of.setdefault(key, []).append(
            wanda_scores(obs, stats.sq_norms[:, np.newaxis, :]).ravel())
    by_block = {key: outlier_ratio(np.concatenate(parts), threshold)
                for key, parts in scores_of.items()}
    for key, ratio in by_block.items():
        log.info("owl %s: outlier ratio %.4g", key, ratio)
    fallback = float(np.mean(list(by_block.values()))) if by_block else 0.0
    return np.array([by_block.get(key, fallback) for key in keys])


def owl_offsets(ratios: np.ndarray, spread: float) -> np.ndarray:
    """Sparsity offsets in [−λ, λ]: the highest outlier ratio gets the lowest sparsity."""
    ratios = np.asarray(ratios, dtype=np.float64)
    span = ratios.max() - ratios.min() if ratios.size else 0.0
    if span <= 0:
        return np.zeros_like(ratios)
    return spread - (ratios - ratios.min()) / span * 2 * spread


class OWL(Allocation):
    name = "owl"
    description = "lower sparsity where Wanda scores have more outliers (calibrated)"

    @dataclass(frozen=True)
    class Options:
        threshold: float = option(DEFAULT_THRESHOLD, minimum=0.0, exclusive_minimum=True,
                                  metavar="M", help="outliers are scores above M x the layer "
                                                    "mean")
        lambda_: float = option(DEFAULT_LAMBDA, minimum=0.0, metavar="L",
                                help="largest departure from the target sparsity")

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext) -> PrunePlan:
        if config.pattern.is_nm:
            return nm_fallback(targets, config, self.name)
        ratios = outlier_ratios(targets, config, context, self.options.threshold)
        offsets = config.target_sparsity + owl_offsets(ratios, self.options.lambda_)
        low, high = bounds(config)

        def sparsities_at(shift: float) -> np.ndarray:
            return np.clip(offsets + shift, low, high)

        return fit_family(targets, config, self.name, sparsities_at, -2.0, 2.0)
