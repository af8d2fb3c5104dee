"""tools/bench_structured.py in --quick mode on the demo MLP: the table it prints has the
issue's columns, a dense row and one row per level, and the pruned model is smaller."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "bench_structured.py"


def _tool():
    if "bench_structured" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_structured", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["bench_structured"]


def _table(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]


def test_quick_run_prints_the_table(tmp_path, capsys):
    bench = _tool()
    report = tmp_path / "bench.json"
    assert bench.main(["--quick", "--models", "digits", "--levels", "0.25,0.5",
                       "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "2 intra-op threads" in out
    header, rule, *rows = _table(out)
    for column in ("model", "structure", "level", "params ×", "file ×", "MACs ×",
                   "latency × b1", "latency × batched", "accuracy proxy"):
        assert column in header
    assert set(rule) <= {"---", "---:"}
    assert [row[header.index("level")] for row in rows] == ["dense", "25%", "50%"]
    params = [float(row[header.index("params ×")]) for row in rows[1:]]
    files = [float(row[header.index("file ×")]) for row in rows[1:]]
    macs = [float(row[header.index("MACs ×")]) for row in rows[1:]]
    assert all(0 < v < 1 for v in params + files + macs)
    assert params[1] < params[0]  # 50 % removes more than 25 %
    for row in rows[1:]:
        for column in ("latency × b1", "latency × batched"):
            assert float(row[header.index(column)]) > 0
        assert row[header.index("accuracy proxy")].startswith("acc ")
    data = json.loads(report.read_text())
    assert [len(row["latency"]) for row in data["rows"]] == [2, 2, 2]


def test_missing_model_is_skipped_not_a_crash(tmp_path, capsys):
    bench = _tool()
    assert bench.main(["--quick", "--models", "smollm2", "--lm-workdir",
                       str(tmp_path / "nothing-here")]) == 0
    rows = _table(capsys.readouterr().out)[2:]
    assert len(rows) == 1 and "skipped" in rows[0][3]


def test_unknown_model_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        _tool().main(["--models", "no-such-model"])
    assert exc.value.code == 2


def test_a_refused_prune_is_a_row_not_a_crash(capsys):
    # the demo MLP has no attention heads: onnxprune refuses, the table says so
    assert _tool().main(["--quick", "--models", "digits", "--levels", "0.5",
                         "--structure", "heads"]) == 0
    rows = _table(capsys.readouterr().out)[2:]
    assert [row[2] for row in rows] == ["dense", "50%"]
    assert rows[1][3].startswith("failed: NothingToPruneError")


def test_budget_comparison_interpolates_uniform_accuracy_in_latency():
    compare = _tool().budget_comparison
    uniform = [(0.8, 0.90), (0.6, 0.70)]  # (latency ratio, accuracy), any order
    found = compare(0.7, 0.72, 0.83, uniform)
    assert found["uniform_accuracy"] == pytest.approx(0.82)  # 0.70 + 0.20 * 0.12 / 0.2
    assert found["at_least_uniform"] and found["within_budget"]
    assert not found["extrapolated"]
    assert not compare(0.7, 0.72, 0.81, uniform)["at_least_uniform"]
    assert not compare(0.7, 0.74, 0.9, uniform)["within_budget"]  # 0.74 > 1.05 * 0.7
    # perplexity: lower is better; beyond the rows' range, extrapolated from the nearest two
    ppl = [(0.9, 20.0), (0.8, 30.0), (0.6, 60.0)]
    found = compare(0.5, 0.55, 65.0, ppl, higher_is_better=False)
    assert found["extrapolated"] and found["uniform_accuracy"] == pytest.approx(67.5)
    assert found["at_least_uniform"]
    assert compare(0.7, 0.85, 26.0, ppl, False)["uniform_accuracy"] == pytest.approx(25.0)
    assert not compare(0.7, 0.85, 26.0, ppl, False)["at_least_uniform"]
    with pytest.raises(ValueError):
        compare(0.7, 0.7, 1.0, [(0.7, 1.0)])


def test_budget_level_is_parsed_and_labelled():
    bench = _tool()
    args = bench.parse_args(["--levels", "0.7b,0.25"])
    assert args.levels == [(0.7, True), (0.25, False)]
    assert [bench.level_label(*level) for level in args.levels] == ["budget 0.7", "25%"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--levels", "1.5b"])
