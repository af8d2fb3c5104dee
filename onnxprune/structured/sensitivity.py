"""Sensitivity allocation for structures (`--structure S --allocation sensitivity`).

Each selected group's curve is the model's output error (relative L2 against the dense
outputs in onnxruntime, on the calibration inputs, as `onnxprune sensitivity` measures a
target's) when that group alone loses a share of its channels: the lowest-scored ones by the
run's channel score, counted and rounded as the prune rounds them. It is measured in the
zeroed form (`surgery.zeroed_values`: the removed channels' reads zeroed, which computes what
the shrunk model computes), with the group's changed tensors fed as graph inputs of one
session per group; a group under a normalization over its axis (`--allow-norm`) is shrunk
for real instead. A curve is that of the plain cut: a refit (`--update`, bias
compensation, `obs`) can only lower it. `onnxprune sensitivity --structure S` writes the
curves; `--sensitivity JSON` reuses them.

The kept counts come from the unstructured sensitivity allocation's Lagrangian over each
curve's lower convex hull of squared error (`allocation.sensitivity.allocate`), on
parameters: `--sparsity F` removes that share of the selected groups' parameters with the
least predicted error, each count then rounded to the nearest allowed width; `--max-error E`
removes the most whose predicted error sqrt(Σ e_g²) stays under E, each count rounded up
to an allowed width (a hull is convex from 0, so keeping more never predicts more error).
Under `--latency-budget` the hulls price the budget's moves instead (`error_costs`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from ..config import PruneConfig
from ..errors import ConfigError
from ..graph_suffix import CutValues, SuffixPlan, suffix_plan
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
    load_curves,
)
from .groups import ChannelGroup
from .run import ScoredGroups
from .selection import allowed_widths, keep_sets, rounded_count, unit
from .surgery import shrink, zeroed_roles, zeroed_values

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
    widths = {g.name: [k for k in sorted({rounded_count(g, (1.0 - level) * g.channels,
                                                         config.round_to)
                                          for level in levels}, reverse=True)
                       if k < g.channels] for g in scored.groups}
    points = sum(len(kept) for kept in widths.values())
    plans = [_suffix_plan(loaded, group) if widths[group.name] else None
             for group in scored.groups]
    cut_values = CutValues(loaded.proto, plans, feeds, sweep.session_of, sweep.outputs_named)
    curves = []
    for index, group in enumerate(scored.groups):
        curve = TargetCurve(group.name, group.kind.value, [group.channels],
                            round(scored.per_channel[group.name] * group.channels))
        plan = plans[index]
        suffix = None if plan is None else (plan, cut_values.values(index))
        for kept, errors in _errors(loaded, group, scored, widths[group.name], sweep,
                                    suffix):
            share = (group.channels - kept) / group.channels
            curve.points.append(SweepPoint(share, share, *errors))
            if progress:
                progress(group, share, points)
        if not curve.points:
            curve.note = "no level removes a channel at the group's rounding"
            log.warning("%s: no level removes one of its %d channels at --round-to %d; "
                        "it will be kept whole", group.name, group.channels, config.round_to)
        curves.append(curve)
        log.info("sensitivity of group %d/%d %s: %s", len(curves), len(scored.groups),
                 group.name, ", ".join(f"{p.sparsity:.3g}: {p.relative_l2:.3g}"
                                       for p in curve.points) or curve.note)
    name = loaded.path.name if loaded.path is not None else (loaded.proto.graph.name or "")
    return SensitivityResult(name, config.method, "unstructured", list(levels), len(feeds),
                             synthetic, curves, structure=config.structure,
                             round_to=config.round_to)


def _suffix_plan(loaded: LoadedModel, group: ChannelGroup) -> SuffixPlan | None:
    """Where the model can be cut before the group's zeroed tensors (`surgery.zeroed_roles`)
    are first read, when they are main-graph initializers; None for a group under a norm
    (measured by its real cut)."""
    if not group.output_preserving:
        return None
    roles = zeroed_roles(group)
    names = {m.tensor for m in group.members if m.role in roles}
    initializers = {t.name for t in loaded.proto.graph.initializer}
    if loaded.proto.ir_version < 4 or not names <= initializers:
        return None
    return suffix_plan(loaded.proto, names)


def _errors(loaded: LoadedModel, group: ChannelGroup, scored: ScoredGroups,
            widths: Sequence[int], sweep: OutputSweep,
            suffix: tuple[SuffixPlan, list] | None):
    """(kept count, (relative L2, cosine, top-1)) of the group cut to each width: zeroed,
    its changed tensors fed to one session (of the model's part after them, `suffix`, where
    there is one); a group under a normalization over its axis (`--allow-norm`) is shrunk
    for real, a session per width, as zeroing is not cutting there (the norm still
    averages over the zeros)."""
    def keep(kept: int) -> dict[str, np.ndarray]:
        return keep_sets([group], scored.scores, {group.name: kept})

    if not widths:
        return
    if not group.output_preserving:
        for kept in widths:
            yield kept, sweep.error_of(shrink(loaded.proto, [group], keep(kept),
                                              base_dir=loaded.base_dir))
        return
    def zeroed(kept: int):
        return zeroed_values(loaded.proto, [group], keep(kept), base_dir=loaded.base_dir)

    first = zeroed(widths[0])  # names the tensors every width changes
    with sweep.for_tensors([Replaced.of(stored) for stored, _ in first], suffix) as run:
        for kept in widths:
            pairs = first if kept == widths[0] else zeroed(kept)
            yield kept, run({stored.name: array for stored, array in pairs})


def _hulls(loaded: LoadedModel, scored: ScoredGroups, config: PruneConfig
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each group's squared output error against the share of its channels removed (lower
    convex hull, from 0 to the last swept share or all but one unit), from `--sensitivity`
    curves or a sweep made now."""
    from ..allocation.sensitivity import energy_curve
    from ..registry import ALLOCATIONS

    options = ALLOCATIONS.build("sensitivity", config.options).options
    if options.curves is not None:
        result = load_curves(options.curves, config.structure)
    else:
        log.info("no --sensitivity curves given: measuring them (%d groups)",
                 len(scored.groups))
        result = group_curves(loaded, scored, config)
    if result.method != config.method or result.round_to not in (None, config.round_to):
        log.warning("sensitivity curves were measured with %s, --round-to %s; pruning uses "
                    "%s, --round-to %d", result.method, result.round_to, config.method,
                    config.round_to)
    hulls = []
    for group in scored.groups:
        curve = result.curve(group.name)
        if curve is None or curve.shape[:1] != [group.channels]:
            raise ConfigError(f"the sensitivity curves have no entry for group {group.name!r} "
                              f"of {group.channels} channels; rerun `onnxprune sensitivity "
                              "--structure` on this model with the same selection")
        # at most all but one unit of channels, and not beyond the last swept share
        most = (group.channels - unit(group, config.round_to)) / group.channels
        top = min(most, curve.points[-1].sparsity) if curve.points else 0.0
        hulls.append(energy_curve(curve, 0.0, max(0.0, top)))
    return hulls


