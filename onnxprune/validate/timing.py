"""Session creation and inference time of a reference and a candidate, measured so that the
two can be compared.

A pruned model is not faster on a CPU because it has zeros, and a compact one takes longer
to load; users should see that gap measured. Session creation is timed `SESSION_REPEATS`
times per model and inference `runs` times after `TIMING_WARMUP` warm-up runs, always
alternating the two models (reference then candidate, then candidate then reference) so that
a busy machine, caches and clock changes weigh on both alike; medians are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from ..inputs import Feed
from ..runtime import PROVIDERS

SESSION_REPEATS = 3  # session creations timed per model (the first of a process pays more)
TIMING_WARMUP = 3  # untimed runs per model before the timed ones
DEFAULT_TIMING_RUNS = 20

RunSession = Callable[[ort.InferenceSession, Feed], Any]


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


def timed_sessions(reference: Any, candidate: Any, runs: int,
                   build: Callable[[Any], ort.InferenceSession]
                   ) -> tuple[ort.InferenceSession, ort.InferenceSession, TimingResult]:
    """Both sessions, each made by `build` `SESSION_REPEATS` times alternately and timed; the
    last ones are kept. A session given is used as it is (no time). `runs`: inference runs
    to come."""
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
            sessions[name] = build(source)
            samples[name].append(time.perf_counter() - started)
    timings = {name: ModelTiming(statistics.median(times) if times else None,
                                 session_samples=times) for name, times in samples.items()}
    return (sessions["reference"], sessions["candidate"],
            TimingResult(timings["reference"], timings["candidate"], runs, TIMING_WARMUP))


def time_inference(reference: ort.InferenceSession, candidate: ort.InferenceSession,
                   feeds: Sequence[Feed], timing: TimingResult, run: RunSession) -> None:
    """Median and fastest of `timing.runs` calls of `run` per model after `TIMING_WARMUP`,
    the two models alternating (R C, C R, R C, ...) over the feeds in turn; fills in
    `timing`."""
    sessions = {"reference": reference, "candidate": candidate}
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for step in range(TIMING_WARMUP + timing.runs):
        feed = feeds[step % len(feeds)]
        order = list(sessions) if step % 2 == 0 else list(reversed(sessions))
        for name in order:
            started = time.perf_counter()
            run(sessions[name], feed)
            if step >= TIMING_WARMUP:
                samples[name].append(time.perf_counter() - started)
    for name, model_timing in (("reference", timing.reference),
                               ("candidate", timing.candidate)):
        model_timing.latency_seconds = statistics.median(samples[name])
        model_timing.latency_min_seconds = min(samples[name])
