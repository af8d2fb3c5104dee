"""One trial of a search, as a worker runs it: prune with the trial's settings, check the
constraint, measure the objective.

A worker keeps, per search, the reference session, the check's inputs and a
`CalibrationCache` (the calibration samples, read once, and one-pass statistics, captured
once) across its trials. The search process captures those statistics before any trial
and ships them to the workers, so no worker captures them again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from ..errors import ConfigError, OnnxPruneError
from ..io import model_file_bytes

OBJECTIVES = ("sparsity", "size", "latency")
EVAL_TIMEOUT_S = 3600
LATENCY_RUNS = 20


@dataclass(frozen=True)
class Constraint:
    """What a pruned model must meet: validate's tolerances against the dense model on the
    search's data, or the number an evaluation command prints (at least `minimum`, at most
    `maximum`)."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    eval_cmd: str | None = None
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        tolerances = [self.atol, self.rtol, self.min_cosine, self.min_top1]
        if self.eval_cmd is not None:
            if any(t is not None for t in tolerances):
                raise ConfigError("--eval-cmd and validate tolerances (--atol, --rtol, "
                                  "--min-cosine, --min-top1) exclude each other")
            if self.minimum is None and self.maximum is None:
                raise ConfigError("--eval-cmd needs --min or --max on the number it prints")
            if "{model}" not in self.eval_cmd:
                raise ConfigError("--eval-cmd must contain {model}, where the pruned model's "
                                  "path goes")
        elif all(t is None for t in tolerances):
            raise ConfigError("search needs a constraint: --min-top1, --min-cosine, --rtol, "
                              "--atol, or --eval-cmd with --min/--max")
        elif self.minimum is not None or self.maximum is not None:
            raise ConfigError("--min/--max apply to --eval-cmd only")

    @property
    def metric(self) -> str:
        """The figure the table and plot show: the command's number, or validate's."""
        if self.eval_cmd is not None:
            return "value"
        for name in ("min_top1", "min_cosine", "rtol", "atol"):
            if getattr(self, name) is not None:
                return {"min_top1": "top1_agreement", "min_cosine": "cosine",
                        "rtol": "rel_l2", "atol": "max_abs_diff"}[name]
        return "cosine"

    def describe(self) -> str:
        if self.eval_cmd is not None:
            bounds = [f">= {self.minimum}" if self.minimum is not None else "",
                      f"<= {self.maximum}" if self.maximum is not None else ""]
            return f"the number `{self.eval_cmd}` prints " + " and ".join(b for b in bounds if b)
        parts = [f"{name} {value}" for name, value in (
            ("top-1 >=", self.min_top1), ("cosine >=", self.min_cosine),
            ("relative L2 <=", self.rtol), ("max abs diff <=", self.atol)) if value is not None]
        return ", ".join(parts)


@dataclass(frozen=True)
class SearchJob:
    """Everything a worker needs for every trial of one search (shipped once)."""

    key: str  # names the search: workers keep their state per key
    model: str
    base: PruneConfig
    constraint: Constraint
    objective: str = "sparsity"
    data: str | None = None  # the check's inputs (.npz or folder); None: synthetic
    samples: int | None = None
    workdir: str = "."
    calibration: Any = None  # a CalibrationCache captured by the search process


@dataclass(frozen=True)
class Trial:
    number: int
    candidate: int
    level: int  # index into the candidate's sparsity levels
    sparsity: float
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialResult:
    number: int
    candidate: int
    level: int
    sparsity: float
    settings: dict[str, Any]
    passed: bool = False
    error: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    achieved: float | None = None  # sparsity the prune reached (structured: params removed)
    file_bytes: int | None = None
    latency_ms: float | None = None
    seconds: float = 0.0
    path: str | None = None  # the pruned model while the search keeps it
    model_bytes: bytes | None = None  # the pruned model itself, from a remote worker
    data_bytes: bytes | None = None  # and its external data file, if it has one

    def objective(self, kind: str) -> float | None:
        """The figure the search optimizes, larger is better (size and latency negated)."""
        if kind == "sparsity":
            return self.achieved
        if kind == "size":
            return None if self.file_bytes is None else -float(self.file_bytes)
        return None if self.latency_ms is None else -self.latency_ms

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("path")
        row.pop("model_bytes")
        row.pop("data_bytes")
        return row


_WORKER_STATE: dict[str, dict[str, Any]] = {}


