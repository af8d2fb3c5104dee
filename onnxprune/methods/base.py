"""What a pruning method is, and the job the pipeline hands it for one target."""

from __future__ import annotations

import enum
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..parts import Part
from ..plan import TargetPlan
from ..targets import WeightTarget

if TYPE_CHECKING:
    from ..calib import ActivationStats, TargetView
    from ..config import PruneConfig
    from ..quantized import Grid


class Needs(enum.IntEnum):
    """Statistics of a target's layer input a method needs (ordered: more includes less)."""

    NOTHING = 0
    SQ_NORMS = 1  # ‖X_j‖² per input feature
    HESSIAN = 2  # XᵀX


@dataclass
class Job:
    """One target to prune, with everything gathered for it.

    `weights` are the stored values (stored layout and dtype; do not modify). `view` and
    `stats` are set when calibration statistics were gathered: `view.to_obs` gives the
    [groups, rows, features] matrices the statistics describe. `keep` is an existing mask
    (False = pruned before, never to be revived); with `fixed` it is the exact mask to apply.
    `shared` is a scratch dict shared by targets that read the same layer input. `config`
    holds the run's settings; a part's own options are on the part (`self.options`).
    For a quantized weight, `weights` are its dequantized values and `grid` its grid.
    """

    target: WeightTarget
    weights: np.ndarray
    plan: TargetPlan
    seed: int = 0
    view: TargetView | None = None
    stats: ActivationStats | None = None
    keep: np.ndarray | None = None
    fixed: bool = False
    shared: dict[Any, Any] = field(default_factory=dict)
    config: PruneConfig | None = None
    # a quantized target's grid (stored layout): methods that rebuild weights may round
    # onto it as they go; the pipeline rounds whatever they return
    grid: Grid | None = None

    @property
    def calibration(self) -> tuple[TargetView, ActivationStats]:
        """(view, stats): set by the pipeline for every part that declares `needs`."""
        if self.view is None or self.stats is None:
            raise RuntimeError(f"{self.target.name}: no calibration statistics were gathered")
        return self.view, self.stats

    @property
    def hessians(self) -> np.ndarray:
        """XᵀX per group, [groups, inputs, inputs]: for parts that need `Needs.HESSIAN`."""
        hessian = self.calibration[1].hessian
        if hessian is None:
            raise RuntimeError(f"{self.target.name}: XᵀX was not gathered")
        return hessian


class Method(Part):
    """A pruning method (`--method`): scores weights, or rebuilds them (`reconstructs`)."""

    needs: ClassVar[Needs] = Needs.NOTHING
    # "layer": unstructured masks prune an exact count of the whole tensor; "row": the same
    # count from every output row (rows of the calibration matrices)
    compare: ClassVar[str] = "layer"
    reconstructs: ClassVar[bool] = False
    streams_scores: ClassVar[bool] = False  # score_chunks is implemented
    # or "sequential": each stage sees earlier pruned ones
    default_calib_mode: ClassVar[str] = "one-pass"

    def scores(self, job: Job) -> np.ndarray:
        """float32 scores in the stored layout of `job.weights` (higher = more worth keeping)."""
        raise NotImplementedError(f"method {self.name!r} does not score weights")

    def score_chunks(self, target: WeightTarget, pieces: Iterable[np.ndarray],
                     seed: int = 0) -> Iterator[np.ndarray]:
        """Scores of consecutive flat pieces of the stored weights (a buffer valid until the
        next piece is asked for); only where `streams_scores`."""
        raise NotImplementedError(f"method {self.name!r} does not stream scores")

    def reconstruct(self, job: Job) -> np.ndarray:
        """New weights (stored layout and dtype) meeting `job.plan`, pruned positions 0."""
        raise NotImplementedError(f"method {self.name!r} does not reconstruct weights")


class WeightUpdate(Part):
    """`--update`: rebuild the kept weights of a mask a scoring method chose."""

    needs: ClassVar[Needs] = Needs.HESSIAN
    default_calib_mode: ClassVar[str] = "sequential"  # later layers see the rebuilt weights

    @abstractmethod
    def update(self, job: Job, keep: np.ndarray) -> np.ndarray:
        """New weights (stored layout and dtype) for the mask `keep`, zeros where it is
        False."""


class MaskRefinement(Part):
    """`--refine`: improve a mask before it is applied (its pattern must still hold)."""

    needs: ClassVar[Needs] = Needs.HESSIAN

    @abstractmethod
    def refine(self, job: Job, keep: np.ndarray) -> np.ndarray:
        """A better keep-mask than `keep`, never keeping a weight `job.keep` pruned."""
