"""Whether a comparison passes: tolerances, per-output failures, the overall verdict, and
the warnings a comparison without tolerances still owes the user.

The overall figures are the worst over outputs, so a tolerance on them is a tolerance on
every output. The verdict is "failed" when a structural check fails whatever the tolerances
(a missing or extra output, a shape that differs, the candidate failing to run, NaN/Inf in
the candidate where the reference is finite, a non-numeric output that differs) or a given
tolerance fails; "passed" when tolerances were given and all hold; "not checked" (`passed`
is None) when none was given, with a warning when the figures look poor (cosine below 0.99,
top-1 agreement below 0.9). NaN/Inf in either model fails any tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..inputs import FedInput
from .metrics import OutputComparison, json_float
from .timing import TimingResult

# Without tolerances, figures below these earn a warning: the comparison is not checked,
# but a user reading "not checked" should still hear that the models disagree.
WARN_BELOW_COSINE = 0.99
WARN_BELOW_TOP1 = 0.9
# The valid range of each tolerance; the others lie in [0, inf).
_TOLERANCE_RANGES = {"min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0)}


@dataclass
class ValidationResult:
    """The comparison of every output; overall figures are the worst over outputs.

    `inputs`: the inputs fed (names, dtypes, shapes over all samples); `synthetic`: whether
    they were made up rather than read from data.
    """

    outputs: list[OutputComparison]
    samples: int
    tolerances: dict[str, float]
    failed: list[str]
    timing: TimingResult | None = None
    inputs: list[FedInput] = field(default_factory=list)
    synthetic: bool = False

    @property
    def passed(self) -> bool | None:
        """False if anything failed, True if tolerances were given and hold, else None."""
        if self.failed:
            return False
        return True if self.tolerances else None

    @property
    def verdict(self) -> str:
        return {True: "passed", False: "failed", None: "not checked"}[self.passed]

    @property
    def max_abs_diff(self) -> float | None:
        return _worst([o.max_abs_diff for o in self.outputs], max)

    @property
    def rel_l2(self) -> float | None:
        return _worst([o.rel_l2 for o in self.outputs], max)

    @property
    def cosine(self) -> float | None:
        return _worst([o.cosine for o in self.outputs], min)

    @property
    def top1_agreement(self) -> float | None:
        return _worst([o.top1_agreement for o in self.outputs], min)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a value that is not finite (NaN outputs, rel_l2 of an all-zero
        reference) is null."""
        values = {"passed": self.passed, "verdict": self.verdict,
                  "max_abs_diff": json_float(self.max_abs_diff),
                  "rel_l2": json_float(self.rel_l2),
                  "cosine": json_float(self.cosine),
                  "top1_agreement": json_float(self.top1_agreement),
                  "reference_nonfinite": sum(o.reference_nonfinite for o in self.outputs),
                  "candidate_nonfinite": sum(o.candidate_nonfinite for o in self.outputs),
                  "samples": self.samples,
                  "tolerances": dict(self.tolerances),
                  "failed": list(self.failed),
                  "outputs": [o.to_dict() for o in self.outputs],
                  "inputs": [i.to_dict() for i in self.inputs],
                  "synthetic_inputs": self.synthetic}
        if self.timing is not None:
            values["timing"] = self.timing.to_dict()
        return values


def check_tolerances(**given: float | None) -> dict[str, float]:
    """The tolerances given (None: not given) as floats, each checked against its range;
    a `ConfigError` names the first that is not a number or out of range."""
    tolerances = {}
    for name, value in given.items():
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{name} must be a number, got {value!r}") from exc
        low, high = _TOLERANCE_RANGES.get(name, (0.0, math.inf))
        if not low <= value <= high:
            raise ConfigError(f"{name} must lie in [{low:g}, {high:g}], got {value:g}")
        tolerances[name] = value
    return tolerances


def judge_output(output: OutputComparison, tolerances: dict[str, float]) -> None:
    """Fill in `output.failed` (structural failures, then tolerances) and `checked`."""
    output.checked = bool(tolerances)
    failed = output.failed
    if output.shape_mismatch:
        failed.append(output.shape_mismatch)
    if output.new_nonfinite:
        failed.append(f"nan: output {output.name!r} has {output.new_nonfinite} NaN/Inf "
                      "values where the reference is finite")
    if output.compared_samples == 0:
        return
    if not output.numeric:
        if output.differing_samples:
            failed.append(f"values: output {output.name!r} differs in "
                          f"{output.differing_samples} of {output.compared_samples} samples")
        return
    if output.reference_nonfinite or output.candidate_nonfinite:
        if tolerances and not output.new_nonfinite:
            failed.append(f"nan: output {output.name!r} has {output.reference_nonfinite} NaN/Inf "
                          f"values in the reference and {output.candidate_nonfinite} in the "
                          "candidate; no tolerance can hold")
        return
    failed.extend(tolerance_failures(output, tolerances))


def tolerance_failures(output: OutputComparison, tolerances: dict[str, float]) -> list[str]:
    """One line per tolerance the output's figures break (a figure not computed breaks
    every tolerance on it, except top-1, which only class scores have)."""
    failures = []
    name = output.name
    max_abs, rel_l2, cosine = output.max_abs_diff, output.rel_l2, output.cosine
    if "atol" in tolerances and not (max_abs is not None and max_abs <= tolerances["atol"]):
        failures.append(f"atol: output {name!r} max_abs_diff {_figure(max_abs, '.4g')} > "
                        f"{tolerances['atol']:g}")
    if "rtol_l2" in tolerances and not (rel_l2 is not None and rel_l2 <= tolerances["rtol_l2"]):
        failures.append(f"rtol_l2: output {name!r} rel_l2 {_figure(rel_l2, '.4g')} > "
                        f"{tolerances['rtol_l2']:g}")
    if "min_cosine" in tolerances and not (cosine is not None
                                           and cosine >= tolerances["min_cosine"]):
        failures.append(f"min_cosine: output {name!r} cosine {_figure(cosine, '.6f')} < "
                        f"{tolerances['min_cosine']:g}")
    top1 = output.top1_agreement
    if "min_top1" in tolerances and top1 is not None and not top1 >= tolerances["min_top1"]:
        failures.append(f"min_top1: output {name!r} top1_agreement {top1:.4f} < "
                        f"{tolerances['min_top1']:g}")
    return failures


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def unchecked_warnings(result: ValidationResult) -> list[str]:
    """What a "not checked" verdict should not hide: NaN/Inf, and poor agreement."""
    warnings = [f"output {o.name!r}: {o.reference_nonfinite} NaN/Inf values in the reference, "
                f"{o.candidate_nonfinite} in the candidate; its figures mean nothing"
                for o in result.outputs if o.reference_nonfinite or o.candidate_nonfinite]
    cosine, top1 = result.cosine, result.top1_agreement
    if cosine is not None and cosine < WARN_BELOW_COSINE:
        warnings.append(f"cosine similarity {cosine:.4f} is below {WARN_BELOW_COSINE}: the "
                        "models disagree (not checked: no tolerance given)")
    if top1 is not None and top1 < WARN_BELOW_TOP1:
        warnings.append(f"top-1 agreement {top1:.4f} is below {WARN_BELOW_TOP1}: the models "
                        "disagree (not checked: no tolerance given)")
    return warnings


def _worst(values: list[float | None], pick: Callable[[list[float]], float]) -> float | None:
    """The worst of the values present; NaN (an output with NaN/Inf) is worst of all."""
    present = [v for v in values if v is not None]
    if any(math.isnan(v) for v in present):
        return math.nan
    return pick(present) if present else None
