"""What users see: the per-target table after prune, provenance in metadata_props, progress
bars, and validate --timing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import validate
from onnxprune.cli import main
from onnxprune.progress import progress_bar, shows_progress
from onnxprune.provenance import KEYS, PREFIX, read_provenance, sparsity_digest
from onnxprune.report import Report, Summary, TargetReport, format_prune_table

MLP = MODELS_DIR / "mlp.onnx"
CHAIN_LENGTH = 24  # more than 2 x 10 targets: the default table leaves the middle out


def _chain_model(path: Path, count: int = CHAIN_LENGTH, size: int = 64) -> Path:
    """MatMuls in a row; layer i's weights are scaled by i + 1, so that one global threshold
    prunes the early layers most."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    previous = "x"
    for i in range(count):
        name = f"layer{i:02d}.weight"
        values = (rng.standard_normal((size, size)) * (i + 1)).astype(np.float32)
        weights.append(numpy_helper.from_array(values, name))
        output = "y" if i == count - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", ["x" if i == 0 else previous, name], [output]))
        previous = output
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _row_names(text: str) -> list[str]:
    """Target names of the table rows, in printed order."""
    return [line.split()[0] for line in text.splitlines() if line.startswith("layer")]


@pytest.fixture
def chain(tmp_path) -> Path:
    return _chain_model(tmp_path / "chain.onnx")


def _prune_chain(chain: Path, tmp_path: Path, capsys, *extra: str) -> tuple[str, dict]:
    report_path = tmp_path / "report.json"
    status = main(["prune", str(chain), "-o", str(tmp_path / "out.onnx"), "--sparsity", "0.5",
                   "--scope", "global", "--report", str(report_path), *extra])
    assert status == 0
    return capsys.readouterr().out, json.loads(report_path.read_text())


def test_default_table_shows_the_10_most_and_10_least_pruned_then_totals(chain, tmp_path,
                                                                          capsys):
    out, report = _prune_chain(chain, tmp_path, capsys)
    ranked = sorted(report["targets"], key=lambda t: -t["sparsity"])
    sparsities = [t["sparsity"] for t in ranked]
    assert len(set(sparsities)) == CHAIN_LENGTH  # the model makes every target distinct
    assert _row_names(out) == [t["name"] for t in ranked[:10] + ranked[-10:]]
    assert f"... {CHAIN_LENGTH - 20} more targets (all of them with -v)" in out
    lines = out.splitlines()
    for target in ranked[:10] + ranked[-10:]:
        row = next(line for line in lines if line.startswith(target["name"] + " "))
        assert f"{target['requested_sparsity']:.2%} -> {target['sparsity']:.2%}" in row
        assert "64x64" in row and "unstructured" in row and "dense" in row
        assert "16.0 KiB" in row  # 64 x 64 float32, stored dense
    total = next(line for line in lines if line.startswith("total"))
    assert f"total ({CHAIN_LENGTH} targets)" in total
    assert f"50.00% -> {report['summary']['sparsity']:.2%}" in total
    assert lines.index(total) < lines.index(next(line for line in lines
                                                if line.startswith("params")))
    assert "error" not in lines[0]  # no reconstruction error was measured
    assert "metadata_props" not in out


def test_verbose_table_shows_every_target_in_model_order(chain, tmp_path, capsys):
    out, report = _prune_chain(chain, tmp_path, capsys, "-v")
    assert _row_names(out) == [t["name"] for t in report["targets"]]
    assert "more targets" not in out
    assert f"{PREFIX}sparsity_digest = sha256:" in out  # -v also shows the provenance


def _target(name: str, sparsity: float, **fields) -> TargetReport:
    numel = 1000
    values = dict(name=name, op_type="MatMul", shape=[10, 100], dtype="float32", axis=0,
                  numel=numel, zeros=round(sparsity * numel), sparsity=sparsity,
                  pattern="unstructured", format="dense", source="initializer", bytes=4000,
                  is_2_4=False, requested_sparsity=0.5, set_by="uniform", meets_plan=True)
    values.update(fields)
    return TargetReport(**values)


def _report(targets: list[TargetReport]) -> Report:
    params = sum(t.numel for t in targets)
    zeros = sum(t.zeros for t in targets)
    return Report("m.onnx", targets, [], Summary(params, zeros, zeros / params, 0, 0),
                  config={"method": "magnitude"})


def test_table_columns_appear_when_they_say_something():
    plain = format_prune_table(_report([_target("a", 0.5), _target("b", 0.5)]))
    header = plain.splitlines()[0].split()
    assert "error" not in header and "method" not in header and "set" not in header
    mixed = format_prune_table(_report([
        _target("a", 0.5, reconstruction_error=0.0123, method="wanda", set_by="owl"),
        _target("b", 0.5, method="magnitude", set_by="override 1", note="no tokens")]))
    lines = mixed.splitlines()
    assert lines[0].split()[-4:] == ["error", "method", "set", "by"]
    assert lines[2].split()[-3:] == ["0.0123", "wanda", "owl"]
    assert lines[3].split()[-4:] == ["-", "magnitude", "override", "1"]
    assert "1 target(s) fell back to magnitude" in mixed


