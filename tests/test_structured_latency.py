"""--latency-budget: per-group latency tables (regions, widths, cache) and the greedy
allocation over them, checked against an exhaustive search; the CLI end to end.

No test asserts a measured latency: timings on a shared machine are not reproducible."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.graph import GraphIndex
from onnxprune.io import load_model
from onnxprune.structured import latency
from onnxprune.structured.analysis import find_groups
from onnxprune.structured.groups import ChannelGroup, Member, MemberRole, StructureKind
from onnxprune.structured.latency import LatencyTable, measure_tables, region_nodes
from onnxprune.structured.selection import (
    allowed_widths,
    budget_counts,
    normalized,
    predicted_latency,
)

DIGITS = MODELS_DIR / "digits.onnx"
TRANSFORMER = MODELS_DIR / "transformer.onnx"


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "cache"))


def _two_blocks(path: Path) -> Path:
    """x -> MatMul -> Relu -> MatMul -> MatMul -> Relu -> MatMul: two MLP blocks of the
    same shapes (different weights), so their hidden groups have equal regions."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (16, 32)), ("w2", (32, 16)), ("w3", (16, 32)),
                                   ("w4", (32, 16)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
             helper.make_node("MatMul", ["a1", "w2"], ["y1"], name="fc2"),
             helper.make_node("MatMul", ["y1", "w3"], ["h2"], name="fc3"),
             helper.make_node("Relu", ["h2"], ["a2"], name="act2"),
             helper.make_node("MatMul", ["a2", "w4"], ["y"], name="fc4")]
    graph = helper.make_graph(
        nodes, "two_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def _hidden_groups(loaded) -> list[ChannelGroup]:
    groups, _ = find_groups(loaded.proto)
    return [g for g in groups if g.channels == 32]


# ------------------------------------------------------------------ tables


def test_regions_hold_what_the_channels_run_through():
    loaded = load_model(TRANSFORMER)
    flow = GraphIndex(loaded.proto).dataflow
    groups, _ = find_groups(loaded.proto)
    ops = {g.kind: [flow.nodes[i].op_type for i in region_nodes(flow, g)] for g in groups}
    assert ops[StructureKind.HEADS].count("MatMul") == 6  # q, k, v, QK^T, PV, output
    assert "Softmax" in ops[StructureKind.HEADS]
    assert ops[StructureKind.FFN][0] == "MatMul" and ops[StructureKind.FFN][-1] == "MatMul"
    assert "Erf" in ops[StructureKind.FFN] and "Softmax" not in ops[StructureKind.FFN]


def test_tables_have_the_allocations_widths(tmp_path):
    loaded = load_model(DIGITS)
    groups, _ = find_groups(loaded.proto)
    feed = latency.timing_feeds(loaded.proto, None, None)
    tables = measure_tables(loaded, groups, feed, round_to=8,
                            table_file=tmp_path / "tables.json")
    assert set(tables.tables) == {g.name for g in groups} and not tables.untimed
    for group in groups:
        widths = list(tables.tables[group.name].widths)
        assert widths == latency.table_widths(group, 8)
        assert widths[0] == 8 and widths[-1] == group.channels  # one unit .. all
        assert len(widths) == latency.TABLE_STEPS + 1
        assert set(widths) <= set(allowed_widths(group, 8))
    saved = json.loads((tmp_path / "tables.json").read_text())
    assert saved["machine"] == latency.machine(None)
    assert len(saved["tables"]) == len(groups) and len(saved["dense_ms"]) == 1
    assert tables.dense_ms > 0


def test_tables_are_cached_and_reused(tmp_path, monkeypatch):
    path = _two_blocks(tmp_path / "two.onnx")
    loaded = load_model(path)
    groups = _hidden_groups(loaded)
    assert len(groups) == 2
    feed = latency.timing_feeds(loaded.proto, None, None)
    timed: list[str] = []
    runs: list[int] = []
    time_region = latency._time_region
    timed_runs = latency._timed_runs

    def counting_region(loaded, group, *args, **kwargs):
        timed.append(group.name)
        return time_region(loaded, group, *args, **kwargs)

    def counting_runs(sessions, *args, **kwargs):
        runs.append(len(sessions))
        return timed_runs(sessions, *args, **kwargs)

    monkeypatch.setattr(latency, "_time_region", counting_region)
    monkeypatch.setattr(latency, "_timed_runs", counting_runs)
    first = measure_tables(loaded, groups, feed, round_to=8)  # the default cache folder
    assert len(timed) == 1  # two blocks of one structure: timed once
    assert (first.timed, first.reused) == (1, 1)
    assert Path(first.cache).is_file() and Path(first.cache).parent.name == "latency"
    timed.clear()
    runs.clear()
    second = measure_tables(loaded, groups, feed, round_to=8)
    assert timed == [] and runs == []  # nothing timed: tables and dense latency cached
    assert (second.timed, second.reused) == (0, 2)
    for name, table in first.tables.items():
        assert np.array_equal(second.tables[name].ms, table.ms)
    other = latency.timing_feeds(loaded.proto, None, None)  # same shapes: still cached
    measure_tables(loaded, groups, other, round_to=8)
    assert timed == []


def test_tables_of_another_machine_are_measured_again(tmp_path, monkeypatch):
    path = _two_blocks(tmp_path / "two.onnx")
    loaded = load_model(path)
    groups = _hidden_groups(loaded)
    feed = latency.timing_feeds(loaded.proto, None, None)
    file = tmp_path / "tables.json"
    measure_tables(loaded, groups, feed, round_to=8, table_file=file)
    data = json.loads(file.read_text())
    data["machine"]["cpu"] = "another CPU"
    file.write_text(json.dumps(data))
    again = measure_tables(loaded, groups, feed, round_to=8, table_file=file)
    assert again.timed == 1
    assert json.loads(file.read_text())["machine"] == latency.machine(None)


def test_table_interpolates_and_ignores_outliers():
    table = LatencyTable([8, 16, 24, 32], [1.0, 2.0, 3.0, 4.0])
    assert table(12) == pytest.approx(1.5) and table(32) == 4.0 and table(4) == 1.0
    # a spike at one width (a run that waited for a core) is put on the line through the
    # others, and the table never grows when channels are removed
    spiky = LatencyTable([8, 16, 24, 32, 40, 48], [1.0, 2.0, 9.0, 4.0, 5.0, 6.0])
    assert spiky(24) == pytest.approx(3.0)
    noisy = LatencyTable([8, 16, 24, 32], [1.0, 2.5, 2.0, 4.0])
    assert all(a <= b for a, b in itertools.pairwise(noisy.ms))
    assert list(noisy.measured) == [1.0, 2.5, 2.0, 4.0]  # what the file keeps


# ------------------------------------------------------------------ allocation


def _group(name: str, channels: int, block: int = 1) -> ChannelGroup:
    return ChannelGroup(name, StructureKind.FFN, channels,
                        (Member(f"{name}.w", 1, MemberRole.OUTPUT, block=block),))


def _cost(groups, scores, params, counts, normalization="mean") -> float:
    """The naive cost of removing channels: the normalized scores of the lowest-scored
    channels each group removes, shifted as budget_counts shifts them (lowest is 0), times
    the parameters per channel of their group."""
    normal = {g.name: normalized(scores[g.name], normalization) for g in groups}
    lowest = min(float(v.min()) for v in normal.values())
    return sum(params[g.name] * float(np.sort(normal[g.name] - lowest)[
        :g.channels - counts[g.name]].sum()) for g in groups)


def _exhaustive(groups, scores, params, tables, dense, budget, round_to,
                normalization="mean"):
    """The least cost over every combination of allowed widths meeting the budget."""
    best = None
    for widths in itertools.product(*(allowed_widths(g, round_to) for g in groups)):
        counts = {g.name: w for g, w in zip(groups, widths, strict=True)}
        if predicted_latency(groups, tables, dense, counts) <= budget * dense + 1e-9:
            cost = _cost(groups, scores, params, counts, normalization)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("normalization", ["mean", "standard"])
def test_budget_counts_match_exhaustive_search(seed, normalization):
    # every unit of every group saves the same latency: then removing the cheapest units
    # first is optimal, and the greedy must find the exhaustive optimum
    rng = np.random.default_rng(seed)
    groups = [_group(f"g{i}", int(rng.integers(2, 6)) * 8) for i in range(3)]
    scores = {g.name: rng.random(g.channels) for g in groups}
    params = {g.name: float(rng.integers(1, 100)) for g in groups}
    per_unit = 0.5
    tables = {g.name: LatencyTable(allowed_widths(g, 8)[::-1],
                                   [per_unit * w / 8 for w in allowed_widths(g, 8)[::-1]])
              for g in groups}
    dense = 10.0 + sum(tables[g.name](g.channels) for g in groups)
    floor = predicted_latency(groups, tables, dense,
                              {g.name: allowed_widths(g, 8)[-1] for g in groups}) / dense
    budget = float(rng.uniform(floor, 0.98))
    counts = budget_counts(groups, scores, params, tables, dense, budget, 8, normalization)
    best = _exhaustive(groups, scores, params, tables, dense, budget, 8, normalization)
    assert best is not None
    assert predicted_latency(groups, tables, dense, counts) <= budget * dense + 1e-9
    assert _cost(groups, scores, params, counts, normalization) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(20))
