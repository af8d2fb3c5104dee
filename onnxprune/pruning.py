"""The prune job: discover targets, score, mask, write the zeros back into the model."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from . import kernels
from .allocation import GlobalThreshold
from .config import PruneConfig
from .errors import NothingToPruneError
from .io import LoadedModel, read_array, write_array
from .patterns import is_nm, layer_keep_mask
from .report import SkipReport, TargetReport
from .scoring import score
from .targets import Selection, SkippedTensor, WeightTarget, discover_targets

log = logging.getLogger(__name__)

Progress = Callable[[WeightTarget], None]


def selection_of(config: PruneConfig) -> Selection:
    return Selection(config.include, config.exclude, config.min_size, config.pattern)


def prune_loaded(loaded: LoadedModel, config: PruneConfig,
                 progress: Progress | None = None
                 ) -> tuple[list[TargetReport], list[SkipReport]]:
    """Prune `loaded.proto` in place. Returns per-target and skipped reports."""
    targets, skipped = discover_targets(loaded.proto, selection_of(config))
    if not targets:
        raise NothingToPruneError(
            f"nothing to prune: no tensor qualified as a target ({len(skipped)} skipped; "
            "run `onnxprune inspect` to see why, or lower --min-size)")
    pattern = config.pattern
    sparsity = config.target_sparsity

    def scores_of(target: WeightTarget, weights: np.ndarray | None = None) -> np.ndarray:
        if weights is None:
            weights = read_array(target.tensor, loaded.base_dir)
        return score(config.method, target, weights, config.seed)

    global_threshold = None
    if config.scope == "global" and not pattern.is_nm:
        global_threshold = GlobalThreshold(targets, scores_of, sparsity)

    reports = []
    for target in targets:
        weights = read_array(target.tensor, loaded.base_dir, writable=True)
        zeros_before = kernels.count_zeros(weights)
        scores = scores_of(target, weights)
        if global_threshold is not None:
            keep = global_threshold.keep_mask(scores)
        else:
            keep = layer_keep_mask(target, scores, pattern, sparsity)
        del scores
        zeros = kernels.apply_mask(weights, keep)
        del keep
        write_array(target.tensor, weights)
        log.info("%s: %d of %d zero (%s)", target.name, zeros, target.numel, pattern)
        reports.append(target_report(target, weights, zeros, "dense", str(pattern), zeros_before))
        if progress:
            progress(target)
    return reports, [skip_report(s) for s in skipped]


def target_report(target: WeightTarget, weights: np.ndarray, zeros: int, fmt: str,
                  pattern: str, zeros_before: int | None = None) -> TargetReport:
    return TargetReport(
        name=target.name, op_type=target.op_type, shape=list(target.shape), dtype=target.dtype,
        axis=target.reduction_axis, numel=target.numel, zeros=int(zeros),
        sparsity=zeros / target.numel if target.numel else 0.0, pattern=pattern, format=fmt,
        source=target.source, bytes=target.nbytes, is_2_4=is_nm(target, weights, 2, 4),
        zeros_before=zeros_before,
        consumers=[f"{c.node}:{c.slot}" for c in target.consumers])


def skip_report(skipped: SkippedTensor) -> SkipReport:
    return SkipReport(skipped.name, skipped.reason, list(skipped.shape), skipped.dtype,
                      skipped.source)
