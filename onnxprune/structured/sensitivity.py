"""Sensitivity allocation for structures (`--structure S --allocation sensitivity`).

Each selected group's curve is the model's output error (relative L2 against the dense
outputs in onnxruntime, on the calibration inputs, as `onnxprune sensitivity` measures a
target's) when that group alone loses a share of its channels: the lowest-scored ones by the
run's channel score, counted and rounded as the prune rounds them. It is measured in the
zeroed form (`surgery.zeroed_values`: the removed channels' reads zeroed, which computes what
the shrunk model computes), with the group's changed tensors fed as graph inputs of one
session per group. A curve is that of the plain cut: a refit (`--update`, bias
compensation, `obs`) can only lower it. `onnxprune sensitivity --structure S` writes the
curves; `--sensitivity JSON` reuses them.

The kept counts come from the unstructured sensitivity allocation's Lagrangian over each
curve's lower convex hull of squared error (`allocation.sensitivity.allocate`), on
parameters: `--sparsity F` removes that share of the selected groups' parameters with the
least predicted error, each count then rounded to the nearest allowed width; `--max-error E`
removes the most whose predicted error sqrt(Σ e_g²) stays under E, each count rounded up
to an allowed width (a hull is convex from 0, so keeping more never predicts more error).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..config import PruneConfig
from ..errors import ConfigError
from ..inputs import Feed
from ..io import LoadedModel
from ..sensitivity_sweep import (
    OutputSweep,
    Replaced,
    SensitivityResult,
    SweepPoint,
    SweepProgress,
    TargetCurve,
    check_levels,
)
from .groups import ChannelGroup
from .run import ScoredGroups
from .selection import allowed_widths, keep_sets, rounded_count, unit
from .surgery import zeroed_values

log = logging.getLogger(__name__)

# shares of a group's channels removed: eighths, as the latency tables time them (a small
# group rounds several to one width, measured once)
LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def group_curves(loaded: LoadedModel, scored: ScoredGroups, config: PruneConfig, *,
                 levels: Sequence[float] = LEVELS,
                 feeds: Sequence[Feed] | None = None,
                 progress: SweepProgress | None = None) -> SensitivityResult:
    """The output-error curve of every scored group cut alone at each level (a share of its
    channels, rounded to its allowed widths; levels that round alike are measured once)."""
    from ..calib import calibration_feeds

    levels = check_levels(levels)
    synthetic = feeds is None and config.calib is None
    if feeds is None:
        feeds = calibration_feeds(config, loaded.proto)
    sweep = OutputSweep(loaded, feeds)
    curves = []
    for group in scored.groups:
        curve = TargetCurve(group.name, group.kind.value, [group.channels],
                            round(scored.per_channel[group.name] * group.channels))
        kept_counts = sorted({rounded_count(group, (1.0 - level) * group.channels,
                                            config.round_to) for level in levels}, reverse=True)
        kept_counts = [k for k in kept_counts if k < group.channels]
        if kept_counts:
            changed = [Replaced.of(stored) for stored, _ in
                       _zeroed(loaded, group, scored, kept_counts[0])]
            with sweep.for_tensors(changed) as run:
                for kept in kept_counts:
                    values = {stored.name: array
                              for stored, array in _zeroed(loaded, group, scored, kept)}
                    share = (group.channels - kept) / group.channels
                    curve.points.append(SweepPoint(share, share, *run(values)))
                    log.debug("%s: %d of %d channels kept, relative L2 %.4g", group.name,
                              kept, group.channels, curve.points[-1].relative_l2)
                    if progress:
                        progress(group, share, len(scored.groups) * len(levels))
        else:
            curve.note = "no level removes a channel at the group's rounding"
        curves.append(curve)
        log.info("sensitivity of group %d/%d %s: %s", len(curves), len(scored.groups),
                 group.name, ", ".join(f"{p.sparsity:.3g}: {p.relative_l2:.3g}"
                                       for p in curve.points) or curve.note)
    name = loaded.path.name if loaded.path is not None else (loaded.proto.graph.name or "")
    return SensitivityResult(name, config.method, "unstructured", list(levels), len(feeds),
                             synthetic, curves, structure=config.structure)


def _zeroed(loaded: LoadedModel, group: ChannelGroup, scored: ScoredGroups, kept: int):
    keep = keep_sets([group], scored.scores, {group.name: kept})
    return zeroed_values(loaded.proto, [group], keep, base_dir=loaded.base_dir)


def sensitivity_counts(loaded: LoadedModel, scored: ScoredGroups, config: PruneConfig
                       ) -> dict[str, int]:
    """Kept channels per group with the least predicted output error for `--sparsity` (or
    the most removed under `--max-error`), from the groups' curves (see the module doc)."""
    from ..allocation.sensitivity import allocate, energy_curve
    from ..registry import ALLOCATIONS

    options = ALLOCATIONS.build("sensitivity", config.options).options
    if options.curves is not None:
        result = SensitivityResult.load(options.curves)
        if not result.structure:
            raise ConfigError(f"--sensitivity {options.curves}: the curves are per target; a "
                              "structured prune needs `onnxprune sensitivity --structure "
                              f"{config.structure}`")
    else:
        log.info("no --sensitivity curves given: measuring them (%d groups)",
                 len(scored.groups))
        result = group_curves(loaded, scored, config)
    if result.method != config.method:
        log.warning("sensitivity curves were measured with %s; pruning uses %s",
                    result.method, config.method)
    groups = scored.groups
    params = np.array([scored.per_channel[g.name] * g.channels for g in groups])
    hulls = []
    for group in groups:
        curve = result.curve(group.name)
        if curve is None:
            raise ConfigError(f"the sensitivity curves have no entry for group {group.name!r}; "
                              "rerun `onnxprune sensitivity --structure` with the same "
                              "selection")
        # at most all but one unit of channels, and not beyond the last swept share
        most = (group.channels - unit(group, config.round_to)) / group.channels
        top = min(most, curve.points[-1].sparsity) if curve.points else 0.0
        hulls.append(energy_curve(curve, 0.0, max(0.0, top)))
    if options.max_error is not None:
        if config.sparsity is not None:
            log.warning("--sparsity %g is ignored: --max-error sets how much is removed",
                        config.sparsity)
        removed = allocate(params, hulls, None, float(options.max_error) ** 2)
    else:
        removed = allocate(params, hulls, float(config.target_sparsity * params.sum()), None)
    counts = {}
    shares = []
    for group, gone, (xs, ys) in zip(groups, removed, hulls, strict=True):
        per = scored.per_channel[group.name]
        wanted = group.channels - (gone / per if per else 0.0)
        if options.max_error is not None:  # the next allowed width up: under the bound
            kept = min(w for w in allowed_widths(group, config.round_to) if w >= wanted - 1e-6)
        else:
            kept = rounded_count(group, wanted, config.round_to)
        counts[group.name] = kept
        shares.append(float(np.interp((group.channels - kept) / group.channels, xs, ys)))
    predicted = float(np.sqrt(sum(shares)))
    taken = sum(scored.per_channel[g.name] * (g.channels - counts[g.name]) for g in groups)
    log.info("structured sensitivity allocation: %.4f of the groups' parameters removed, "
             "predicted relative L2 %.4g%s", taken / max(1.0, float(params.sum())), predicted,
             f" (--max-error {options.max_error:g})" if options.max_error is not None else "")
    return counts
