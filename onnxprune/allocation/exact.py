"""Per-target sparsities -> per-target prune counts that add up exactly to the overall count.

Non-uniform allocations (erk, owl, sensitivity) decide a real-valued sparsity per target;
these helpers shift them until the total meets ``prune_count(total weights, s)`` and round
them to whole weights without losing or gaining one, within the user's per-target bounds
(`--min-target-sparsity` / `--max-target-sparsity`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from ..config import PruneConfig
from ..errors import ConfigError
from ..plan import PrunePlan, TargetPlan
from ..targets import WeightTarget

log = logging.getLogger(__name__)

BISECTION_STEPS = 200


def bounds(config: PruneConfig) -> tuple[float, float]:
    """(lowest, highest) sparsity a target may get; checked against the overall target."""
    low = 0.0 if config.min_target_sparsity is None else float(config.min_target_sparsity)
    high = 1.0 if config.max_target_sparsity is None else float(config.max_target_sparsity)
    if not 0.0 <= low <= 1.0 or not 0.0 <= high <= 1.0:
        raise ConfigError(f"--min-target-sparsity / --max-target-sparsity must lie in [0, 1], "
                          f"got {low:g} / {high:g}")
    if low > high:
        raise ConfigError(f"--min-target-sparsity {low:g} is above --max-target-sparsity "
                          f"{high:g}")
    return low, high


def count_bounds(numels: np.ndarray, low: float | np.ndarray, high: float | np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-weight bounds: at least ceil(low·n), at most floor(high·n) pruned per target."""
    low_counts = np.ceil(np.asarray(low) * numels - 1e-9).astype(np.int64)
    high_counts = np.floor(np.asarray(high) * numels + 1e-9).astype(np.int64)
    return np.minimum(low_counts, numels), np.maximum(np.minimum(high_counts, numels),
                                                      np.minimum(low_counts, numels))


def check_reachable(total: int, low_counts: np.ndarray, high_counts: np.ndarray,
                    sparsity: float) -> None:
    """A `ConfigError` when the per-target bounds cannot add up to the overall count."""
    if total < int(low_counts.sum()) or total > int(high_counts.sum()):
        raise ConfigError(f"overall sparsity {sparsity:g} is out of reach within the per-target "
                          f"bounds (they allow {int(low_counts.sum()):,} to "
                          f"{int(high_counts.sum()):,} pruned weights, {total:,} are asked)")


def solve_shift(numels: np.ndarray, sparsities_at: Callable[[float], np.ndarray], total: int,
                start: float, stop: float, geometric: bool = False) -> np.ndarray:
    """The sparsities ``sparsities_at(t)`` (non-decreasing in t) whose weighted sum comes
    closest to `total` pruned weights, t found by bisection in [start, stop]."""
    low, high = start, stop
    for _ in range(BISECTION_STEPS):
        middle = math.sqrt(low * high) if geometric else (low + high) / 2
        if middle in (low, high):
            break
        if float(np.dot(sparsities_at(middle), numels)) < total:
            low = middle
        else:
            high = middle
    below, above = sparsities_at(low), sparsities_at(high)
    return above if abs(np.dot(above, numels) - total) <= abs(np.dot(below, numels) - total) \
        else below


def round_counts(ideal: np.ndarray, total: int, low_counts: np.ndarray,
                 high_counts: np.ndarray) -> np.ndarray:
    """Whole counts within the bounds that sum to `total`, each as close to `ideal` as the
    sum allows: floors first, then one more weight to the largest fractional parts (ties:
    earlier target first); taken back the same way if the floors overshoot."""
    ideal = np.clip(np.asarray(ideal, dtype=np.float64), low_counts, high_counts)
    counts = np.clip(np.floor(ideal).astype(np.int64), low_counts, high_counts)
    fraction = ideal - counts
    missing = total - int(counts.sum())
    order = np.argsort(-fraction, kind="stable")
    while missing > 0:
        room = order[counts[order] < high_counts[order]]
        if room.size == 0:
            break
        step = room[:missing]
        counts[step] += 1
        missing -= step.size
    order = np.argsort(fraction, kind="stable")
    while missing < 0:
        room = order[counts[order] > low_counts[order]]
        if room.size == 0:
            break
        step = room[:-missing]
        counts[step] -= 1
        missing += step.size
    if missing:
        raise ConfigError(f"cannot place {total:,} pruned weights within the per-target bounds")
    return counts


def exact_plan(targets: Sequence[WeightTarget], counts: np.ndarray, config: PruneConfig,
               set_by: str) -> PrunePlan:
    """The plan pruning exactly `counts[i]` weights of target i."""
    plan = {}
    for target, count in zip(targets, counts, strict=True):
        count = int(count)
        sparsity = count / target.numel if target.numel else 0.0
        plan[target.name] = TargetPlan(target.name, sparsity, config.pattern, config.method,
                                       count=count, set_by=set_by)
    return plan


def fit_family(targets: Sequence[WeightTarget], config: PruneConfig, name: str,
               sparsities_at: Callable[[float], np.ndarray], start: float, stop: float,
               geometric: bool = False) -> PrunePlan:
    """The exact plan of a one-parameter family of per-target sparsities (already clipped to
    the bounds, non-decreasing in t) at the t that meets the overall target."""
    from ..patterns import prune_count

    numels = np.array([t.numel for t in targets], dtype=np.int64)
    low, high = bounds(config)
    low_counts, high_counts = count_bounds(numels, low, high)
    total = prune_count(int(numels.sum()), config.target_sparsity)
    check_reachable(total, low_counts, high_counts, config.target_sparsity)
    sparsities = solve_shift(numels, sparsities_at, total, start, stop, geometric)
    counts = round_counts(sparsities * numels, total, low_counts, high_counts)
    log.info("%s allocation: per-target sparsity %.4g .. %.4g, %d weights pruned", name,
             float((counts / np.maximum(numels, 1)).min()),
             float((counts / np.maximum(numels, 1)).max()), total)
    return exact_plan(targets, counts, config, name)


def nm_fallback(targets: Sequence[WeightTarget], config: PruneConfig, name: str) -> PrunePlan:
    """N:M fixes every target's sparsity: the allocation does not apply (warned)."""
    from .uniform import Uniform

    log.warning("--allocation %s does not apply to pattern %s (it fixes every target's "
                "sparsity); pruned uniformly", name, config.pattern)
    return Uniform().plan(targets, config)