def test_budget_counts_properties(seed):
    rng = np.random.default_rng(100 + seed)
    groups = [_group(f"g{i}", int(rng.integers(1, 9)) * 8 + int(rng.integers(0, 8)))
              for i in range(int(rng.integers(1, 5)))]
    scores = {g.name: rng.random(g.channels) * rng.uniform(0.1, 10) for g in groups}
    params = {g.name: float(rng.integers(1, 1000)) for g in groups}
    tables = {}
    for group in groups:  # noisy, not linear, sometimes flat
        widths = sorted({max(8, int(w)) for w in np.linspace(8, group.channels, 5)}
                        | {group.channels})
        ms = np.sort(rng.random(len(widths))) * rng.uniform(0.5, 5)
        tables[group.name] = LatencyTable(widths, ms)
    dense = 1.0 + sum(tables[g.name](g.channels) for g in groups)
    floor = predicted_latency(groups, tables, dense,
                              {g.name: allowed_widths(g, 8)[-1] for g in groups}) / dense
    previous = None
    for budget in sorted(rng.uniform(0.2, 1.0, 6)) + [1.0]:
        counts = budget_counts(groups, scores, params, tables, dense, budget, 8)
        for group in groups:
            assert counts[group.name] in allowed_widths(group, 8)  # >= one unit
        predicted = predicted_latency(groups, tables, dense, counts) / dense
        if budget >= floor + 1e-9:
            assert predicted <= budget + 1e-9  # met whenever it can be
        if previous is not None:  # more budget never removes more
            assert all(counts[g.name] >= previous[g.name] for g in groups)
        previous = counts
    assert all(previous[g.name] == g.channels for g in groups)  # budget 1: nothing removed


