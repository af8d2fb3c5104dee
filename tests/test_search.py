"""`onnxprune search`: bisection that any worker count follows the same way, the answer an
exhaustive grid gives, tables and plot, --eval-cmd, Ctrl-C, shared calibration."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS_DIR
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxprune
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.search import Constraint, search
from onnxprune.search.bisection import Bisection
from onnxprune.search.space import SearchSpace, load_space
from onnxprune.search.table import pareto_front
from onnxprune.validate import compare_models

DIGITS = MODELS_DIR / "digits.onnx"
DATA = MODELS_DIR / "digits-test.npz"
LABELS = MODELS_DIR / "digits-test-labels.npy"


def _run_bisection(levels: int, passes, workers: int) -> tuple[int | None, int]:
    """Drive a bisection with `workers` probes at a time; (answer, probes)."""
    bisection, probes = Bisection(list(range(levels))), 0
    while not bisection.done:
        for index in bisection.wanted(workers):
            bisection.record(index, passes(index))
            probes += 1
    return bisection.answer, probes


@given(st.integers(1, 60), st.data())
@settings(max_examples=200, deadline=None)
def test_bisection_finds_the_threshold_of_a_monotone_check(levels, data) -> None:
    threshold = data.draw(st.integers(-1, levels - 1))
    workers = data.draw(st.integers(1, 9))
    answer, probes = _run_bisection(levels, lambda i: i <= threshold, workers)
    assert answer == (threshold if threshold >= 0 else None)
    if workers == 1:
        assert probes <= max(1, (levels + 1).bit_length())


@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(2, 9))
@settings(max_examples=200, deadline=None)
def test_bisection_answer_does_not_depend_on_the_workers(verdicts, workers) -> None:
    """Even for a check that is not monotone, speculation never changes the path."""
    serial, _ = _run_bisection(len(verdicts), verdicts.__getitem__, 1)
    parallel, _ = _run_bisection(len(verdicts), verdicts.__getitem__, workers)
    assert parallel == serial


def test_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [(0.5, 0.99), (0.7, 0.98), (0.6, 0.97), (0.8, 0.90), (0.8, 0.95), (0.4, 0.99)]
    assert pareto_front(points) == [(0.5, 0.99), (0.7, 0.98), (0.8, 0.95)]


def test_search_returns_the_level_an_exhaustive_grid_finds(tmp_path) -> None:
    """On the trained demo model with a top-1 constraint, the bisection's answer is the
    highest level of the same grid at which the pruned model passes (checked here level by
    level, with the public API), and the written model is that prune."""
    space = SearchSpace({}, {}, (0.5, 0.95), 0.01)
    constraint = Constraint(min_top1=0.97)
    result = search(DIGITS, tmp_path / "best.onnx", space=space, base=PruneConfig(),
                    constraint=constraint, data=str(DATA), workers=1)
    feeds = [{"pixels": np.load(DATA)["pixels"]}]
    passing = []
    for level in space.levels():
        model, _ = onnxprune.prune(DIGITS, sparsity=level)
        if compare_models(str(DIGITS), model, feeds, min_top1=0.97).passed:
            passing.append(level)
    assert passing and result.answers[0] == max(passing)
    assert result.best is not None and result.best.sparsity == max(passing)
    assert len(result.trials) <= 7  # a bisection of 46 levels, not the grid
    expected, _ = onnxprune.prune(DIGITS, sparsity=max(passing))
    written = onnxprune.inspect(tmp_path / "best.onnx")
    assert written.summary.zeros == onnxprune.inspect(expected).summary.zeros


def test_parallel_workers_write_the_same_model_and_table_answers(tmp_path) -> None:
    space = SearchSpace({"method": ["magnitude", "wanda"]}, {}, (0.5, 0.95), 0.01)
    common = dict(space=space, base=PruneConfig(calib=str(DATA), calib_samples=200),
                  constraint=Constraint(min_top1=0.97), data=str(DATA))
    serial = search(DIGITS, tmp_path / "a.onnx", workers=1, **common)
    parallel = search(DIGITS, tmp_path / "b.onnx", workers=2, **common)
    assert serial.answers == parallel.answers
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_the_trial_table_and_pareto_plot_are_written(tmp_path) -> None:
    out = tmp_path / "best.onnx"
    assert main(["search", str(DIGITS), "-o", str(out), "--data", str(DATA), "--min-top1",
                 "0.97", "--method", "magnitude", "--pattern", "unstructured,2:4",
                 "--workers", "1", "-q"]) == 0
    rows = list(csv.DictReader((tmp_path / "best.search.csv").open()))
    document = json.loads((tmp_path / "best.search.json").read_text())
    assert len(rows) == len(document["trials"]) >= 2
    assert {json.loads(r["settings"])["pattern"] for r in rows} == {"unstructured", "2:4"}
    assert all(r["passed"] in ("True", "False") and r["top1_agreement"] for r in rows)
    assert document["best"]["passed"] and document["best"]["sparsity"] >= 0.5
    assert (tmp_path / "best.search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert onnxprune.inspect(out).summary.sparsity == pytest.approx(
        document["best"]["achieved"], abs=1e-6)


def _accuracy_script(tmp_path: Path) -> str:
    script = tmp_path / "accuracy.py"
    script.write_text(
        "import sys, numpy as np, onnxruntime as ort\n"
        f"x = np.load({str(DATA)!r})['pixels']; y = np.load({str(LABELS)!r})\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "print('evaluating'); print((s.run(None, {'pixels': x})[0].argmax(1) == y).mean())\n")
    return f"{sys.executable} {script} {{model}}"


def test_an_eval_command_bounds_the_search(tmp_path) -> None:
    """The user's own accuracy script (last line: a number) is the constraint."""
    command = _accuracy_script(tmp_path)
    space = SearchSpace({}, {}, (0.5, 0.95), 0.05)
    result = search(DIGITS, tmp_path / "best.onnx", space=space, base=PruneConfig(),
                    constraint=Constraint(eval_cmd=command, minimum=0.95), workers=1)
    assert result.best is not None
    assert result.best.metrics["value"] >= 0.95
    failing = [t for t in result.trials if not t.passed]
    assert failing and all(t.metrics["value"] < 0.95 for t in failing)


