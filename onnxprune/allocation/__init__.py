"""Allocations spread the requested sparsity over the targets and return a `PrunePlan`.

An allocation is a registered part (`registry.ALLOCATIONS`): a subclass of `Allocation`
with a `name` and ``plan(targets, config, context) -> PrunePlan``. `context` gives what an
allocation may need beyond the shapes: the stored scores of a target as a stream of chunks
(`context.score_chunks(target)`), for a threshold over all targets.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import PruneConfig
from ..parts import Part
from ..plan import PrunePlan
from ..targets import WeightTarget

if TYPE_CHECKING:
    from ..io import LoadedModel


@dataclass
class AllocationContext:
    """What the pipeline lends an allocation: streamed stored scores of one target, the
    loaded model, and calibration samples given in memory (None: `config.calib` says)."""

    score_chunks: Callable[[WeightTarget], Iterable[np.ndarray]]
    loaded: LoadedModel | None = None
    feeds: Sequence | None = None

    def loaded_model(self, allocation: str) -> LoadedModel:
        """The loaded model, for an allocation that calibrates on it."""
        if self.loaded is None:
            raise ValueError(f"allocation {allocation} needs the loaded model; its "
                             "AllocationContext has none")
        return self.loaded


class Allocation(Part):
    """How the requested sparsity is spread over the targets (`--allocation`)."""

    @abstractmethod
    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext) -> PrunePlan:
        """Each target's sparsity or exact count."""
