"""The Optuna searcher (`--searcher optuna`): TPE over the candidates and the sparsity
levels together, for spaces too large to bisect every candidate of.

Each trial Optuna asks for is a candidate and a level; a trial that fails the constraint
is infeasible (TPE's `constraints_func`), one that meets it is scored by the objective.
Trials run on the search's runner as they are asked for, one per free worker, and are told
back as they finish: with one worker and a seed the search is reproducible; with several,
what TPE proposes depends on the order trials finish.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from .space import Candidate
from .trials import Trial, TrialResult

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 40


def run_tpe(runner, candidates: list[Candidate], record, objective: str,
            max_trials: int | None, seed: int) -> None:
    """Ask, run and tell until `max_trials` (default DEFAULT_TRIALS); `record(result)`
    takes every finished trial."""
    try:
        import optuna
    except ImportError as exc:
        raise ConfigError("--searcher optuna needs Optuna: pip install "
                          "'onnxprune[search]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        seed=seed, constraints_func=lambda frozen: (frozen.user_attrs.get("violation", 1.0),))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    longest = max(len(c.levels) for c in candidates)
    budget = max_trials or DEFAULT_TRIALS
    pending: dict[object, optuna.trial.Trial] = {}
    started = 0
    while started < budget or pending:
        while started < budget and len(pending) < runner.workers:
            asked = study.ask()
            number = asked.suggest_categorical("candidate", [c.number for c in candidates])
            candidate = candidates[number]
            position = asked.suggest_int("level", 0, longest - 1)
            level = min(len(candidate.levels) - 1,
                        round(position * (len(candidate.levels) - 1) / max(1, longest - 1)))
            trial = Trial(started, number, level, candidate.levels[level],
                          dict(candidate.settings))
            pending[runner.submit(trial)] = asked
            started += 1
        for handle, finished in runner.wait(list(pending)):
            told = pending.pop(handle)
            value = finished.objective(objective)
            told.set_user_attr("violation", 0.0 if finished.passed else 1.0)
            study.tell(told, value if value is not None else -1e30)
            record(finished)


def tpe_answers(candidates: list[Candidate], trials: list[TrialResult]
                ) -> dict[int, float | None]:
    """Per candidate, the highest level that passed among its trials."""
    answers: dict[int, float | None] = {c.number: None for c in candidates}
    for trial in trials:
        if trial.passed:
            current = answers[trial.candidate]
            answers[trial.candidate] = trial.sparsity if current is None else max(
                current, trial.sparsity)
    return answers
