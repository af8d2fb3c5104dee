"""Which channels each group keeps: kept counts from the requested sparsity (uniform, or
global over per-group normalized scores) or from a latency budget (`budget_counts`, over
measured per-group latency tables), rounded for fast kernels, then the best channels.

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
from collections.abc import Callable, Mapping, Sequence

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


def allowed_widths(group: ChannelGroup, round_to: int) -> list[int]:
    """The kept counts an allocation may choose for the group, widest first: all its
    channels, then every multiple of its unit below them down to one unit."""
    step = unit(group, round_to)
    below = range((group.channels - 1) // step * step, 0, -step)
    return [group.channels, *below]


def predicted_latency(groups: Sequence[ChannelGroup],
                      tables: Mapping[str, Callable[[float], float]], dense_latency: float,
                      counts: Mapping[str, int]) -> float:
    """The dense latency less what each group saves at its kept count by its table
    (`tables[name](width)`: the group's latency at that width); groups without a table save
    nothing."""
    saved = sum(tables[g.name](g.channels) - tables[g.name](counts[g.name])
                for g in groups if g.name in tables)
    return dense_latency - saved


def budget_counts(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray],
                  params_per_channel: Mapping[str, float],
                  tables: Mapping[str, Callable[[float], float]], dense_latency: float,
                  budget: float, round_to: int, normalization: str = "mean",
                  costs: Mapping[str, Callable[[int], float]] | None = None
                  ) -> dict[str, int]:
    """Kept channels per group so that the predicted latency (`predicted_latency`) is at
    most `budget` × `dense_latency`, removing the least score per latency saved (or, with
    `costs`, the least predicted error per latency saved).

    From every channel kept, each step removes channels of the group whose next move has
    the lowest cost / predicted saving: a move goes to the next allowed width
    (`allowed_widths`) at which the table predicts a saving (across a flat stretch of the
    table, to the first width past it), and costs the normalized scores (`normalized`,
    shifted so that the lowest is 0: a negative cost would rank a larger saving lower) of
    the lowest-scored channels it removes, each weighted by the parameters its channel
    carries: a normalized score says how a channel ranks within its group, and a group's
    channels together stand for its parameters. Unweighted, one of SmolLM2's 3 KV heads
    (295 k parameters) cost as much as one of its 1536 FFN units (1.7 k), and a budget of
    0.7 took 2 of the 3 heads of every layer. It stops once the prediction meets the budget,
    or when no move saves anything (the budget is then not reachable: the counts predict
    the least latency the greedy found). No group falls below one unit; groups without a
    table keep every channel. The sequence of moves does not depend on `budget`, so a
    larger budget never keeps fewer channels in any group.

    `costs` (`--allocation sensitivity`): per group, the predicted squared output error at
    a kept count (0 at every channel, infinite where its curve was not swept); a move then
    costs the rise in that error, so the budget goes where the measured curves say the
    model loses least per millisecond.
    """
    counts = {g.name: g.channels for g in groups}
    timed = [g for g in groups if g.name in tables]
    if not timed:
        return counts
    normal = {g.name: normalized(scores[g.name], normalization) for g in timed}
    lowest = min((float(v.min()) for v in normal.values() if v.size), default=0.0)
    prefix = {name: np.concatenate(([0.0], np.cumsum(
        (np.sort(v) - lowest) * float(params_per_channel[name])))) for name, v in normal.items()}
    widths = {g.name: allowed_widths(g, round_to) for g in timed}
    position = dict.fromkeys(widths, 0)  # index into widths: the current kept count
    target = budget * dense_latency
    latency = dense_latency

    def move(group: ChannelGroup) -> tuple[float, float, int] | None:
        """(cost per saving, saving, new position) of the group's next move, or None."""
        options, here = widths[group.name], position[group.name]
        table = tables[group.name]
        now = table(options[here])
        for after in range(here + 1, len(options)):
            saving = now - table(options[after])
            if saving > 0:
                if costs is not None:
                    error = costs[group.name]
                    cost = error(options[after]) - error(options[here])
                    return (cost / saving, saving, after) if math.isfinite(cost) else None
                removed = group.channels - options[here], group.channels - options[after]
                cost = prefix[group.name][removed[1]] - prefix[group.name][removed[0]]
                return cost / saving, saving, after
        return None

    moves = {g.name: move(g) for g in timed}
    while latency > target:
        candidates = [(found, index, g) for index, g in enumerate(timed)
                      if (found := moves[g.name]) is not None]
        if not candidates:
            break
        (_, saving, after), _, best = min(candidates, key=lambda c: (c[0][0], c[1]))
        position[best.name] = after
        counts[best.name] = widths[best.name][after]
        latency -= saving
        moves[best.name] = move(best)
    return counts