def _error_costs(groups, slopes, limits=None):
    """Convex predicted errors: slope × share², infinite past a group's limit share."""
    limits = limits or {}

    def cost_of(group, slope):
        def cost(kept: int) -> float:
            share = (group.channels - kept) / group.channels
            return np.inf if share > limits.get(group.name, 1.0) + 1e-9 else slope * share ** 2
        return cost

    return {g.name: cost_of(g, slopes[g.name]) for g in groups}


@pytest.mark.parametrize("seed", range(12))
def test_budget_counts_with_error_costs_match_exhaustive_search(seed):
    # convex errors and equal savings per unit: the greedy on error per saving is optimal
    rng = np.random.default_rng(300 + seed)
    groups = [_group(f"g{i}", int(rng.integers(2, 6)) * 8) for i in range(3)]
    slopes = {g.name: float(rng.uniform(0.1, 10)) for g in groups}
    costs = _error_costs(groups, slopes)
    tables = {g.name: LatencyTable(allowed_widths(g, 8)[::-1],
                                   [0.5 * w / 8 for w in allowed_widths(g, 8)[::-1]])
              for g in groups}
    dense = 10.0 + sum(tables[g.name](g.channels) for g in groups)
    floor = predicted_latency(groups, tables, dense,
                              {g.name: allowed_widths(g, 8)[-1] for g in groups}) / dense
    budget = float(rng.uniform(floor, 0.98))
    scores = {g.name: rng.random(g.channels) for g in groups}  # not used with costs
    params = {g.name: 1.0 for g in groups}
    counts = budget_counts(groups, scores, params, tables, dense, budget, 8, costs=costs)
    assert predicted_latency(groups, tables, dense, counts) <= budget * dense + 1e-9
    best = min(sum(costs[g.name](w) for g, w in zip(groups, widths, strict=True))
               for widths in itertools.product(*(allowed_widths(g, 8) for g in groups))
               if predicted_latency(groups, tables, dense,
                                    dict(zip([g.name for g in groups], widths, strict=True)))
               <= budget * dense + 1e-9)
    assert sum(costs[g.name](counts[g.name]) for g in groups) == pytest.approx(best)