def run_trial(job: SearchJob, trial: Trial) -> TrialResult:
    """Prune, check and measure one trial (in a worker, or in the search process)."""
    from ..api import prune

    started = time.perf_counter()
    result = TrialResult(trial.number, trial.candidate, trial.level, trial.sparsity,
                         dict(trial.settings))
    output = Path(job.workdir) / f"trial-{trial.number}.onnx"
    try:
        state = _state(job)
        config = job.base.replace(**trial.settings, sparsity=trial.sparsity)
        with _quiet():  # what one trial logs, every trial would: the search reports instead
            _, report = prune(job.model, output, config=config,
                              calibration=state["calibration"])
        result.path = str(output)
        result.file_bytes = model_file_bytes(output)
        result.achieved = _achieved(report)
        result.passed, result.metrics = _check(job, state, output)
        if job.objective == "latency":
            result.latency_ms = _latency_ms(state, output)
    except OnnxPruneError as exc:
        result.error = str(exc).splitlines()[0]
        _remove(output)
        result.path = None
    except Exception as exc:  # a worker never dies of one trial
        result.error = f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        _remove(output)
        result.path = None
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def forget(job: SearchJob) -> None:
    """Drop what this process keeps for the search (its trials ran here)."""
    _WORKER_STATE.pop(job.key, None)


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger("onnxprune")
    level = logger.level
    if logger.getEffectiveLevel() > logging.DEBUG:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _state(job: SearchJob) -> dict[str, Any]:
    """The worker's state for this search: made on its first trial."""
    state = _WORKER_STATE.get(job.key)
    if state is None:
        from ..calib.cache import CalibrationCache

        state = {"calibration": job.calibration or CalibrationCache()}
        if job.constraint.eval_cmd is None or job.objective == "latency":
            from ..inputs import load_npz_inputs, synthetic_inputs
            from ..io import load_model
            from ..runtime import make_session

            reference = make_session(job.model)
            model = load_model(Path(job.model), lazy=True).proto
            state["reference"] = reference
            state["feeds"] = (load_npz_inputs(job.data, model, job.samples) if job.data
                              else synthetic_inputs(model, job.samples or 4,
                                                    seed=job.base.seed,
                                                    dims=dict(job.base.synthetic_dims or {}),
                                                    input_shapes=dict(job.base.synthetic_shapes
                                                                or {})))
        _WORKER_STATE.clear()  # one search per worker at a time
        _WORKER_STATE[job.key] = state
    return state


def _check(job: SearchJob, state: dict[str, Any], output: Path
           ) -> tuple[bool, dict[str, float | None]]:
    constraint = job.constraint
    if constraint.eval_cmd is not None:
        value = evaluate_command(constraint.eval_cmd, output)
        passed = ((constraint.minimum is None or value >= constraint.minimum)
                  and (constraint.maximum is None or value <= constraint.maximum))
        return passed, {"value": value}
    from ..validate import compare_models

    compared = compare_models(state["reference"], str(output), state["feeds"],
                              atol=constraint.atol, rtol_l2=constraint.rtol,
                              min_cosine=constraint.min_cosine, min_top1=constraint.min_top1)
    metrics = {"cosine": compared.cosine, "top1_agreement": compared.top1_agreement,
               "rel_l2": compared.rel_l2, "max_abs_diff": compared.max_abs_diff}
    return bool(compared.passed), metrics


def evaluate_command(command: str, model: Path) -> float:
    """Run the user's command on `model`; the number on the last line of its output.
    A command that fails or prints no number is an `OnnxPruneError` naming it."""
    line = command.replace("{model}", shlex.quote(str(model)))
    # its own process group: a timeout stops the whole pipeline, not only the shell
    process = subprocess.Popen(line, shell=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=EVAL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise EvalCommandError(f"--eval-cmd ran over {EVAL_TIMEOUT_S} s") from exc
    if process.returncode != 0:
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        raise EvalCommandError(f"--eval-cmd exited with status {process.returncode}: {tail}")
    lines = [text for text in stdout.strip().splitlines() if text.strip()]
    try:
        value = float(lines[-1].strip())
    except (IndexError, ValueError) as exc:
        shown = lines[-1].strip()[:60] if lines else "nothing"
        raise EvalCommandError(f"--eval-cmd's last line is not a number: {shown!r}") from exc
    if not math.isfinite(value):
        raise EvalCommandError(f"--eval-cmd printed {value}")
    return value


class EvalCommandError(OnnxPruneError):
    """The user's evaluation command failed or printed no number."""


def _latency_ms(state: dict[str, Any], output: Path) -> float | None:
    from ..runtime import make_session, run_session
    from ..validate.timing import time_inference, timed_sessions

    reference, candidate, timing = timed_sessions(state["reference"], str(output),
                                                  LATENCY_RUNS, build=make_session)
    time_inference(reference, candidate, state["feeds"], timing, run_session)
    seconds = timing.candidate.latency_seconds
    return round(1000.0 * seconds, 4) if seconds is not None else None


def _achieved(report) -> float:
    structured = report.structured
    if structured is not None and structured.get("params_before"):
        removed = structured["params_before"] - structured["params_after"]
        if report.targets and report.summary.zeros:  # a second stage zeroed some too
            removed += report.summary.zeros
        return removed / structured["params_before"]
    return float(report.summary.sparsity)


def _remove(path: Path) -> None:
    for item in (path, path.with_name(path.name + ".data")):
        try:
            os.remove(item)
        except FileNotFoundError:
            pass
