"""Which channels each group keeps: kept counts from the requested sparsity (uniform, or
global over per-group normalized scores), rounded for fast kernels, then the best channels.

Uniform allocation removes the fraction `sparsity` of every group's channels (a weight
between two groups loses rows and columns, so more of the parameters go); global
allocation ranks every channel of every group by its score divided by the mean score of
its group, or standardized within it for scores that ask so (FLAP's) — scores of
different groups are not on one scale — and removes the lowest until
the parameters they carry reach that fraction of the groups' parameters. Either way a
kept count is then rounded to the nearest multiple of the group's unit (`round_to`
positions, and the group's own `multiple_of`), never below one unit: no layer vanishes,
and the widths suit onnxruntime's CPU kernels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .groups import ChannelGroup


def unit(group: ChannelGroup, round_to: int) -> int:
    """The step of the group's kept counts (in channels): the kept widths of its tensors are
    multiples of `round_to` positions, and the count a multiple of `multiple_of`. A channel
    of `block` positions (an attention head of 64 columns) already is one for any
    `round_to` dividing its block."""
    step = max(1, group.multiple_of)
    for member in group.members:  # channels so that this member's width is aligned
        block = max(1, member.block)
        step = math.lcm(step, max(1, round_to) // math.gcd(max(1, round_to), block))
    return step


def rounded_count(group: ChannelGroup, wanted: float, round_to: int) -> int:
    """`wanted` kept channels rounded to the nearest multiple of the group's unit (a half
    keeps more), at least one unit, at most all. Nearest, not up: a group of 3 attention
    heads asked to keep 2.25 keeps 2, so small groups do not all keep everything."""
    step = unit(group, round_to)
    if wanted >= group.channels - step / 2:  # all channels is the nearest choice too
        return group.channels
    count = max(step, math.floor(wanted / step + 0.5 + 1e-9) * step)
    return group.channels if count >= group.channels else count


def uniform_counts(groups: Sequence[ChannelGroup], sparsity: float, round_to: int
                   ) -> dict[str, int]:
    """Kept channels per group: (1 - sparsity) of each group's channels, rounded."""
    return {g.name: rounded_count(g, (1.0 - sparsity) * g.channels, round_to) for g in groups}


def normalized(values: np.ndarray, normalization: str = "mean") -> np.ndarray:
    """A group's scores on the scale shared by every group: divided by their mean,
    standardized ((s − mean) / std), or as they are ("none"); a group whose scores are all
    equal (or all zero) gets zeros."""
    values = np.asarray(values, dtype=np.float64)
    if not values.size or normalization == "none":
        return values
    mean = float(np.mean(values))
    if normalization == "standard":
        spread = float(np.std(values))
        return (values - mean) / spread if spread > 0 else np.zeros_like(values)
    return values / mean if mean > 0 else np.zeros_like(values)


def global_counts(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray],
                  params_per_channel: Mapping[str, float], sparsity: float, round_to: int,
                  normalization: str = "mean") -> dict[str, int]:
    """Kept channels per group from one ranking of every channel by its normalized score
    (`normalized`), removing the lowest until `sparsity` of the selected parameters is
    reached (each group keeps at least one unit), then rounded."""
    entries: list[tuple[float, int, int]] = []  # (normalized score, group index, channel)
    removable = {}
    for index, group in enumerate(groups):
        normal = normalized(scores[group.name], normalization)
        entries.extend((float(s), index, c) for c, s in enumerate(normal))
        removable[group.name] = group.channels - unit(group, round_to)
    total = sum(params_per_channel[g.name] * g.channels for g in groups)
    budget = sparsity * total
    removed = dict.fromkeys((g.name for g in groups), 0)
    taken = 0.0
    for _, index, _ in sorted(entries):
        if taken >= budget:
            break
        group = groups[index]
        if removed[group.name] >= removable[group.name]:
            continue
        removed[group.name] += 1
        taken += params_per_channel[group.name]
    return {g.name: rounded_count(g, g.channels - removed[g.name], round_to) for g in groups}


def keep_sets(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray],
              counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The `counts[name]` best-scored channels of each group, sorted (ties: the lower index
    is kept); groups that keep everything are left out."""
    result = {}
    for group in groups:
        count = counts[group.name]
        if count >= group.channels:
            continue
        order = np.lexsort((np.arange(group.channels), -np.asarray(scores[group.name])))
        result[group.name] = np.sort(order[:count]).astype(np.int64)
    return result
