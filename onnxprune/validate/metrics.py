"""How far a candidate's outputs are from the reference's: running sums per output, so the
samples need not be kept, and the figures they give.

For every output: the largest absolute difference, the relative L2 error ‖a−b‖/‖a‖, the
cosine similarity and, for outputs that look like class scores, how often the argmax over
the last axis agrees.

Class scores: a float output of rank 2 or 3 ([batch, classes], [batch, seq, vocab]) whose
last axis is longer than 1 and that is not a state. Rank 4 and more are maps (NCHW), whose
last axis is a width, not classes. A state is an output the caller passes back as an
input: it has the shape and dtype of an input fed, and either one of the two names starts
with the other (silero-vad's `stateN` for `state`) or the output's name mentions a state
(state, hidden, cell, cache, past, present, memory).

NaN or Inf in an output, in either model, makes its figures NaN (no agreement can be
claimed where both models produce NaN); the counts are kept. Whether the figures are good
enough is not decided here (`policy`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

_STATE_WORDS = re.compile(r"state|hidden|cell|cache|past|present|memory", re.IGNORECASE)

# (name, shape, dtype) of one input of a sample
FedInput = tuple[str, tuple[int, ...], str]


@dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference over all samples.

    `passed` is True or False when tolerances were given, None when not (structural
    failures make it False either way); `failed` is filled in by `policy.judge_output`.
    """

    name: str
    shape: list[int] | None
    dtype: str
    max_abs_diff: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    reference_nonfinite: int = 0  # NaN/Inf values over all samples
    candidate_nonfinite: int = 0
    new_nonfinite: int = 0  # in the candidate where the reference is finite
    failed: list[str] = field(default_factory=list)
    checked: bool = True  # whether tolerances were given
    compared_samples: int = 0  # samples whose values were compared (shapes agreed)
    numeric: bool = True  # False: compared for equality (strings), no figures
    differing_samples: int = 0  # of a non-numeric output: samples where the models differ
    shape_mismatch: str | None = None  # the first sample whose shapes differ, said in words

    @property
    def passed(self) -> bool | None:
        if self.failed:
            return False
        return True if self.checked else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype,
                "max_abs_diff": json_float(self.max_abs_diff),
                "rel_l2": json_float(self.rel_l2), "cosine": json_float(self.cosine),
                "top1_agreement": json_float(self.top1_agreement),
                "reference_nonfinite": self.reference_nonfinite,
                "candidate_nonfinite": self.candidate_nonfinite,
                "new_nonfinite": self.new_nonfinite, "passed": self.passed,
                "failed": list(self.failed)}