def test_table_marks_a_target_that_misses_its_plan():
    text = format_prune_table(_report([_target("a", 0.5), _target("b", 0.4, meets_plan=False)]))
    row_b = next(line for line in text.splitlines() if line.startswith("b "))
    assert "50.00% -> 40.00% !" in row_b
    assert "! 1 target(s) miss their planned pattern or count" in text
    assert "!" not in next(line for line in text.splitlines() if line.startswith("a "))


# ----------------------------------------------------------------------------- provenance

def _digest_of_weights(path: Path, names: list[str]) -> str:
    model = onnx.load(path)
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return sparsity_digest((name, int(arrays[name].size - np.count_nonzero(arrays[name])),
                            int(arrays[name].size)) for name in names)


def test_output_metadata_records_the_run_and_a_digest_of_the_weights(tmp_path):
    output = tmp_path / "out.onnx"
    _, report = onnxprune.prune(MLP, output, sparsity=0.6, method="random", seed=3)
    meta = read_provenance(onnx.load(output))
    assert meta[PREFIX + "version"] == onnxprune.__version__
    assert meta[PREFIX + "method"] == "random"
    assert meta[PREFIX + "pattern"] == "unstructured"
    assert meta[PREFIX + "allocation"] == "uniform"
    assert meta[PREFIX + "targets"] == str(len(report.targets))
    names = [t.name for t in report.targets]
    assert meta[PREFIX + "sparsity_digest"] == _digest_of_weights(output, names)
    assert report.provenance == meta
    assert set(meta) <= set(KEYS)


def test_compact_output_keeps_the_storage_key_beside_the_provenance(tmp_path):
    output = tmp_path / "out.onnx"
    onnxprune.prune(MLP, output, pattern="2:4", format="compact")
    again, _ = onnxprune.prune(onnx.load(output), sparsity=0.6, format="compact")
    for model in (onnx.load(output), again):
        meta = read_provenance(model)
        assert meta[PREFIX + "storage"] == "compact"
        assert meta[PREFIX + "format"] == "compact"
    assert read_provenance(again)[PREFIX + "sparsity"] == "0.6"


def test_digest_changes_with_the_sparsities_and_a_reprune_replaces_our_keys(tmp_path):
    source = onnx.load(MLP)
    source.metadata_props.add(key="author", value="someone")
    first_path = tmp_path / "first.onnx"
    onnxprune.prune(source, first_path, sparsity=0.5)
    first = onnx.load(first_path)
    second, _ = onnxprune.prune(first, pattern="2:4")  # in memory, no output file
    keys = [p.key for p in second.metadata_props]
    assert len(keys) == len(set(keys))
    assert keys.count("author") == 1  # other tools' keys are kept
    meta_first, meta_second = read_provenance(first), read_provenance(second)
    assert meta_second[PREFIX + "pattern"] == "2:4"
    assert meta_first[PREFIX + "pattern"] == "unstructured"
    assert meta_first[PREFIX + "sparsity_digest"] != meta_second[PREFIX + "sparsity_digest"]
    same_again, _ = onnxprune.prune(MLP, sparsity=0.5)
    assert read_provenance(same_again)[PREFIX + "sparsity_digest"] == \
        meta_first[PREFIX + "sparsity_digest"]