def test_an_eval_command_the_dense_model_fails_is_refused(tmp_path, capsys) -> None:
    command = _accuracy_script(tmp_path)
    assert main(["search", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--eval-cmd",
                 command, "--min", "0.999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the dense model itself fails the constraint" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_a_command_that_prints_no_number_makes_failed_trials(tmp_path) -> None:
    space = SearchSpace({}, {}, (0.5, 0.6), 0.05)
    script = tmp_path / "odd.py"
    script.write_text("import sys\nprint('ok' if 'trial' in sys.argv[1] else 1.0)\n")
    result = search(DIGITS, tmp_path / "best.onnx", space=space, base=PruneConfig(),
                    constraint=Constraint(eval_cmd=f"{sys.executable} {script} {{model}}",
                                          minimum=0.5), workers=1)
    assert result.best is None and result.trials
    assert all("last line is not a number: 'ok'" in t.error for t in result.trials)
    assert not (tmp_path / "best.onnx").exists()


@pytest.mark.parametrize(("args", "words"), [
    ([], "search needs a constraint"),
    (["--eval-cmd", "true {model}"], "--eval-cmd needs --min or --max"),
    (["--eval-cmd", "true", "--min", "1"], "must contain {model}"),
    (["--min-top1", "0.9", "--min", "1"], "--min/--max apply to --eval-cmd only"),
    (["--min-top1", "0.9", "--sparsity-range", "0.9,0.5"], "sparsity range"),
    # refused before any worker starts, not as failed trials
    (["--min-top1", "0.9", "--data", "missing.npz", "--workers", "2"], "no such file"),
    (["--min-top1", "0.9", "--method", "magnitude,bogus", "--workers", "2"],
     "unknown method 'bogus'"),
])
def test_bad_search_options_are_one_line_errors(tmp_path, capsys, args, words) -> None:
    assert main(["search", str(DIGITS), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


def test_ctrl_c_keeps_the_finished_trials_and_writes_the_best_so_far(tmp_path) -> None:
    seen = []

    def interrupt_after_three(trial, candidate) -> None:
        seen.append(trial)
        if len(seen) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "best.onnx"
    result = search(DIGITS, out, space=SearchSpace({}, {}, (0.05, 0.95), 0.01),
                    base=PruneConfig(), constraint=Constraint(min_top1=0.97),
                    data=str(DATA), workers=1, on_trial=interrupt_after_three)
    assert result.interrupted and len(result.trials) == 3
    best = max((t for t in result.trials if t.passed), key=lambda t: t.sparsity)
    assert result.best is best and out.exists()
    document = json.loads((tmp_path / "best.search.json").read_text())
    assert document["interrupted"] is True and len(document["trials"]) == 3


def test_one_pass_statistics_are_captured_once_for_every_trial(tmp_path, monkeypatch) -> None:
    from onnxprune.calib import capture

    made = []
    original = capture.ActivationCapture.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(capture.ActivationCapture, "__init__", counting)
    result = search(DIGITS, tmp_path / "best.onnx",
                    space=SearchSpace({"method": ["wanda"]}, {}, (0.5, 0.95), 0.01),
                    base=PruneConfig(calib=str(DATA), calib_samples=100),
                    constraint=Constraint(min_top1=0.97), data=str(DATA), workers=1)
    assert len(result.trials) >= 5
    assert len(made) == 1  # before the first trial, in the search process


def test_a_search_file_gives_choices_and_base_options(tmp_path) -> None:
    path = tmp_path / "space.toml"
    path.write_text('[space]\nmethod = ["magnitude", "random"]\nsparsity = [0.4, 0.9]\n'
                    'resolution = 0.05\n[base]\nmin_size = 100\n')
    space = load_space(path)
    assert [c.settings for c in space.candidates()] == [{"method": "magnitude"},
                                                         {"method": "random"}]
    assert space.levels()[0] == 0.4 and space.levels()[-1] == 0.9 and len(space.levels()) == 11
    assert main(["search", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--space", str(path),
                 "--data", str(DATA), "--min-top1", "0.97", "--workers", "1", "-q"]) == 0
    document = json.loads((tmp_path / "o.search.json").read_text())
    assert document["best"]["settings"] == {"method": "magnitude"}
    report = onnxprune.inspect(tmp_path / "o.onnx", config=PruneConfig(min_size=100))
    zeros = {t.name: t.zeros for t in report.targets}
    assert zeros["W3"] > 0  # 1,280 weights: pruned because [base] says min_size = 100
    with pytest.raises(ConfigError, match="unknown table"):
        (tmp_path / "bad.toml").write_text("[spaces]\n")
        load_space(tmp_path / "bad.toml")


def test_the_optuna_searcher_is_reproducible_and_keeps_to_its_budget(tmp_path) -> None:
    pytest.importorskip("optuna")
    space = SearchSpace({"method": ["magnitude", "wanda"]}, {}, (0.3, 0.95), 0.01)
    runs = [search(DIGITS, tmp_path / f"{n}.onnx", space=space,
                   base=PruneConfig(calib=str(DATA), calib_samples=100),
                   constraint=Constraint(min_top1=0.97), data=str(DATA), workers=1,
                   max_trials=12, searcher="optuna") for n in (1, 2)]
    first, second = ([(t.candidate, t.sparsity, t.passed) for t in r.trials] for r in runs)
    assert first == second and len(first) == 12
    best = runs[0].best
    assert best is not None and best.passed
    assert best.sparsity == max(t.sparsity for t in runs[0].trials if t.passed)


def test_a_moved_calibration_cache_finds_its_statistics_under_the_new_path(tmp_path) -> None:
    """A remote worker reads the calibration file from its own copy: the statistics the
    search captured are found there, not captured again."""
    from onnxprune.calib.cache import CalibrationCache
    from onnxprune.io import load_model
    from onnxprune.pipeline import gather_statistics

    copy = tmp_path / "copy.npz"
    copy.write_bytes(DATA.read_bytes())
    config = PruneConfig(method="wanda", calib=str(DATA), calib_samples=50)
    cache = CalibrationCache()
    loaded = load_model(DIGITS)
    assert gather_statistics(loaded, config, cache) == 2
    moved = cache.moved(str(DATA), str(copy))
    assert gather_statistics(loaded, config.replace(calib=str(copy)), moved) == 0
    assert gather_statistics(loaded, config.replace(calib=str(copy)), cache) == 2


def test_the_size_objective_picks_the_smallest_passing_file(tmp_path) -> None:
    space = SearchSpace({"pattern": ["unstructured", "2:4"]}, {}, (0.5, 0.95), 0.01)
    result = search(DIGITS, tmp_path / "best.onnx", space=space,
                    base=PruneConfig(format="compact"), constraint=Constraint(min_top1=0.97),
                    data=str(DATA), workers=1, objective="size")
    answers = [t for t in result.trials if t.passed and t.sparsity == result.answers[t.candidate]]
    assert len(answers) == 2
    assert result.best is min(answers, key=lambda t: t.file_bytes)
    assert (tmp_path / "best.onnx").stat().st_size == result.best.file_bytes


def test_the_latency_objective_measures_every_trial(tmp_path) -> None:
    space = SearchSpace({}, {}, (0.5, 0.9), 0.1)
    result = search(DIGITS, tmp_path / "best.onnx", space=space, base=PruneConfig(),
                    constraint=Constraint(min_top1=0.97), data=str(DATA), workers=1,
                    objective="latency")
    assert result.trials and all(t.latency_ms is not None and t.latency_ms > 0
                                 for t in result.trials)
    assert result.best is not None and result.best.passed


def test_recipe_overrides_are_a_search_dimension(tmp_path) -> None:
    path = tmp_path / "space.toml"
    path.write_text('[space]\noverrides = [[], [{match = "W1", sparsity = 0.3}]]\n'
                    'sparsity = [0.5, 0.95]\nresolution = 0.05\n')
    result = search(DIGITS, tmp_path / "best.onnx", space=load_space(path),
                    base=PruneConfig(), constraint=Constraint(min_top1=0.97), data=str(DATA),
                    workers=1)
    overridden = [t for t in result.trials if t.candidate == 1 and t.error is None]
    assert overridden
    # W1 keeps 30 % whatever the level: what the trial reached is below what it asked
    assert all(t.achieved < t.sparsity for t in overridden if t.sparsity > 0.5)
    assert result.best is not None
    assert result.best.achieved == max(t.achieved for t in result.trials
                                       if t.passed and t.sparsity == result.answers[t.candidate])


def test_a_cached_run_prunes_as_an_uncached_one_with_per_target_overrides(tmp_path) -> None:
    """Statistics kept across runs are used only where the run would capture the dense
    model too: with an override that prunes one target by magnitude first, the later
    targets' statistics differ, and the cache must not serve them."""
    from onnxprune.calib.cache import CalibrationCache
    from onnxprune.recipe import Override

    config = PruneConfig(method="wanda", calib=str(DATA), calib_samples=50, min_size=100,
                         overrides=(Override(match="W1", method="magnitude"),))
    cache = CalibrationCache()
    onnxprune.prune(DIGITS, sparsity=0.6, config=config.replace(overrides=()),
                    calibration=cache)  # fills the cache with the dense statistics
    cached, _ = onnxprune.prune(DIGITS, config=config, calibration=cache)
    plain, _ = onnxprune.prune(DIGITS, config=config)
    weights = {t.name: t for t in plain.graph.initializer}
    from onnx import numpy_helper
    for tensor in cached.graph.initializer:
        assert np.array_equal(numpy_helper.to_array(tensor),
                              numpy_helper.to_array(weights[tensor.name])), tensor.name


def test_a_single_n_m_pattern_is_one_trial_at_its_sparsity(tmp_path) -> None:
    result = search(DIGITS, tmp_path / "best.onnx", space=SearchSpace(),
                    base=PruneConfig(pattern="2:4"), constraint=Constraint(min_top1=0.9),
                    data=str(DATA), workers=1)
    assert [t.sparsity for t in result.trials] == [0.5]
    assert result.best is not None and result.best.achieved == pytest.approx(0.5)


def test_a_worker_that_dies_fails_its_trial_and_the_search_goes_on(tmp_path) -> None:
    """A trial whose worker is killed (for memory, say) is a failed trial; the pool starts
    again and the search still writes its answer and tables."""
    script = tmp_path / "check.py"
    script.write_text(  # kills the worker process above it (above the shell, if any)
        "import os, sys\n"
        "if sys.argv[1].endswith('trial-1.onnx'):\n"
        "    pid = os.getppid()\n"
        "    while pid > 1 and b'spawn_main' not in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
        "        pid = int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "    os.kill(pid, 9)\n"
        "print(1.0)\n")
    space = SearchSpace({}, {}, (0.5, 0.9), 0.1)
    result = search(DIGITS, tmp_path / "best.onnx", space=space, base=PruneConfig(),
                    constraint=Constraint(eval_cmd=f"{sys.executable} {script} {{model}}",
                                          minimum=0.5), workers=2)
    died = [t for t in result.trials if t.error and "worker process died" in t.error]
    assert died and result.best is not None
    assert (tmp_path / "best.search.csv").exists()


def test_sensitivity_in_workers_sweeps_the_targets_of_a_compact_model(tmp_path) -> None:
    """Workers densify before they sweep; so does the split of the targets among them."""
    from onnxprune.formats import densify_model
    from onnxprune.io import load_model
    from onnxprune.search.distributed import sweep_in_workers
    from onnxprune.sensitivity_sweep import analyze

    compact = tmp_path / "mlp-compact.onnx"
    onnxprune.prune(MODELS_DIR / "mlp.onnx", compact, sparsity=0.5, format="compact")
    config = PruneConfig(min_size=1000)
    loaded = load_model(compact)
    densify_model(loaded.proto, loaded.base_dir)
    serial = analyze(loaded, config, levels=[0.6, 0.9])
    spread = sweep_in_workers(str(compact), config, [0.6, 0.9], workers=2, ray_address=None)
    assert len(serial.targets) == 3
    assert spread.to_dict() == serial.to_dict()