def test_budget_counts_never_pass_a_groups_swept_shares():
    groups = [_group("a", 32), _group("b", 32)]
    costs = _error_costs(groups, {"a": 0.01, "b": 100.0}, limits={"a": 0.5})
    tables = {g.name: LatencyTable([8, 16, 24, 32], [1.0, 2.0, 3.0, 4.0]) for g in groups}
    scores = {g.name: np.arange(32.0) for g in groups}
    counts = budget_counts(groups, scores, {"a": 1.0, "b": 1.0}, tables, 10.0, 0.6, 8,
                           costs=costs)
    assert counts["a"] == 16  # the cheap group stops at its last swept share
    assert counts["b"] < 32  # the rest of the budget comes from the dear one


def test_budget_counts_skip_groups_without_table():
    groups = [_group("a", 32), _group("b", 32)]
    scores = {"a": np.arange(32.0), "b": np.arange(32.0)}
    tables = {"a": LatencyTable([8, 32], [1.0, 4.0])}
    counts = budget_counts(groups, scores, {"a": 1.0, "b": 1.0}, tables, 10.0, 0.8, 8)
    assert counts["b"] == 32 and counts["a"] < 32


# ------------------------------------------------------------------ configuration and CLI


@pytest.mark.parametrize("settings", [
    dict(structure="channels", latency_budget=0.0),
    dict(structure="channels", latency_budget=1.5),
    dict(structure="channels", latency_budget=0.7, sparsity=0.3),
    dict(latency_budget=0.7),
    dict(structure="channels", latency_table="t.json"),
    dict(structure="channels", latency_budget=0.7, latency_threads=0),
])
def test_config_refuses(settings):
    with pytest.raises(ConfigError):
        PruneConfig(**settings)


@pytest.mark.parametrize("extra", [["--latency-budget", "0"], ["--latency-budget", "1.2"],
                                   ["--latency-budget", "x"],
                                   ["--latency-budget", "0.7", "--sparsity", "0.3"]])
def test_cli_refuses_bad_budget(tmp_path, capsys, extra):
    out = tmp_path / "out.onnx"
    try:  # argparse exits on a value it refuses; the config refuses the rest
        code = main(["prune", str(DIGITS), "-o", str(out), "--structure", "channels", *extra])
    except SystemExit as exit:
        code = exit.code
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "latency-budget" in error[0]
    assert not out.exists()


def test_cli_prunes_to_a_latency_budget(tmp_path, capsys):
    out, report, table = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "t.json"
    code = main(["prune", str(TRANSFORMER), "-o", str(out), "--structure", "ffn,heads",
                 "--latency-budget", "0.8", "--latency-table", str(table),
                 "--dim", "seq=32", "--report", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "latency budget 0.8 x dense: predicted" in printed and "measured" in printed
    data = json.loads(report.read_text())
    found = data["structured"]["latency"]
    assert found["budget"] == 0.8 and found["input_shapes"]["input_ids"] == [1, 32]
    for key in ("predicted_ratio", "measured_ratio", "measured_fastest_ratio",
                "table_seconds", "dense_ms"):
        assert found[key] > 0
    assert found["table_file"] == str(table) and table.is_file()
    assert "calibration" in found and found["calibration"]["trial_measured_ratio"] > 0
    assert data["config"]["latency_budget"] == 0.8 and data["config"]["sparsity"] is None
    onnx.checker.check_model(str(out), full_check=True)
    # the same run again reads every table from the file
    code = main(["prune", str(TRANSFORMER), "-o", str(out), "--structure", "ffn,heads",
                 "--latency-budget", "0.8", "--latency-table", str(table),
                 "--dim", "seq=32", "--report", str(report), "--no-latency-calibration"])
    assert code == 0
    again = json.loads(report.read_text())["structured"]["latency"]
    assert again["regions_timed"] == 0 and again["tables_reused"] == 2
    assert "calibration" not in again
