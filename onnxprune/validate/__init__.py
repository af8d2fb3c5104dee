"""Run a reference and a candidate model in onnxruntime on the same feeds and compare them.

The package, one job per module:

- this module drives a comparison: the feeds (`validation_feeds`), both sessions, every
  sample through both models (`compare_models`, `validate_models`);
- `metrics`: running sums per output and the figures they give (max abs diff, relative L2,
  cosine, top-1 agreement of class scores);
- `policy`: tolerances, per-output failures, the verdict (`ValidationResult`) and the
  warnings of an unchecked comparison;
- `timing`: session creation and inference time of both models, interleaved;
- `text`: the result and the timing as text.

Sessions are built and run in `onnxprune.runtime`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import CalibrationError, ConfigError
from ..inputs import (
    Feed,
    defaulted_dims,
    defaulted_dims_warning,
    describe_feed,
    fed_inputs,
    load_npz_inputs,
    synthetic_inputs,
)
from ..io import load_model
from ..runtime import PROVIDERS, make_session, run_session
from ..runtime import first_line as _first_line
from .metrics import OutputComparison, OutputStats
from .policy import (
    WARN_BELOW_COSINE,
    WARN_BELOW_TOP1,
    ValidationResult,
    check_tolerances,
    judge_output,
    unchecked_warnings,
)
from .text import format_inputs, format_result, format_timing
from .timing import (
    DEFAULT_TIMING_RUNS,
    SESSION_REPEATS,
    TIMING_WARMUP,
    ModelTiming,
    TimingResult,
    time_inference,
    timed_sessions,
)

__all__ = [
    "DEFAULT_SYNTHETIC_SAMPLES", "DEFAULT_TIMING_RUNS", "PROVIDERS", "SESSION_REPEATS",
    "TIMING_WARMUP", "WARN_BELOW_COSINE", "WARN_BELOW_TOP1", "ModelSource", "ModelTiming",
    "OutputComparison", "TimingResult", "ValidationResult", "check_reference_runs",
    "compare_models", "format_inputs", "format_result", "format_timing", "make_session",
    "run_session", "validate_models", "validation_feeds",
]

log = logging.getLogger(__name__)

ModelSource: TypeAlias = str | os.PathLike | onnx.ModelProto | ort.InferenceSession

DEFAULT_SYNTHETIC_SAMPLES = 4  # the CLI help promises 4
_SYNTHETIC_HINT = ("set the input shapes with --input-shapes NAME:[d0,d1,...] (or --dim "
                   "NAME=VALUE) or give real inputs with --data")


def validation_feeds(model: str | os.PathLike | onnx.ModelProto, *,
                     data: str | os.PathLike | None = None, samples: int | None = None,
                     seed: int = 0, dims: dict[str, int] | None = None,
                     input_shapes: Mapping[str, Sequence[int]] | None = None
                     ) -> tuple[list[Feed], bool]:
    """The feeds to compare on, and whether they are synthetic.

    From `data` (an `.npz` or a folder of them; `samples` caps how many) or else `samples`
    synthetic ones (default 4) following the model's inputs, random by `seed`, shaped by
    `input_shapes` and `dims`; a warning names every dynamic dimension (other than a batch)
    left at its default size. Names, dtypes and shapes are checked against the model here,
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
    feeds = synthetic_inputs(proto, count, seed, dims, input_shapes)
    warning = defaulted_dims_warning(defaulted_dims(proto, dims, input_shapes))
    if warning:
        log.warning("%s", warning)
    return feeds, True


def validate_models(reference: str | os.PathLike | onnx.ModelProto,
                    candidate: str | os.PathLike | onnx.ModelProto, *,
                    data: str | os.PathLike | None = None, samples: int | None = None,
                    seed: int = 0, dims: dict[str, int] | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None,
                    atol: float | None = None, rtol_l2: float | None = None,
                    min_cosine: float | None = None,
                    min_top1: float | None = None) -> ValidationResult:
    """Feeds from `validation_feeds` for the reference, then `compare_models`."""
    feeds, synthetic = validation_feeds(reference, data=data, samples=samples, seed=seed,
                                        dims=dims, input_shapes=input_shapes)
    return compare_models(reference, candidate, feeds, atol=atol, rtol_l2=rtol_l2,
                          min_cosine=min_cosine, min_top1=min_top1, synthetic=synthetic)


def check_reference_runs(reference: ModelSource, feeds: Sequence[Feed],
                         synthetic: bool = False) -> ort.InferenceSession:
    """Run the reference on the first feed: a `CalibrationError` now rather than after a
    long prune if onnxruntime cannot run it on these inputs.

    Returns the session it ran (the one given, or one built here), to be passed to
    `compare_models` as the reference so that it is not built twice.
    """
    if not feeds:
        raise CalibrationError("no input samples to compare the models on")
    session = _as_session(reference)
    _run_reference(session, feeds[0], 0, synthetic)
    return session


def compare_models(reference: ModelSource, candidate: ModelSource, feeds: Sequence[Feed], *,
                   atol: float | None = None, rtol_l2: float | None = None,
                   min_cosine: float | None = None, min_top1: float | None = None,
                   synthetic: bool = False, timing_runs: int | None = None) -> ValidationResult:
    """Run both models on every feed and compare all outputs by name.

    Each model is a path, a ModelProto or a session already built (`check_reference_runs`
    returns one); with `timing_runs`, a session given is not timed. The reference failing
    on a feed is a `CalibrationError` (the inputs are wrong; with `synthetic` feeds the
    message suggests how to shape them); the candidate failing, or its outputs not matching
    by name or shape, fails the result. `timing_runs`: also time session creation and
    `timing_runs` inference runs of each model (the result's `timing`).
    """
    tolerances = check_tolerances(atol=atol, rtol_l2=rtol_l2, min_cosine=min_cosine,
                                  min_top1=min_top1)
    if not feeds:
        raise CalibrationError("no input samples to compare the models on")
    if timing_runs is not None and timing_runs < 1:
        raise ConfigError(f"--timing-runs must be at least 1, got {timing_runs}")
    if timing_runs is None:
        reference_session, candidate_session = _as_session(reference), _as_session(candidate)
    else:
        reference_session, candidate_session, timing = timed_sessions(
            reference, candidate, timing_runs, build=make_session)
    reference_names = [o.name for o in reference_session.get_outputs()]
    candidate_names = [o.name for o in candidate_session.get_outputs()]
    failed = [f"outputs: candidate lacks output {name!r}"
              for name in reference_names if name not in candidate_names]
    failed += [f"outputs: candidate has extra output {name!r}"
               for name in candidate_names if name not in reference_names]
    stats = {name: OutputStats(name) for name in reference_names if name in candidate_names}

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

    outputs = [output_stats.result() for output_stats in stats.values()]
    for output in outputs:
        judge_output(output, tolerances)
        failed.extend(output.failed)
    result = ValidationResult(outputs, compared, tolerances, failed,
                              inputs=fed_inputs(feeds), synthetic=synthetic)
    if timing_runs is not None:
        if compared == len(feeds):  # a candidate that fails to run has no latency
            # run_session looked up here, at call time, so that a test can wrap it
            time_inference(reference_session, candidate_session, feeds, timing, run_session)
        result.timing = timing
    if result.passed is None:
        for warning in unchecked_warnings(result):
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
                               f"{hint}") from exc


def _as_session(model: ModelSource) -> ort.InferenceSession:
    return model if isinstance(model, ort.InferenceSession) else make_session(model)
