"""Allocations spread the requested sparsity over the targets and return a `PrunePlan`.

An allocation is a registered part (`registry.ALLOCATIONS`) with a `name` and
``plan(targets, config, context) -> PrunePlan``. `context` gives what an allocation may need
beyond the shapes: the stored scores of a target as a stream of chunks
(`context.score_chunks(target)`), for a threshold over all targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..config import PruneConfig
from ..plan import PrunePlan
from ..targets import WeightTarget


@dataclass
class AllocationContext:
    """What the pipeline lends an allocation: streamed stored scores of one target, the
    loaded model, and calibration samples given in memory (None: `config.calib` says)."""

    score_chunks: Callable[[WeightTarget], Iterable[np.ndarray]]
    loaded: object | None = None  # io.LoadedModel
    feeds: Sequence | None = None


class Allocation(Protocol):
    name: str
    description: str

    def plan(self, targets: Sequence[WeightTarget], config: PruneConfig,
             context: AllocationContext) -> PrunePlan: ...
