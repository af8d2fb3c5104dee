"""Run a reference and a candidate model in onnxruntime on the same feeds and compare them.

Every output is compared over all samples: the largest absolute difference, the relative L2
error ‖a−b‖/‖a‖, the cosine similarity and, for outputs that look like class scores, how
often the argmax over the last axis agrees. The overall figures are the worst over outputs,
so a tolerance on them is a tolerance on every output.

Class scores: a float output of rank 2 or 3 ([batch, classes], [batch, seq, vocab]) whose
last axis is longer than 1 and that is not a state. Rank 4 and more are maps (NCHW), whose
last axis is a width, not classes. A state is an output the caller passes back as an
input: it has the shape and dtype of an input fed, and either one of the two names starts
with the other (silero-vad's `stateN` for `state`) or the output's name mentions a state
(state, hidden, cell, cache, past, present, memory).

NaN or Inf in an output, in either model, makes its figures NaN (no agreement can be
claimed where both models produce NaN) and fails any tolerance; the counts are reported.

The verdict is "failed" when a structural check fails whatever the tolerances (a missing or
extra output, a shape that differs, the candidate failing to run, NaN/Inf in the candidate
where the reference is finite) or a given tolerance fails; "passed" when tolerances were
given and all hold; "not checked" (`passed` is None) when none was given, with a warning
when the figures look poor (cosine below 0.99, top-1 agreement below 0.9).

Timing (`timing_runs`): a pruned model is not faster on a CPU because it has zeros, and a
compact one takes longer to load; users should see that gap measured. Session creation is
timed `SESSION_REPEATS` times per model and inference `timing_runs` times after warm-up runs,
always alternating the two models (reference then candidate, then candidate then reference)
so that a busy machine, caches and clock changes weigh on both alike; medians are reported.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import CalibrationError, ConfigError
from .inputs import Feed, describe_feed, load_npz_inputs, synthetic_inputs
from .io import load_model
from .runtime import PROVIDERS, make_session
from .runtime import first_line as _first_line

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike | onnx.ModelProto | ort.InferenceSession

DEFAULT_SYNTHETIC_SAMPLES = 4  # the CLI help promises 4
# Element types numpy cannot hand to onnxruntime directly; they travel as OrtValues.
_ORTVALUE_ONLY_TYPES = ("bfloat16", "float8", "int4", "uint4", "float4")
# Without tolerances, figures below these earn a warning: the comparison is not checked,
# but a user reading "not checked" should still hear that the models disagree.
WARN_BELOW_COSINE = 0.99
WARN_BELOW_TOP1 = 0.9
_STATE_WORDS = re.compile(r"state|hidden|cell|cache|past|present|memory", re.IGNORECASE)
SESSION_REPEATS = 3  # session creations timed per model (the first of a process pays more)
TIMING_WARMUP = 3  # untimed runs per model before the timed ones
DEFAULT_TIMING_RUNS = 20
_SYNTHETIC_HINT = ("set the input shapes with --input-shapes NAME:[d0,d1,...] (or --dim "
                   "NAME=VALUE) or give real inputs with --data")


@dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference over all samples.

    `passed` is True or False when tolerances were given, None when not (structural
    failures make it False either way).
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

    @property
    def passed(self) -> bool | None:
        if self.failed:
            return False
        return True if self.checked else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype,
                "max_abs_diff": _json_float(self.max_abs_diff),
                "rel_l2": _json_float(self.rel_l2), "cosine": _json_float(self.cosine),
                "top1_agreement": _json_float(self.top1_agreement),
                "reference_nonfinite": self.reference_nonfinite,
                "candidate_nonfinite": self.candidate_nonfinite,
                "new_nonfinite": self.new_nonfinite, "passed": self.passed,
                "failed": list(self.failed)}


@dataclass
class ModelTiming:
    """Seconds one model took: session creation and inference (medians, and the fastest)."""

    session_seconds: float | None  # None: a session was given, not built here
    latency_seconds: float | None = None  # None: not measured (the candidate failed to run)
    latency_min_seconds: float | None = None
    session_samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"session_seconds": self.session_seconds,
                "latency_seconds": self.latency_seconds,
                "latency_min_seconds": self.latency_min_seconds,
                "session_samples": list(self.session_samples)}


@dataclass
class TimingResult:
    """Session creation and inference time of both models, measured interleaved."""

    reference: ModelTiming
    candidate: ModelTiming
    runs: int  # timed runs per model
    warmup: int  # untimed runs per model before them

    def ratio(self, attribute: str) -> float | None:
        """Candidate over reference for `session_seconds` or `latency_seconds`."""
        reference = getattr(self.reference, attribute)
        candidate = getattr(self.candidate, attribute)
        if reference is None or candidate is None or reference <= 0:
            return None
        return candidate / reference

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.to_dict(), "candidate": self.candidate.to_dict(),
                "session_ratio": self.ratio("session_seconds"),
                "latency_ratio": self.ratio("latency_seconds"),
                "runs": self.runs, "warmup": self.warmup,
                "session_repeats": SESSION_REPEATS, "provider": PROVIDERS[0]}


@dataclass
class ValidationResult:
    """The comparison of every output; overall figures are the worst over outputs."""

    outputs: list[OutputComparison]
    samples: int
    tolerances: dict[str, float]
    failed: list[str]
    timing: TimingResult | None = None

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
                  "max_abs_diff": _json_float(self.max_abs_diff),
                  "rel_l2": _json_float(self.rel_l2),
                  "cosine": _json_float(self.cosine),
                  "top1_agreement": _json_float(self.top1_agreement),
                  "reference_nonfinite": sum(o.reference_nonfinite for o in self.outputs),
                  "candidate_nonfinite": sum(o.candidate_nonfinite for o in self.outputs),
                  "samples": self.samples,
                  "tolerances": dict(self.tolerances),
                  "failed": list(self.failed),
                  "outputs": [o.to_dict() for o in self.outputs]}
        if self.timing is not None:
            values["timing"] = self.timing.to_dict()
        return values


def validation_feeds(model: str | os.PathLike | onnx.ModelProto, *,
                     data: str | os.PathLike | None = None, samples: int | None = None,
                     seed: int = 0, dims: dict[str, int] | None = None,
                     input_shapes: dict[str, Sequence[int]] | None = None
                     ) -> tuple[list[Feed], bool]:
    """The feeds to compare on, and whether they are synthetic.

    From `data` (an `.npz` or a folder of them; `samples` caps how many) or else `samples`
    synthetic ones (default 4) following the model's inputs, random by `seed`, shaped by
    `input_shapes` and `dims`. Names, dtypes and shapes are checked against the model here,
    so a caller can do this before any long work.
    """
    if isinstance(model, onnx.ModelProto):
        proto = model
    else:  # the graph alone describes the inputs; onnxruntime reads the weights itself
        proto = load_model(model, lazy=True).proto
    if data is not None:
        if dims or input_shapes:
            log.warning("--dim and --input-shapes shape synthetic inputs only; ignored with "
                        "--data")
        return load_npz_inputs(data, proto, samples), False
    count = DEFAULT_SYNTHETIC_SAMPLES if samples is None else samples
    return synthetic_inputs(proto, count, seed, dims, input_shapes), True


def validate_models(reference: str | os.PathLike | onnx.ModelProto,
                    candidate: str | os.PathLike | onnx.ModelProto, *,
                    data: str | os.PathLike | None = None, samples: int | None = None,
                    seed: int = 0, dims: dict[str, int] | None = None,
                    input_shapes: dict[str, Sequence[int]] | None = None,
                    atol: float | None = None, rtol_l2: float | None = None,
                    min_cosine: float | None = None,
                    min_top1: float | None = None) -> ValidationResult:
    """Feeds from `validation_feeds` for the reference, then `compare_models`."""
    feeds, synthetic = validation_feeds(reference, data=data, samples=samples, seed=seed,
                                        dims=dims, input_shapes=input_shapes)
    return compare_models(reference, candidate, feeds, atol=atol, rtol_l2=rtol_l2,
                          min_cosine=min_cosine, min_top1=min_top1, synthetic=synthetic)


def check_reference_runs(reference: ModelSource, feeds: Sequence[Feed],
                         synthetic: bool = False) -> None:
    """Run the reference on the first feed: a `CalibrationError` now rather than after a
    long prune if onnxruntime cannot run it on these inputs."""
    if not feeds:
        raise CalibrationError("no input samples to compare the models on")
    _run_reference(_as_session(reference), feeds[0], 0, synthetic)


def compare_models(reference: ModelSource, candidate: ModelSource, feeds: Sequence[Feed], *,
                   atol: float | None = None, rtol_l2: float | None = None,
                   min_cosine: float | None = None, min_top1: float | None = None,
                   synthetic: bool = False, timing_runs: int | None = None) -> ValidationResult:
    """Run both models on every feed and compare all outputs by name.

    The reference failing on a feed is a `CalibrationError` (the inputs are wrong; with
    `synthetic` feeds the message suggests how to shape them); the candidate failing, or its
    outputs not matching by name or shape, fails the result. `timing_runs`: also time
    session creation and `timing_runs` inference runs of each model (the result's `timing`).
    """
    tolerances = _check_tolerances(atol=atol, rtol_l2=rtol_l2, min_cosine=min_cosine,
                                   min_top1=min_top1)
    if not feeds:
        raise CalibrationError("no input samples to compare the models on")
    if timing_runs is not None and timing_runs < 1:
        raise ConfigError(f"--timing-runs must be at least 1, got {timing_runs}")
    if timing_runs is None:
        reference_session, candidate_session = _as_session(reference), _as_session(candidate)
    else:
        reference_session, candidate_session, timing = _timed_sessions(reference, candidate,
                                                                           timing_runs)
    reference_names = [o.name for o in reference_session.get_outputs()]
    candidate_names = [o.name for o in candidate_session.get_outputs()]
    failed = [f"outputs: candidate lacks output {name!r}"
              for name in reference_names if name not in candidate_names]
    failed += [f"outputs: candidate has extra output {name!r}"
               for name in candidate_names if name not in reference_names]
    stats = {name: _OutputStats(name) for name in reference_names if name in candidate_names}

    compared = 0
    for index, feed in enumerate(feeds):
        reference_values = _run_reference(reference_session, feed, index, synthetic)
        try:
            candidate_values = run_session(candidate_session, feed)
        except Exception as exc:  # a broken candidate is a failed validation, not a crash
            failed.append(f"run: the candidate model fails on sample {index}: "
                          f"{_first_line(exc)}")
            break
        fed = [(name, tuple(np.shape(value)), str(np.asarray(value).dtype))
               for name, value in feed.items()]
        for name, output_stats in stats.items():
            output_stats.add(reference_values[name], candidate_values[name], index, fed)
        compared += 1

    outputs = [output_stats.result(tolerances) for output_stats in stats.values()]
    for output in outputs:
        failed.extend(output.failed)
    result = ValidationResult(outputs, compared, tolerances, failed)
    if timing_runs is not None:
        if compared == len(feeds):  # a candidate that fails to run has no latency
            _time_inference(reference_session, candidate_session, feeds, timing_runs, timing)
        result.timing = timing
    if result.passed is None:
        for warning in _unchecked_warnings(result):
            log.warning("%s", warning)
    return result


def _run_reference(session: ort.InferenceSession, feed: Feed, index: int,
                   synthetic: bool) -> dict[str, Any]:
    try:
        return run_session(session, feed)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        origin = "synthetic inputs" if synthetic else "inputs"
        hint = _SYNTHETIC_HINT if synthetic else "check the data against the model's inputs"
        raise CalibrationError(f"the reference model cannot run on sample {index} of the "
                               f"{origin} ({describe_feed(feed)}): {_first_line(exc)}; "
                               f"{hint}") from None


def _timed_sessions(reference: ModelSource, candidate: ModelSource, runs: int
                    ) -> tuple[ort.InferenceSession, ort.InferenceSession, TimingResult]:
    """Both sessions, each built `SESSION_REPEATS` times alternately and timed; the last
    ones are kept. A session given is used as it is (no time). `runs`: inference runs to come."""
    sources = {"reference": reference, "candidate": candidate}
    sessions: dict[str, ort.InferenceSession] = {}
    samples: dict[str, list[float]] = {name: [] for name in sources}
    for repeat in range(SESSION_REPEATS):
        order = list(sources) if repeat % 2 == 0 else list(reversed(sources))
        for name in order:
            source = sources[name]
            if isinstance(source, ort.InferenceSession):
                sessions[name] = source
                continue
            sessions.pop(name, None)  # the previous one is freed before the next is built
            started = time.perf_counter()
            sessions[name] = make_session(source)
            samples[name].append(time.perf_counter() - started)
    timings = {name: ModelTiming(statistics.median(times) if times else None,
                                 session_samples=times) for name, times in samples.items()}
    return (sessions["reference"], sessions["candidate"],
            TimingResult(timings["reference"], timings["candidate"], runs, TIMING_WARMUP))


def _time_inference(reference: ort.InferenceSession, candidate: ort.InferenceSession,
                    feeds: Sequence[Feed], runs: int, timing: TimingResult) -> None:
    """Median and fastest of `runs` runs per model after `TIMING_WARMUP`, the two models
    alternating (R C, C R, R C, ...) over the feeds in turn; fills in `timing`."""
    sessions = {"reference": reference, "candidate": candidate}
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(TIMING_WARMUP + runs):
        feed = feeds[step % len(feeds)]
        order = list(sessions) if step % 2 == 0 else list(reversed(sessions))
        for name in order:
            started = time.perf_counter()
            run_session(sessions[name], feed)
            if step >= TIMING_WARMUP:
                samples[name].append(time.perf_counter() - started)
    for name, model_timing in (("reference", timing.reference),
                               ("candidate", timing.candidate)):
        model_timing.latency_seconds = statistics.median(samples[name])
        model_timing.latency_min_seconds = min(samples[name])


def format_timing(timing: TimingResult) -> str:
    """Session creation and inference latency of both models, and candidate / reference."""
    rows = [["", "session", "latency", "fastest"]]
    for name, model_timing in (("reference", timing.reference),
                               ("candidate", timing.candidate)):
        rows.append([name, _ms(model_timing.session_seconds), _ms(model_timing.latency_seconds),
                     _ms(model_timing.latency_min_seconds)])
    rows.append(["candidate/reference", _times(timing.ratio("session_seconds")),
                 _times(timing.ratio("latency_seconds")), ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"timing ({PROVIDERS[0]}, models interleaved): session median of "
             f"{SESSION_REPEATS} builds, latency median of {timing.runs} runs "
             f"({TIMING_WARMUP} warm-up)"]
    lines += ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
              for row in rows]
    if timing.candidate.latency_seconds is None:
        lines.append("latency not measured: the candidate does not run on these inputs")
    return "\n".join(lines)


def _unchecked_warnings(result: ValidationResult) -> list[str]:
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


def format_result(result: ValidationResult) -> str:
    """A short table: one row per output, an overall row, then the verdict.

    PASSED only when tolerances were given and all hold; NOT CHECKED without tolerances.
    """
    header = ["output", "shape", "max_abs_diff", "rel_l2", "cosine", "top1"]
    rows = [[o.name, _shape_text(o.shape), _num(o.max_abs_diff), _num(o.rel_l2),
             _cos(o.cosine), _frac(o.top1_agreement)] for o in result.outputs]
    samples = f"{result.samples} sample{'' if result.samples == 1 else 's'}"
    rows.append(["overall", samples, _num(result.max_abs_diff), _num(result.rel_l2),
                 _cos(result.cosine), _frac(result.top1_agreement)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines.extend(f"NaN/Inf in {o.name!r}: {o.reference_nonfinite} in the reference, "
                 f"{o.candidate_nonfinite} in the candidate"
                 for o in result.outputs if o.reference_nonfinite or o.candidate_nonfinite)
    limits = ", ".join(f"{name}={value:g}" for name, value in result.tolerances.items())
    if result.passed:
        lines.append(f"PASSED ({limits})")
    elif result.passed is None:
        lines.append("NOT CHECKED (no tolerance given: set --atol, --rtol, --min-cosine or "
                     "--min-top1)")
    else:
        lines.append("FAILED" + (f" ({limits})" if limits else ""))
        lines.extend(f"  - {reason}" for reason in result.failed)
    if result.timing is not None:
        lines.append(format_timing(result.timing))
    return "\n".join(lines)


class _OutputStats:
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

    def add(self, reference: Any, candidate: Any, index: int,
            fed: list[tuple[str, tuple[int, ...], str]]) -> None:
        """Add one sample; `fed`: (name, shape, dtype) of every input of that sample."""
        reference, candidate = _to_array(reference), _to_array(candidate)
        if self.shape is None:
            self.shape = reference.shape
            self.dtype = str(reference.dtype)
            self.numeric = _is_numeric(reference.dtype)
            self.class_scores = (_is_float(reference.dtype) and 2 <= reference.ndim <= 3
                                 and reference.shape[-1] >= 2
                                 and not self._is_state(reference.shape, fed))
        if reference.shape != candidate.shape:
            if self.shape_error is None:
                self.shape_error = (f"shape: output {self.name!r} is {list(candidate.shape)} in "
                                    f"the candidate, {list(reference.shape)} in the reference "
                                    f"(sample {index})")
            return
        self.compared += 1
        if not (self.numeric and _is_numeric(candidate.dtype)):
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

    def _is_state(self, shape: tuple[int, ...],
                  fed: list[tuple[str, tuple[int, ...], str]]) -> bool:
        name = self.name.lower()
        return any(shape == input_shape and self.dtype == input_dtype
                   and (name.startswith(input_name.lower())
                        or input_name.lower().startswith(name)
                        or _STATE_WORDS.search(name) is not None)
                   for input_name, input_shape, input_dtype in fed)

    def result(self, tolerances: dict[str, float]) -> OutputComparison:
        output = OutputComparison(self.name, None if self.shape is None else list(self.shape),
                                  self.dtype, reference_nonfinite=self.reference_nonfinite,
                                  candidate_nonfinite=self.candidate_nonfinite,
                                  new_nonfinite=self.new_nonfinite, checked=bool(tolerances))
        if self.shape_error:
            output.failed.append(self.shape_error)
        if self.new_nonfinite:
            output.failed.append(f"nan: output {self.name!r} has {self.new_nonfinite} NaN/Inf "
                                 "values where the reference is finite")
        if self.compared == 0:
            return output
        if not self.numeric:
            if self.unequal:
                output.failed.append(f"values: output {self.name!r} differs in {self.unequal} "
                                     f"of {self.compared} samples")
            return output
        if self.reference_nonfinite or self.candidate_nonfinite:
            output.max_abs_diff = output.rel_l2 = output.cosine = math.nan
            output.top1_agreement = math.nan if self.class_scores else None
            if tolerances and not self.new_nonfinite:
                output.failed.append(
                    f"nan: output {self.name!r} has {self.reference_nonfinite} NaN/Inf values "
                    f"in the reference and {self.candidate_nonfinite} in the candidate; no "
                    "tolerance can hold")
            return output
        output.max_abs_diff = self.max_abs
        output.rel_l2 = _ratio(math.sqrt(self.diff_sq), math.sqrt(self.reference_sq))
        output.cosine = _cosine(self.dot, self.reference_sq, self.candidate_sq)
        if self.top1_rows:
            output.top1_agreement = self.top1_hits / self.top1_rows
        output.failed.extend(_tolerance_failures(output, tolerances))
        return output


def _tolerance_failures(output: OutputComparison, tolerances: dict[str, float]) -> list[str]:
    failures = []
    name = output.name
    if "atol" in tolerances and not output.max_abs_diff <= tolerances["atol"]:
        failures.append(f"atol: output {name!r} max_abs_diff {output.max_abs_diff:.4g} > "
                        f"{tolerances['atol']:g}")
    if "rtol_l2" in tolerances and not output.rel_l2 <= tolerances["rtol_l2"]:
        failures.append(f"rtol_l2: output {name!r} rel_l2 {output.rel_l2:.4g} > "
                        f"{tolerances['rtol_l2']:g}")
    if "min_cosine" in tolerances and not output.cosine >= tolerances["min_cosine"]:
        failures.append(f"min_cosine: output {name!r} cosine {output.cosine:.6f} < "
                        f"{tolerances['min_cosine']:g}")
    if ("min_top1" in tolerances and output.top1_agreement is not None
            and not output.top1_agreement >= tolerances["min_top1"]):
        failures.append(f"min_top1: output {name!r} top1_agreement "
                        f"{output.top1_agreement:.4f} < {tolerances['min_top1']:g}")
    return failures


def _check_tolerances(**given: float | None) -> dict[str, float]:
    tolerances = {}
    for name, value in given.items():
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        low, high = {"min_cosine": (-1.0, 1.0), "min_top1": (0.0, 1.0)}.get(name, (0.0, math.inf))
        if not low <= value <= high:
            raise ConfigError(f"{name} must lie in [{low:g}, {high:g}], got {value:g}")
        tolerances[name] = value
    return tolerances


def _as_session(model: ModelSource) -> ort.InferenceSession:
    return model if isinstance(model, ort.InferenceSession) else make_session(model)


def run_session(session: ort.InferenceSession, feed: Feed) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    needs_ortvalues = any(arr.dtype.kind == "V" for arr in feed.values()) or any(
        kind in o.type for o in session.get_outputs() for kind in _ORTVALUE_ONLY_TYPES)
    if not needs_ortvalues:
        return dict(zip(names, session.run(names, feed), strict=True))
    values = session.run_with_ort_values(names, {k: _to_ortvalue(v) for k, v in feed.items()})
    return {name: _ortvalue_to_numpy(value) for name, value in zip(names, values, strict=True)}


def _to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if array.dtype.kind != "V":
        return ort.OrtValue.ortvalue_from_numpy(array)
    # ml_dtypes arrays (bfloat16, float8): hand over the bits with the ONNX element type.
    element_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    bits = array.view(f"u{array.dtype.itemsize}")
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=element_type)


def _ortvalue_to_numpy(value: ort.OrtValue) -> np.ndarray:
    if not value.is_tensor():
        return value.numpy()
    try:
        return value.numpy()
    except RuntimeError:  # bfloat16 / float8 have no numpy type in onnxruntime: copy the bits
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.element_type()))
        shape = tuple(value.shape())
        nbytes = value.tensor_size_in_bytes()
        if nbytes == 0:
            return np.zeros(shape, dtype)
        buffer = (ctypes.c_char * nbytes).from_address(value.data_ptr())
        return np.frombuffer(buffer, dtype=np.uint8).copy().view(dtype).reshape(shape)


def _to_array(value: Any) -> np.ndarray:
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


def _is_float(dtype: np.dtype) -> bool:
    if dtype.kind == "f":
        return True
    if dtype.kind != "V":
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def _is_numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "biu" or _is_float(dtype)


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


def _worst(values: list[float | None], pick) -> float | None:
    """The worst of the values present; NaN (an output with NaN/Inf) is worst of all."""
    present = [v for v in values if v is not None]
    if any(math.isnan(v) for v in present):
        return math.nan
    return pick(present) if present else None


def _json_float(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _shape_text(shape: list[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _frac(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
