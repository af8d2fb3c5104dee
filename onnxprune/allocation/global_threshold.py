"""One threshold over the scores of all targets: exactly round(s · total) weights pruned.

The threshold is found on a stream of score chunks (two reads, nothing model-sized); a third
read counts, per target, the scores below it and the ties at it. Ties are given to targets in
stream order (target order, then flat position), so each target's exact count, pruned
lowest-first with ties by position, is the same set one global threshold would prune.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from .. import kernels
from ..config import PruneConfig
from ..errors import ConfigError
from ..patterns import prune_count
from ..plan import PrunePlan, TargetPlan
from ..targets import WeightTarget
from . import Allocation, AllocationContext


class GlobalThreshold(Allocation):
    name = "global"
    description = "one score threshold over all targets (magnitude, random)"

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext) -> PrunePlan:
        from ..registry import METHODS

        if config.pattern.is_nm:  # N:M fixes every target's count: nothing to spread
            from .uniform import Uniform

            return Uniform().plan(targets, config, context)
        if not METHODS.get(config.method).streams_scores:
            raise ConfigError(f"--scope global is not available with --method {config.method}")
        total = sum(t.numel for t in targets)
        k = prune_count(total, config.target_sparsity)
        counts = dict.fromkeys((t.name for t in targets), 0)
        if k:
            def chunks() -> Iterator[np.ndarray]:
                for target in targets:
                    yield from context.score_chunks(target)

            threshold = kernels.kth_smallest(chunks, k)
            ties = k - threshold.n_below
            for target in targets:
                below = equal = 0
                for scores in context.score_chunks(target):
                    part_below, part_equal = kernels.count_below_equal(scores, threshold.value)
                    below += part_below
                    equal += part_equal
                take = min(equal, ties)
                ties -= take
                counts[target.name] = below + take
        return {t.name: TargetPlan(t.name, counts[t.name] / t.numel if t.numel else 0.0,
                                   config.pattern, config.method, count=counts[t.name],
                                   set_by=self.name) for t in targets}