class OutputStats:
    """Running sums for one output, so samples need not be kept."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shape: tuple[int, ...] | None = None
        self.dtype = ""
        self.class_scores = False
        self.numeric = True
        self.compared = 0  # samples whose values were compared
        self.max_abs = 0.0
        self.diff_sq = self.reference_sq = self.candidate_sq = self.dot = 0.0
        self.top1_hits = self.top1_rows = 0
        self.reference_nonfinite = self.candidate_nonfinite = self.new_nonfinite = 0
        self.unequal = 0  # non-numeric outputs (strings): samples that differ
        self.shape_error: str | None = None

    def add(self, reference: Any, candidate: Any, index: int, fed: list[FedInput]) -> None:
        """Add one sample; `fed`: (name, shape, dtype) of every input of that sample."""
        reference, candidate = to_array(reference), to_array(candidate)
        if self.shape is None:
            self.shape = reference.shape
            self.dtype = str(reference.dtype)
            self.numeric = is_numeric(reference.dtype)
            self.class_scores = (is_float(reference.dtype) and 2 <= reference.ndim <= 3
                                 and reference.shape[-1] >= 2
                                 and not self._is_state(reference.shape, fed))
        if reference.shape != candidate.shape:
            if self.shape_error is None:
                self.shape_error = (f"shape: output {self.name!r} is {list(candidate.shape)} in "
                                    f"the candidate, {list(reference.shape)} in the reference "
                                    f"(sample {index})")
            return
        self.compared += 1
        if not (self.numeric and is_numeric(candidate.dtype)):
            self.unequal += int(not np.array_equal(reference, candidate))
            return
        a = reference.astype(np.float64).ravel()
        b = candidate.astype(np.float64).ravel()
        finite_a, finite_b = np.isfinite(a), np.isfinite(b)
        self.reference_nonfinite += int(a.size - np.count_nonzero(finite_a))
        self.candidate_nonfinite += int(b.size - np.count_nonzero(finite_b))
        self.new_nonfinite += int(np.count_nonzero(finite_a & ~finite_b))
        if self.reference_nonfinite or self.candidate_nonfinite:
            return  # the figures will be NaN: no sums needed
        diff = a - b
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))
        self.diff_sq += float(diff @ diff)
        self.reference_sq += float(a @ a)
        self.candidate_sq += float(b @ b)
        self.dot += float(a @ b)
        if self.class_scores:
            last = reference.shape[-1]
            reference_top = np.argmax(reference.reshape(-1, last), axis=-1)
            candidate_top = np.argmax(candidate.reshape(-1, last), axis=-1)
            self.top1_hits += int(np.count_nonzero(reference_top == candidate_top))
            self.top1_rows += reference_top.size

    def _is_state(self, shape: tuple[int, ...], fed: list[FedInput]) -> bool:
        name = self.name.lower()
        return any(shape == input_shape and self.dtype == input_dtype
                   and (name.startswith(input_name.lower())
                        or input_name.lower().startswith(name)
                        or _STATE_WORDS.search(name) is not None)
                   for input_name, input_shape, input_dtype in fed)

    def result(self) -> OutputComparison:
        """The figures so far (None where nothing numeric was compared, NaN where NaN/Inf
        was met), with the counts a verdict needs."""
        output = OutputComparison(self.name, None if self.shape is None else list(self.shape),
                                  self.dtype, reference_nonfinite=self.reference_nonfinite,
                                  candidate_nonfinite=self.candidate_nonfinite,
                                  new_nonfinite=self.new_nonfinite,
                                  compared_samples=self.compared, numeric=self.numeric,
                                  differing_samples=self.unequal,
                                  shape_mismatch=self.shape_error)
        if self.compared == 0 or not self.numeric:
            return output
        if self.reference_nonfinite or self.candidate_nonfinite:
            output.max_abs_diff = output.rel_l2 = output.cosine = math.nan
            output.top1_agreement = math.nan if self.class_scores else None
            return output
        output.max_abs_diff = self.max_abs
        output.rel_l2 = _ratio(math.sqrt(self.diff_sq), math.sqrt(self.reference_sq))
        output.cosine = _cosine(self.dot, self.reference_sq, self.candidate_sq)
        if self.top1_rows:
            output.top1_agreement = self.top1_hits / self.top1_rows
        return output


def to_array(value: Any) -> np.ndarray:
    """An output as one array: sequences are flattened, maps (ZipMap) become rows by key."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, dict):
        return np.asarray([value[key] for key in sorted(value)])
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            return np.asarray([[item[key] for key in sorted(item)] for item in value])
        if not value:
            return np.zeros(0, np.float32)
        return np.concatenate([np.ravel(np.asarray(item)) for item in value])
    return np.asarray(value)


def is_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is a float, ml_dtypes' (bfloat16, float8) included."""
    if dtype.kind == "f":
        return True
    if dtype.kind != "V":
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def is_numeric(dtype: np.dtype) -> bool:
    """Whether `dtype` holds numbers that figures can be computed on (bool included)."""
    return dtype.kind in "biu" or is_float(dtype)


def json_float(value: float | None) -> float | None:
    """`value`, or None where it is not finite (JSON has no NaN)."""
    return value if value is None or math.isfinite(value) else None


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def _cosine(dot: float, norm_sq_a: float, norm_sq_b: float) -> float:
    if norm_sq_a == 0 and norm_sq_b == 0:
        return 1.0
    if norm_sq_a == 0 or norm_sq_b == 0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(norm_sq_a * norm_sq_b)))
