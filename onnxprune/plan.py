"""The prune plan: for every target, what to reach (sparsity or N:M pattern) and with which
method. An allocation makes it; the pipeline honours it; the report shows it beside what
was achieved.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Pattern
from .patterns import prune_count


@dataclass(frozen=True)
class TargetPlan:
    """What one target should become.

    `sparsity` is the requested fraction of the target's weights (for N:M, the pattern's
    own). `count`, where an allocation fixed it (a global threshold), is the exact number
    of weights to prune; otherwise it follows from the sparsity. `set_by` names what decided
    this entry (the allocation, or an override).
    """

    name: str
    sparsity: float
    pattern: Pattern
    method: str
    count: int | None = None
    set_by: str = "uniform"

    def prune_count(self, numel: int) -> int:
        """How many of the target's `numel` weights to prune (unstructured)."""
        return self.count if self.count is not None else prune_count(numel, self.sparsity)

    def describe(self) -> dict:
        return {"sparsity": self.sparsity, "pattern": str(self.pattern), "method": self.method,
                "set_by": self.set_by}


PrunePlan = dict[str, TargetPlan]  # by target name, in target order
