"""How the consumers of pruned groups are rebuilt once the kept channels are chosen
(`--update NAME` with `--structure`): registered parts (`registry.STRUCTURED_UPDATES`).

`least-squares` refits each consumer's kept input columns to its dense output on the
calibration data (`reconstruction.least_squares`), stage by stage on the already pruned
model (`refit`): the structured counterpart of SparseGPT's update, usable after any
channel score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..methods.base import Needs
from ..parts import Part, option


class StructuredUpdate(Part):
    """A rebuild of the consumers after structured pruning; `damp` settles the fit."""

    needs: ClassVar[Needs] = Needs.HESSIAN

    @property
    def damp(self) -> float:
        return float(getattr(self.options, "damp", 0.01))


class LeastSquares(StructuredUpdate):
    name = "least-squares"
    description = ("refit each consumer's kept input columns to its dense output "
                   "(damped least squares on XᵀX, stage by stage)")

    @dataclass(frozen=True)
    class Options:
        damp: float = option(0.01, minimum=0.0, metavar="D",
                             help="damping, as a fraction of XᵀX's mean diagonal")
