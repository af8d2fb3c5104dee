"""The prune plan: for every target, what to reach (sparsity or N:M pattern) and with which
method. An allocation makes it; the pipeline honours it; the report shows it beside what
was achieved.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import Pattern
from .patterns import prune_count


class PlanOrigin(enum.Enum):
    """What decided a plan entry: the allocation, or recipe overrides (which may also have
    chosen the method)."""

    ALLOCATION = "allocation"
    OVERRIDE = "override"


@dataclass(frozen=True)
class TargetPlan:
    """What one target should become.

    `sparsity` is the requested fraction of the target's weights (for N:M, the pattern's
    own). `count`, where an allocation fixed it (a global threshold), is the exact number
    of weights to prune; otherwise it follows from the sparsity. `set_by` names what decided
    this entry for the report (the allocation, or the overrides), `origin` says which of
    the two it was.
    """

    name: str
    sparsity: float
    pattern: Pattern
    method: str
    count: int | None = None
    set_by: str = "uniform"
    origin: PlanOrigin = PlanOrigin.ALLOCATION

    def prune_count(self, numel: int) -> int:
        """How many of the target's `numel` weights to prune (unstructured)."""
        return self.count if self.count is not None else prune_count(numel, self.sparsity)

    def describe(self) -> dict:
        return {"sparsity": self.sparsity, "pattern": str(self.pattern), "method": self.method,
                "set_by": self.set_by}


PrunePlan = dict[str, TargetPlan]  # by target name, in target order
