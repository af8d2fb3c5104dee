"""Sensitivity allocation: per-target sparsities with the least predicted output error.

The curves of `onnxprune sensitivity` (`--sensitivity JSON`, else measured now with the run's
method, pattern and calibration data) give each target's output error e_i(s) when it alone
is pruned to s. Errors of different targets are taken to add as energies: the predicted
relative L2 of the model is sqrt(Σ e_i(s_i)²). Each curve of e² (linear between swept
points, from 0 at s = 0) is replaced by its lower convex hull on the target's allowed range;
taking hull segments in order of error per pruned weight, across all targets, is then the
exact Lagrangian optimum: the overall count is reached with the least predicted error, or,
with `--max-error E`, the most weights are pruned whose predicted error stays under E.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import PruneConfig
from ..errors import ConfigError
from ..parts import option
from ..patterns import prune_count
from ..plan import PrunePlan
from ..targets import WeightTarget
from . import Allocation, AllocationContext
from .exact import bounds, check_reachable, count_bounds, exact_plan, nm_fallback, round_counts

log = logging.getLogger(__name__)


def lower_hull(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of the lower convex hull of points sorted by x."""
    hull: list[int] = []
    for i in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the line from a to i
            if (ys[b] - ys[a]) * (xs[i] - xs[a]) >= (ys[i] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return xs[hull], ys[hull]


def energy_curve(curve, low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """The target's squared error on [low, high]: the swept points inside, interpolated
    ends, as a lower convex hull."""
    inside = [p.sparsity for p in curve.points if low < p.sparsity < high]
    xs = np.array([low, *inside, high], dtype=np.float64)
    ys = np.array([curve.error_at(x) ** 2 for x in xs])
    return lower_hull(xs, ys)


def allocate(numels: np.ndarray, hulls: Sequence[tuple[np.ndarray, np.ndarray]],
             total: float | None, energy_budget: float | None) -> np.ndarray:
    """Real-valued counts per target: hull segments taken cheapest per weight first until
    `total` weights are pruned, or until the summed energy would pass `energy_budget`."""
    counts = np.array([xs[0] * n for (xs, _), n in zip(hulls, numels, strict=True)])
    energy = float(sum(ys[0] for _, ys in hulls))
    segments = []  # (cost per weight, target order, weights, energy)
    for i, ((xs, ys), n) in enumerate(zip(hulls, numels, strict=True)):
        for j in range(len(xs) - 1):
            width = (xs[j + 1] - xs[j]) * n
            if width > 0:
                segments.append(((ys[j + 1] - ys[j]) / width, i, j, width, ys[j + 1] - ys[j]))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    for _, i, _, width, cost in segments:
        if total is not None:
            need = total - counts.sum()
            if need <= 0:
                break
            part = min(1.0, need / width)
        else:
            if energy_budget is None:
                raise ValueError("allocate needs a total count or an energy budget")
            room = energy_budget - energy
            if room <= 0:
                break
            part = 1.0 if cost <= room else room / cost
        counts[i] += part * width
        energy += part * cost
        if part < 1.0:
            break
    return counts


class SensitivityAllocation(Allocation):
    name = "sensitivity"
    description = "least predicted output error from per-target sensitivity curves"

    @dataclass(frozen=True)
    class Options:
        max_error: float | None = option(None, minimum=0.0, metavar="E", flag="max-error",
                                         help="the highest overall sparsity whose predicted "
                                              "output error stays under E")
        curves: str | None = option(None, metavar="JSON", flag="sensitivity",
                                    help="curves from `onnxprune sensitivity` (default: "
                                         "measured now)")

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext) -> PrunePlan:
        if config.pattern.is_nm:
            return nm_fallback(targets, config, self.name)
        result = self._curves(targets, config, context)
        if result.method != config.method or result.pattern != str(config.pattern):
            log.warning("sensitivity curves were measured with %s %s; pruning uses %s %s",
                        result.method, result.pattern, config.method, config.pattern)
        numels = np.array([t.numel for t in targets], dtype=np.int64)
        low, high = bounds(config)
        hulls, highs = [], []
        for target in targets:
            curve = result.curve(target.name)
            if curve is None or not curve.points:
                raise ConfigError(f"the sensitivity curves have no entry for target "
                                  f"{target.name!r}; rerun `onnxprune sensitivity` with the "
                                  "same target selection")
            # no sparsity beyond the last swept level: the error there is not known
            top = min(high, curve.points[-1].sparsity)
            highs.append(top)
            hulls.append(energy_curve(curve, min(low, top), top))
        low_counts, high_counts = count_bounds(numels, low, np.array(highs))
        if self.options.max_error is not None:
            ideal = allocate(numels, hulls, None, float(self.options.max_error) ** 2)
            total = int(np.floor(ideal.sum() + 1e-6))
            if config.sparsity is not None:
                log.warning("--sparsity %g is ignored: --max-error sets the overall sparsity",
                            config.sparsity)
            if total < int(low_counts.sum()):
                log.warning("--max-error %g cannot be met within --min-target-sparsity; "
                            "every target is pruned to its minimum", self.options.max_error)
                total = int(low_counts.sum())
            log.info("sensitivity allocation: predicted error %.4g reached at overall "
                     "sparsity %.4f", self.options.max_error, total / max(1, int(numels.sum())))
        else:
            total = prune_count(int(numels.sum()), config.target_sparsity)
            check_reachable(total, low_counts, high_counts, config.target_sparsity)
            ideal = allocate(numels, hulls, total, None)
        counts = round_counts(ideal, total, low_counts, high_counts)
        predicted = np.sqrt(sum(np.interp(c / n, xs, ys) for (xs, ys), c, n
                                in zip(hulls, counts, numels, strict=True)))
        log.info("sensitivity allocation: %d weights pruned, predicted relative L2 %.4g",
                 total, predicted)
        return exact_plan(targets, counts, config, self.name)

    def _curves(self, targets: Sequence[WeightTarget], config: PruneConfig,
                context: AllocationContext):
        from ..sensitivity_sweep import analyze, load_curves

        if self.options.curves is not None:
            return load_curves(self.options.curves, "none")
        log.info("no --sensitivity curves given: measuring them (%d targets)", len(targets))
        return analyze(context.loaded_model(self.name), config, feeds=context.feeds)