def test_inspect_tells_whether_the_weights_still_match_the_digest(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    _, report = onnxprune.prune(MLP, output, sparsity=0.5)
    assert main(["inspect", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("pruned by onnxprune " + onnxprune.__version__ + ": magnitude, "
                        "unstructured, uniform allocation, sparsity 0.500000")
    assert lines[2] == "  sparsity digest: the targets still have these sparsities"
    model = onnx.load(output)
    weight = next(t for t in model.graph.initializer if t.name == report.targets[0].name)
    values = numpy_helper.to_array(weight).copy()
    values[values == 0] = 1.0  # "retrained" without the mask
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, output)
    assert main(["inspect", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"][PREFIX + "method"] == "magnitude"
    assert main(["inspect", str(output)]) == 0
    assert "sparsity digest: does NOT match" in capsys.readouterr().out
    assert main(["inspect", str(MLP)]) == 0
    assert "pruned by" not in capsys.readouterr().out


def test_sparsity_digest_is_order_free_and_sensitive_to_every_count():
    base = [("a", 1, 10), ("b", 2, 10)]
    assert sparsity_digest(base) == sparsity_digest(reversed(base))
    assert sparsity_digest(base) != sparsity_digest([("a", 1, 10), ("b", 3, 10)])
    assert sparsity_digest(base) != sparsity_digest([("a", 1, 10), ("c", 2, 10)])


# ------------------------------------------------------------------------------- progress

class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal_and_with_quiet():
    for stream, quiet in ((io.StringIO(), False), (_FakeTerminal(), True)):
        assert not shows_progress(quiet, stream)
        with progress_bar("prune", total=3, quiet=quiet, stream=stream) as bar:
            for name in ("a", "b", "c"):
                bar.advance(item=name)
        assert not bar.shown
        assert stream.getvalue() == ""


def test_progress_shows_on_a_terminal_and_nests():
    stream = _FakeTerminal()
    assert shows_progress(False, stream)
    with progress_bar("rounds", total=2, unit="round", stream=stream,
                      mininterval=0) as rounds:
        for _ in range(2):
            with progress_bar("prune", total=2, stream=stream, mininterval=0) as targets:
                callback = targets.callback()
                for name in ("fc1.weight", "fc2.weight"):
                    callback(type("Target", (), {"name": name})())
            rounds.advance()
    text = stream.getvalue()
    assert rounds.shown and targets.shown
    assert "rounds" in text and "prune" in text
    assert "2/2" in text and "fc2.weight" in text


def test_cli_prune_writes_no_progress_when_stderr_is_not_a_terminal(tmp_path, capsys):
    assert main(["prune", str(MLP), "-o", str(tmp_path / "out.onnx")]) == 0
    err = capsys.readouterr().err
    assert "target" not in err and "\r" not in err


def test_cli_prune_progress_on_a_terminal_unless_quiet(tmp_path, monkeypatch, capsys):
    for quiet in (True, False):
        terminal = _FakeTerminal()
        monkeypatch.setattr("sys.stderr", terminal)
        options = ["-q"] if quiet else []
        assert main(["prune", str(MLP), "-o", str(tmp_path / "out.onnx"), *options]) == 0
        assert ("prune:" in terminal.getvalue()) is not quiet
        assert "prune:" not in capsys.readouterr().out  # bars never go to stdout


# --------------------------------------------------------------------------------- timing

def _pruned_mlp(tmp_path: Path) -> Path:
    output = tmp_path / "pruned.onnx"
    onnxprune.prune(MLP, output, pattern="2:4", format="compact")
    return output


def test_validate_timing_text(tmp_path, capsys):
    candidate = _pruned_mlp(tmp_path)
    assert main(["validate", str(MLP), str(candidate), "--timing", "--timing-runs", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("timing"))
    assert "latency median of 5 runs" in lines[title]
    for name, line in zip(("reference", "candidate"), lines[title + 2:title + 4], strict=True):
        cells = line.split()
        assert cells[0] == name
        figures = [float(value) for value, unit in zip(cells[1::2], cells[2::2], strict=True)
                   if unit == "ms"]
        assert len(figures) == 3 and all(f > 0 for f in figures)
    assert lines[title + 4].startswith("candidate/reference")


def test_validate_timing_json(tmp_path, capsys):
    candidate = _pruned_mlp(tmp_path)
    assert main(["validate", str(MLP), str(candidate), "--json", "--timing",
                 "--timing-runs", "4"]) == 0
    timing = json.loads(capsys.readouterr().out)["timing"]
    assert timing["runs"] == 4
    for name in ("reference", "candidate"):
        figures = timing[name]
        assert len(figures["session_samples"]) == validate.SESSION_REPEATS
        assert figures["session_seconds"] == np.median(figures["session_samples"])
        assert 0 < figures["latency_min_seconds"] <= figures["latency_seconds"]
    assert timing["latency_ratio"] == pytest.approx(
        timing["candidate"]["latency_seconds"] / timing["reference"]["latency_seconds"])


def test_validate_without_timing_has_no_timing(tmp_path, capsys):
    assert main(["validate", str(MLP), str(MLP), "--json"]) == 0
    assert "timing" not in json.loads(capsys.readouterr().out)


def test_timing_runs_interleave_the_models(monkeypatch):
    reference = validate.make_session(MLP)
    candidate = validate.make_session(MLP)
    order = []
    real_run = validate.run_session

    def recording_run(session, feed):
        order.append("R" if session is reference else "C")
        return real_run(session, feed)

    monkeypatch.setattr(validate, "run_session", recording_run)
    feeds, _ = validate.validation_feeds(MLP, samples=2)
    runs = 4
    result = validate.compare_models(reference, candidate, feeds, timing_runs=runs)
    timed = order[2 * len(feeds):]  # the comparison first, one pair per feed
    steps = validate.TIMING_WARMUP + runs
    assert timed == ["R", "C", "C", "R"] * (steps // 2) + ["R", "C"] * (steps % 2)
    assert result.timing.reference.session_seconds is None  # sessions given: not timed
    assert result.timing.candidate.latency_seconds > 0


def test_prune_validate_timing_and_bad_runs(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    assert main(["prune", str(MLP), "-o", str(output), "--validate", "--timing",
                 "--timing-runs", "3"]) == 0
    assert "latency median of 3 runs" in capsys.readouterr().out
    assert main(["validate", str(MLP), str(output), "--timing", "--timing-runs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnxprune: error: --timing-runs must be at least 1, got 0"]
