"""What a pruning method is, and the job the pipeline hands it for one target."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..plan import TargetPlan
from ..targets import WeightTarget


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
    holds the run's settings (method options such as `ria_alpha`).
    """

    target: WeightTarget
    weights: np.ndarray
    plan: TargetPlan
    seed: int = 0
    view: object | None = None  # calib.TargetView
    stats: object | None = None  # calib.ActivationStats
    keep: np.ndarray | None = None
    fixed: bool = False
    shared: dict = field(default_factory=dict)
    config: object | None = None  # config.PruneConfig


class Method:
    """Base of the built-in methods; plug-ins may subclass it or just match its attributes."""

    name: str = ""
    description: str = ""
    needs: Needs = Needs.NOTHING
    # "layer": unstructured masks prune an exact count of the whole tensor; "row": the same
    # count from every output row (rows of the calibration matrices)
    compare: str = "layer"
    reconstructs = False
    streams_scores = False  # score_chunks is implemented
    default_calib_mode = "one-pass"  # or "sequential": each stage sees earlier pruned ones

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