def error_costs(loaded: LoadedModel, scored: ScoredGroups, config: PruneConfig
                ) -> dict[str, Callable[[int], float]]:
    """Per group, its predicted squared output error at a kept count (infinite below the
    swept shares): what `--latency-budget` with `--allocation sensitivity` spends."""
    costs: dict[str, Callable[[int], float]] = {}
    for group, (xs, ys) in zip(scored.groups, _hulls(loaded, scored, config), strict=True):
        def cost(kept: int, group=group, xs=xs, ys=ys) -> float:
            share = (group.channels - kept) / group.channels
            return float(np.interp(share, xs, ys)) if share <= xs[-1] + 1e-9 else math.inf
        costs[group.name] = cost
    return costs


def sensitivity_counts(loaded: LoadedModel, scored: ScoredGroups, config: PruneConfig
                       ) -> dict[str, int]:
    """Kept channels per group with the least predicted output error for `--sparsity` (or
    the most removed under `--max-error`), from the groups' curves (see the module doc)."""
    from ..allocation.sensitivity import allocate
    from ..registry import ALLOCATIONS

    options = ALLOCATIONS.build("sensitivity", config.options).options
    groups = scored.groups
    params = np.array([scored.per_channel[g.name] * g.channels for g in groups])
    hulls = _hulls(loaded, scored, config)
    if options.max_error is not None:
        if config.sparsity is not None:
            log.warning("--sparsity %g is ignored: --max-error sets how much is removed",
                        config.sparsity)
        removed = allocate(params, hulls, None, float(options.max_error) ** 2)
    else:
        wanted = float(config.target_sparsity * params.sum())
        removed = allocate(params, hulls, wanted, None)
        if removed.sum() < wanted * (1 - 1e-6):
            log.warning("--sparsity %g: only %.4f of the groups' parameters can be removed "
                        "within the swept shares and one unit per group (sweep higher "
                        "--levels)", config.target_sparsity, removed.sum() / params.sum())
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
    log.info("structured sensitivity allocation: %.4f of the groups' parameters removed "
             "(counted per group), predicted relative L2 %.4g%s",
             taken / max(1.0, float(params.sum())), predicted,
             "" if options.max_error is None else f" (--max-error {options.max_error:g})")
    return counts
