"""`onnxprune search`: the most compression whose pruned model still meets a constraint.

Every combination of the categorical choices (`space.py`) is a candidate; for each, the
highest sparsity level that meets the constraint is found by bisection over a grid
(`bisection.py`: the check is assumed monotone, as pruning more never helps a model). The
objective then picks among the candidates' answers: the highest sparsity reached, the
smallest file, or the lowest measured latency. Trials run in worker processes or on Ray
(`runners.py`); spare workers evaluate levels the bisection may need next, so the answer
is the serial one whatever the number of workers. One-pass calibration statistics are
captured once here, before any trial, and shipped to the workers with the job.

Ctrl-C stops the search: finished trials are kept, the best of them is written, and the
trial table says the search was interrupted.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import PruneConfig
from ..errors import ConfigError
from .bisection import Bisection
from .runners import make_runner
from .space import Candidate, SearchSpace
from .table import plot, write_tables
from .trials import OBJECTIVES, Constraint, SearchJob, Trial, TrialResult, evaluate_command

log = logging.getLogger(__name__)

__all__ = ["SEARCHERS", "Constraint", "SearchResult", "SearchSpace", "search"]

SEARCHERS = ("bisect", "optuna")


@dataclass
class SearchResult:
    best: TrialResult | None
    trials: list[TrialResult]
    candidates: list[Candidate]
    answers: dict[int, float | None]  # per candidate: the highest level that passed
    interrupted: bool = False
    exhausted: bool = False  # the trial budget ran out before every bisection ended
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def search(model: str | os.PathLike, output: str | os.PathLike, *, space: SearchSpace,
           base: PruneConfig, constraint: Constraint, objective: str = "sparsity",
           data: str | None = None, samples: int | None = None, workers: int | None = None,
           ray_address: str | None = None, max_trials: int | None = None,
           searcher: str = "bisect",
           on_trial: Callable[[TrialResult, Candidate], None] | None = None) -> SearchResult:
    """Search `space` for the best model under `constraint`; write it to `output`, and the
    trial table and Pareto plot beside it (`table.side_paths`). `searcher`: "bisect" (a
    bisection per candidate, the default) or "optuna" (TPE over everything, `tpe.py`)."""
    from ..calib.cache import CalibrationCache
    from ..io import check_output_path, load_model
    from ..pipeline import gather_statistics

    started = time.perf_counter()
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}")
    if searcher not in SEARCHERS:
        raise ConfigError(f"--searcher must be one of {', '.join(SEARCHERS)}")
    if max_trials is not None and max_trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {max_trials}")
    model, output = Path(model).resolve(), Path(output)
    loaded = load_model(model, lazy=True)
    check_output_path(output, model)
    base = base.replace(**space.base) if space.base else base
    candidates = space.candidates(str(base.pattern), base.structure)
    configs = [base.replace(**c.settings, sparsity=c.levels[0]) for c in candidates]
    _check_settings(configs, loaded, data, samples)
    if constraint.eval_cmd is not None:
        _check_dense(constraint, model)
    cache = CalibrationCache()
    for config in configs:
        if config.structure == "none":
            captured = gather_statistics(loaded, config, cache)
            if captured:
                log.info("captured one-pass statistics of %d layer inputs for %s", captured,
                         config.method)
    workdir = Path(tempfile.mkdtemp(prefix=".onnxprune-search-", dir=output.parent or "."))
    job = SearchJob(uuid.uuid4().hex, str(model), base, constraint, objective, data, samples,
                    str(workdir), cache)
    result = SearchResult(None, [], candidates, {})
    try:
        runner = make_runner(job, workers, ray_address)
        try:
            if searcher == "optuna":
                from .tpe import run_tpe, tpe_answers

                record = _recorder(result, workdir, candidates, on_trial)
                try:
                    run_tpe(runner, candidates, record, objective, max_trials, base.seed)
                finally:
                    result.answers = tpe_answers(candidates, result.trials)
                    result.exhausted = True  # TPE has no end of its own: its budget ends it
            else:
                _run(runner, candidates, result, workdir, objective, max_trials, on_trial)
        except KeyboardInterrupt:
            result.interrupted = True
            log.warning("interrupted: keeping the %d finished trial(s)", len(result.trials))
        finally:
            runner.close(cancel=result.interrupted)
        result.best = _best(result, objective)
        if result.best is not None:
            _place(result.best, output, base, job)
        result.seconds = round(time.perf_counter() - started, 2)
        summary = {"model": str(model), "output": str(output) if result.best else None,
                   "objective": objective, "constraint": constraint.describe(),
                   "interrupted": result.interrupted, "exhausted": result.exhausted,
                   "seconds": result.seconds,
                   "candidates": [{"number": c.number, "settings": dict(c.settings),
                                   "answer": result.answers.get(c.number)}
                                  for c in candidates],
                   "best": result.best.row() if result.best else None}
        result.files = write_tables(result.trials, summary, output, constraint.metric)
        picture = plot(result.trials, output, constraint.metric, objective,
                       higher_is_better=constraint.metric not in ("rel_l2", "max_abs_diff")
                       and constraint.maximum is None)
        if picture is not None:
            result.files["png"] = picture
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _check_settings(configs: list[PruneConfig], loaded, data: str | None,
                    samples: int | None) -> None:
    """Refuse up front what every trial would fail on: unknown parts, unreadable data."""
    from ..inputs import load_npz_inputs
    from ..registry import ALLOCATIONS, METHODS

    for config in configs:
        METHODS.build(config.method, config.options)
        ALLOCATIONS.build(config.allocation_name, config.options)
    if data is not None:
        load_npz_inputs(data, loaded.proto, samples)


def _check_dense(constraint: Constraint, model: Path) -> None:
    value = evaluate_command(str(constraint.eval_cmd), model)
    if (constraint.minimum is not None and value < constraint.minimum) or \
            (constraint.maximum is not None and value > constraint.maximum):
        raise ConfigError(f"the dense model itself fails the constraint: --eval-cmd gives "
                          f"{value:g} ({constraint.describe()})")
    log.info("dense model: --eval-cmd gives %g", value)


def _recorder(result: SearchResult, workdir: Path, candidates: list[Candidate], on_trial):
    """What happens to every finished trial: its model kept (a remote worker's written
    here), models no answer needs dropped, the caller told."""
    by_number = {c.number: c for c in candidates}

    def record(finished: TrialResult) -> None:
        if finished.model_bytes is not None:  # a remote worker's model
            path = workdir / f"trial-{finished.number}.onnx"
            path.write_bytes(finished.model_bytes)
            if finished.data_bytes is not None:
                path.with_name(path.name + ".data").write_bytes(finished.data_bytes)
            finished.model_bytes = finished.data_bytes = None
            finished.path = str(path)
        result.trials.append(finished)
        _drop_unneeded(result)
        if on_trial is not None:
            on_trial(finished, by_number[finished.candidate])

    return record


def _run(runner, candidates: list[Candidate], result: SearchResult, workdir: Path,
         objective: str, max_trials: int | None, on_trial) -> None:
    """Fill the workers with the levels the bisections want, until all are done."""
    bisections = {c.number: Bisection(c.levels) for c in candidates}
    by_number = {c.number: c for c in candidates}
    record = _recorder(result, workdir, candidates, on_trial)
    pending: dict[object, Trial] = {}
    started = 0
    while True:
        busy = {c: frozenset(t.level for t in pending.values() if t.candidate == c)
                for c in bisections}
        free = runner.workers - len(pending)
        # first what each serial path needs now, then speculative levels, candidate order
        for depth in (1, runner.workers):
            for number, bisection in bisections.items():
                if free <= 0 or (max_trials is not None and started >= max_trials):
                    break
                for level in bisection.wanted(min(depth, free), busy[number]):
                    candidate = by_number[number]
                    trial = Trial(started, number, level, candidate.levels[level],
                                  dict(candidate.settings))
                    pending[runner.submit(trial)] = trial
                    busy[number] = busy[number] | {level}
                    started += 1
                    free -= 1
        if not pending:
            break
        for handle, finished in runner.wait(pending):
            pending.pop(handle)
            bisections[finished.candidate].record(finished.level, finished.passed)
            record(finished)
    result.exhausted = not all(b.done for b in bisections.values())
    for number, bisection in bisections.items():
        answer = bisection.answer if bisection.done else None
        result.answers[number] = (by_number[number].levels[answer]
                                  if answer is not None else None)


def _highest_passing(result: SearchResult) -> dict[int, TrialResult]:
    """Per candidate, its passing trial at the highest level."""
    chosen: dict[int, TrialResult] = {}
    for trial in result.trials:
        if trial.passed and (trial.candidate not in chosen
                             or trial.level > chosen[trial.candidate].level):
            chosen[trial.candidate] = trial
    return chosen


def _best(result: SearchResult, objective: str) -> TrialResult | None:
    """The best candidate answer by the objective: each candidate's trial at its
    bisection's answer (not a speculative trial above it, which a non-monotone check may
    pass: the answer must not depend on the number of workers); after an interruption or
    with the trial budget spent, each candidate's highest passing level so far."""
    finals = []
    settled = not result.interrupted and not result.exhausted
    for number, highest in _highest_passing(result).items():
        trial: TrialResult | None = highest
        if settled:
            answer = result.answers.get(number)
            trial = next((t for t in result.trials if t.candidate == number and t.passed
                          and t.sparsity == answer), None)
        if trial is not None and trial.objective(objective) is not None:
            finals.append(trial)
    if not finals:
        return None
    return max(finals, key=lambda t: (t.objective(objective), -t.candidate, -t.number))


def _drop_unneeded(result: SearchResult) -> None:
    """Delete the model files that are not some candidate's highest pass so far."""
    keep = {id(t) for t in _highest_passing(result).values()}
    for trial in result.trials:
        if trial.path is not None and id(trial) not in keep:
            for path in (Path(trial.path), Path(trial.path + ".data")):
                path.unlink(missing_ok=True)
            trial.path = None


def _place(best: TrialResult, output: Path, base: PruneConfig, job: SearchJob) -> None:
    """The best trial's model at `output`: renamed into place, or (a model with external
    data, which names its data file) pruned again there."""
    if best.path is not None and Path(best.path).exists() and \
            not Path(best.path + ".data").exists():
        os.replace(best.path, output)
        best.path = str(output)
        return
    from ..api import prune

    prune(job.model, output, config=base.replace(**best.settings, sparsity=best.sparsity),
          calibration=job.calibration)  # the statistics the trial used: the same model
    best.path = str(output)
