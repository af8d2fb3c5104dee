"""The same sparsity (or N:M pattern) in every target."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import PruneConfig
from ..plan import PrunePlan, TargetPlan
from ..targets import WeightTarget
from . import Allocation


class Uniform(Allocation):
    name = "uniform"
    description = "the same sparsity in every target"

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig, context=None
             ) -> PrunePlan:
        return {t.name: TargetPlan(t.name, config.target_sparsity, config.pattern,
                                   config.method, set_by=self.name) for t in targets}
