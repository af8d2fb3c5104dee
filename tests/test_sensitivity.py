"""`onnxprune sensitivity`: each sweep point is the model with that target alone pruned as
the pipeline prunes it; the model is left untouched; JSON, PNG, progress and messages."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import MODELS_DIR

from onnxprune.calib import load_calibration
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.io import load_model
from onnxprune.patterns import prune_count
from onnxprune.pipeline import run
from onnxprune.sensitivity_sweep import SensitivityResult, analyze
from onnxprune.validate import compare_models


@pytest.mark.parametrize("model, method", [("cnn.onnx", "magnitude"), ("cnn.onnx", "wanda"),
                                           ("transformer.onnx", "sparsegpt")])
def test_each_point_is_that_target_pruned_alone(model, method):
    loaded = load_model(MODELS_DIR / model)
    feeds = load_calibration(None, loaded.proto, 3, seed=1)
    config = PruneConfig(method=method)
    before = loaded.proto.SerializeToString()
    levels = (0.4, 0.8)
    calls = []
    result = analyze(loaded, config, levels=levels, feeds=feeds,
                     progress=lambda target, level, total: calls.append((target.name, total)))
    assert loaded.proto.SerializeToString() == before  # initializers and Constants put back
    assert len(calls) == len(result.targets) * len(levels)
    assert {total for _, total in calls} == {len(calls)}
    for curve in result.targets[:2] + result.targets[-1:]:
        assert [p.sparsity for p in curve.points] == list(levels)
        for point in curve.points:
            assert point.achieved == prune_count(curve.numel, point.sparsity) / curve.numel \
                or method == "wanda"  # wanda rounds per row
            pruned = load_model(MODELS_DIR / model)
            run(pruned, PruneConfig(method=method, sparsity=point.sparsity, min_size=0,
                                    include=(f"^{curve.name}$",), calib_mode="one-pass"),
                feeds=feeds)
            comparison = compare_models(loaded.proto, pruned.proto, feeds)
            (output,) = comparison.outputs  # the demo models have one output each
            assert point.relative_l2 == pytest.approx(output.rel_l2, rel=1e-4, abs=1e-7)
            assert point.cosine == pytest.approx(output.cosine, abs=1e-6)
            assert point.top1 == pytest.approx(output.top1_agreement)


def test_errors_grow_with_sparsity_and_json_round_trips(tmp_path):
    loaded = load_model(MODELS_DIR / "mlp.onnx")
    result = analyze(loaded, PruneConfig(calib_samples=4))
    for curve in result.targets:
        errors = [p.relative_l2 for p in curve.points]
        assert errors[-1] > errors[0] > 0
    path = tmp_path / "c.json"
    path.write_text(result.to_json())
    again = SensitivityResult.load(path)
    assert again == result
    assert again.curve("fc1.weight").error_at(0.0) == 0.0
    first = again.curve("fc1.weight").points[0]
    assert again.curve("fc1.weight").error_at(first.sparsity) == first.relative_l2


def test_cli_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sens"
    code = main(["sensitivity", str(MODELS_DIR / "transformer.onnx"), "-o", str(out),
                 "--levels", "0.5,0.9", "--calib-samples", "4", "-q"])
    assert code == 0
    data = json.loads((out / "transformer.sensitivity.json").read_text())
    assert data["levels"] == [0.5, 0.9] and len(data["targets"]) == 7
    png = (out / "transformer.sensitivity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    printed = capsys.readouterr()
    assert "7 targets x 2 levels" in printed.out and printed.err == ""  # -q, not a tty


def test_cli_without_matplotlib_writes_json_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    code = main(["sensitivity", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path),
                 "--levels", "0.5", "--calib-samples", "2", "-q"])
    assert code == 0
    assert (tmp_path / "mlp.sensitivity.json").exists()
    assert not (tmp_path / "mlp.sensitivity.png").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnxprune: warning: the sensitivity plot needs matplotlib: pip install "
                   "'onnxprune[plot]' (the JSON curves were written)"]


@pytest.mark.parametrize("args, message", [
    (["--levels", "0.5,1.2"], "levels must lie in (0, 1)"),
    (["--levels", "half"], "--levels must be numbers"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--include", "nothing-matches"], "nothing to analyse"),
])
def test_cli_user_errors(args, message, tmp_path, capsys):
    code = main(["sensitivity", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path), *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxprune: error: ") and message in err[0]
    assert not list(tmp_path.iterdir())
