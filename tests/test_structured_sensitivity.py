"""Structured sensitivity: per-group output-error curves (checked point by point against the
shrunk model in onnxruntime) and the allocation from them (`--allocation sensitivity`,
`--max-error`), on the API and the command line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import as_constant_nodes
from onnx import TensorProto, helper, numpy_helper

from onnxprune.allocation.sensitivity import energy_curve
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.io import LoadedModel
from onnxprune.sensitivity_sweep import SensitivityResult
from onnxprune.structured import latency
from onnxprune.structured.latency import LatencyTable, LatencyTables
from onnxprune.structured.run import prune_structured, score_groups
from onnxprune.structured.selection import keep_sets
from onnxprune.structured.sensitivity import group_curves, sensitivity_counts
from onnxprune.structured.surgery import shrink


def _two_blocks(scale_second: float = 1.0) -> onnx.ModelProto:
    """x [N, 8] → fc1 → Relu → fc2 → fc3 → Relu → fc4 → y [N, 5]: two hidden groups of 16
    (and fc2's 8 outputs between them); the second block's output is scaled."""
    rng = np.random.default_rng(0)
    shapes = {"W1": (8, 16), "W2": (16, 8), "W3": (8, 16), "W4": (16, 5)}
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in shapes.items()]
    inits[3] = numpy_helper.from_array(numpy_helper.to_array(inits[3]) * scale_second, "W4")
    inits.append(numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b1"))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("MatMul", ["a1", "W2"], ["m"], name="fc2"),
             helper.make_node("MatMul", ["m", "W3"], ["h2"], name="fc3"),
             helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             helper.make_node("MatMul", ["a2", "W4"], ["y"], name="fc4")]
    graph = helper.make_graph(
        nodes, "two_blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def calib(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 12, 8)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return path, x


def _config(calib_path, **settings) -> PruneConfig:
    return PruneConfig.from_settings(structure="channels", calib=calib_path, round_to=1,
                                     min_size=0, **settings)


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": sample})[0] for sample in x])


def test_each_point_is_the_error_of_the_model_with_that_group_shrunk(calib):
    path, x = calib
    model = _two_blocks()
    config = _config(path)
    loaded = LoadedModel(model, None, path.parent, False)
    scored = score_groups(loaded, config)
    result = group_curves(loaded, scored, config, levels=(0.25, 0.5, 0.75))
    dense = _outputs(model, x).astype(np.float64)
    by_name = {g.name: g for g in scored.groups}
    assert result.structure == "channels"
    assert {c.name for c in result.targets} == set(by_name)
    for curve in result.targets:
        group = by_name[curve.name]
        assert [p.sparsity for p in curve.points] == pytest.approx(
            [1 - k / group.channels for k in
             sorted({round((1 - s) * group.channels) for s in (0.25, 0.5, 0.75)},
                    reverse=True)])
        for point in curve.points:
            kept = round((1 - point.sparsity) * group.channels)
            keep = keep_sets([group], scored.scores, {group.name: kept})
            cut = _outputs(shrink(model, [group], keep), x).astype(np.float64)
            expected = np.linalg.norm(cut - dense) / np.linalg.norm(dense)
            assert point.relative_l2 == pytest.approx(expected, rel=1e-4)


def test_constant_node_weights_give_the_same_curves_and_are_put_back(calib):
    path, _ = calib
    config = _config(path)
    curves = {}
    for label, model in (("init", _two_blocks()), ("const", as_constant_nodes(_two_blocks()))):
        before = model.SerializeToString()
        loaded = LoadedModel(model, None, path.parent, False)
        result = group_curves(loaded, score_groups(loaded, config), config,
                              levels=(0.25, 0.5))
        assert model.SerializeToString() == before
        curves[label] = {c.name: [p.relative_l2 for p in c.points] for c in result.targets}
    assert curves["init"].keys() == curves["const"].keys()
    for name, errors in curves["init"].items():
        assert curves["const"][name] == pytest.approx(errors, rel=1e-5)


def _write_curves(path, names_errors: dict[str, list[float]], channels: dict[str, int],
                  params: dict[str, int], structure: str = "channels"):
    targets = [{"name": name, "op_type": "channels", "shape": [channels[name]],
                "numel": params[name],
                "points": [{"sparsity": s, "achieved": s, "relative_l2": e, "cosine": 1.0}
                           for s, e in zip((0.25, 0.5, 0.75), errors, strict=True)]}
               for name, errors in names_errors.items()]
    path.write_text(json.dumps({"format": 1, "model": "m", "method": "magnitude",
                                "pattern": "unstructured", "levels": [0.25, 0.5, 0.75],
                                "samples": 1, "synthetic": False, "targets": targets,
                                "structure": structure}))


def test_the_allocation_takes_from_the_group_whose_curve_is_flat(calib, tmp_path):
    path, _ = calib
    loaded = LoadedModel(_two_blocks(), None, path.parent, False)
    config = _config(path)
    scored = score_groups(loaded, config)
    names = [g.name for g in scored.groups]
    channels = {g.name: g.channels for g in scored.groups}
    params = {g.name: int(scored.per_channel[g.name] * g.channels) for g in scored.groups}
    for flat in names:
        errors = {n: ([0.001, 0.002, 0.003] if n == flat else [0.5, 0.9, 1.2]) for n in names}
        curves = tmp_path / f"curves-{len(flat)}.json"
        _write_curves(curves, errors, channels, params)
        share = 0.5 * params[flat] / sum(params.values())
        config = _config(path, allocation="sensitivity", sensitivity=str(curves),
                         sparsity=share)
        counts = sensitivity_counts(loaded, scored, config)
        for name in names:
            if name == flat:
                assert counts[name] == channels[name] // 2
            else:
                assert counts[name] == channels[name]


@pytest.mark.parametrize("bound", [0.05, 0.2, 0.5, 1.0])
def test_max_error_keeps_the_predicted_error_under_the_bound(calib, bound):
    path, _ = calib
    loaded = LoadedModel(_two_blocks(scale_second=0.2), None, path.parent, False)
    config = _config(path, allocation="sensitivity", max_error=bound)
    scored = score_groups(loaded, config)
    result = group_curves(loaded, scored, config)
    counts = sensitivity_counts(loaded, scored, config)
    energy = 0.0
    for group in scored.groups:
        curve = result.curve(group.name)
        xs, ys = energy_curve(curve, 0.0, curve.points[-1].sparsity)
        energy += float(np.interp(1 - counts[group.name] / group.channels, xs, ys))
    assert np.sqrt(energy) <= bound + 1e-9


def test_a_looser_bound_removes_no_less(calib):
    path, _ = calib
    loaded = LoadedModel(_two_blocks(scale_second=0.2), None, path.parent, False)
    removed = []
    for bound in (0.02, 0.1, 0.3, 0.8, 2.0):
        config = _config(path, allocation="sensitivity", max_error=bound)
        scored = score_groups(loaded, config)
        counts = sensitivity_counts(loaded, scored, config)
        removed.append(sum(scored.per_channel[g.name] * (g.channels - counts[g.name])
                           for g in scored.groups))
    assert removed == sorted(removed)
    assert removed[-1] > removed[0]


def test_the_prune_reaches_about_the_requested_share(calib):
    path, _ = calib
    loaded = LoadedModel(_two_blocks(), None, path.parent, False)
    result = prune_structured(loaded, _config(path, allocation="sensitivity", sparsity=0.4))
    removed = sum(g.params_removed for g in result.groups)
    total = sum(g.params for g in result.groups)
    assert removed / total == pytest.approx(0.4, abs=0.06)


def _swept(tmp_path, calib_path, *options: str):
    """The two-block model saved in tmp_path and its curves written by the CLI with
    `options`: (model path, curves path)."""
    model_path = tmp_path / "m.onnx"
    onnx.save(_two_blocks(), model_path)
    assert main(["sensitivity", str(model_path), "-o", str(tmp_path / "curves"), *options,
                 "--min-size", "0", "--calib", str(calib_path), "-q"]) == 0
    return model_path, tmp_path / "curves" / "m.sensitivity.json"


def test_cli_sweeps_groups_then_prunes_from_the_curves(calib, tmp_path, capsys):
    path, x = calib
    model_path, curves = _swept(tmp_path, path, "--structure", "channels", "--round-to", "1")
    result = SensitivityResult.load(curves)
    assert result.structure == "channels" and len(result.targets) == 3
    out = tmp_path / "out.onnx"
    assert main(["prune", str(model_path), "-o", str(out), "--structure", "channels",
                 "--allocation", "sensitivity", "--sensitivity", str(curves),
                 "--max-error", "0.3", "--round-to", "1", "--min-size", "0",
                 "--calib", str(path), "-q"]) == 0
    pruned = onnx.load(out)
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert meta["onnxprune:allocation"] == "sensitivity"
    dense = _outputs(_two_blocks(), x).astype(np.float64)
    error = np.linalg.norm(_outputs(pruned, x) - dense) / np.linalg.norm(dense)
    assert error < 1.0  # the prediction adds energies; the check is that it ran and shrank
    assert sum(numpy_helper.to_array(t).size for t in pruned.graph.initializer) < sum(
        numpy_helper.to_array(t).size for t in _two_blocks().graph.initializer)


def test_per_target_curves_are_refused_for_a_structured_prune(calib, tmp_path, capsys):
    path, _ = calib
    model_path, curves = _swept(tmp_path, path, "--levels", "0.5")
    capsys.readouterr()
    out = tmp_path / "out.onnx"
    code = main(["prune", str(model_path), "-o", str(out), "--structure", "channels",
                 "--allocation", "sensitivity", "--sensitivity", str(curves), "--min-size",
                 "0", "--calib", str(path), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "per target" in err and "--structure" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sensitivity_structure_refuses_an_nm_pattern(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    onnx.save(_two_blocks(), model_path)
    code = main(["sensitivity", str(model_path), "-o", str(tmp_path), "--structure", "ffn",
                 "--pattern", "2:4", "-q"])
    assert code == 2
    assert "--pattern does not apply" in capsys.readouterr().err


def test_group_curves_are_refused_for_an_unstructured_prune(calib, tmp_path, capsys):
    path, _ = calib
    model_path, curves = _swept(tmp_path, path, "--structure", "channels", "--levels", "0.5")
    capsys.readouterr()
    out = tmp_path / "out.onnx"
    code = main(["prune", str(model_path), "-o", str(out), "--allocation", "sensitivity",
                 "--sensitivity", str(curves), "--min-size", "0", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "channel groups" in err and "per-target" in err and "Traceback" not in err


def _normed() -> onnx.ModelProto:
    """x [N, 8] → fc1 → LayerNorm over the 16 hidden channels → fc2 → y [N, 5]."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=16).astype(np.float32) + 1, "gamma"),
             numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=(16, 5)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1,
                              name="norm"),
             helper.make_node("MatMul", ["n", "W2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "normed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_group_under_a_norm_is_measured_by_its_real_cut(calib):
    path, x = calib
    model = _normed()
    config = _config(path, allow_norm=True)
    loaded = LoadedModel(model, None, path.parent, False)
    scored = score_groups(loaded, config)
    (group,) = [g for g in scored.groups if not g.output_preserving]
    result = group_curves(loaded, scored, config, levels=(0.25, 0.5))
    dense = _outputs(model, x).astype(np.float64)
    for point in result.curve(group.name).points:
        kept = round((1 - point.sparsity) * group.channels)
        keep = keep_sets([group], scored.scores, {group.name: kept})
        cut = _outputs(shrink(model, [group], keep), x).astype(np.float64)
        expected = np.linalg.norm(cut - dense) / np.linalg.norm(dense)
        assert point.relative_l2 == pytest.approx(expected, rel=1e-4)


def test_a_latency_budget_spends_where_the_curves_predict_least_error(calib, tmp_path,
                                                                       monkeypatch):
    """With --allocation sensitivity, --latency-budget removes the channels of the group
    whose curve is flat, whichever group it is; the latency tables are the same for both
    (given, not timed), so only the curves can decide."""
    path, _ = calib
    loaded = LoadedModel(_two_blocks(), None, path.parent, False)
    scored = score_groups(loaded, _config(path))
    names = [g.name for g in scored.groups]
    channels = {g.name: g.channels for g in scored.groups}
    params = {g.name: int(scored.per_channel[g.name] * g.channels) for g in scored.groups}
    tables = {n: LatencyTable([1, 4, 8, 12, 16], [0.1, 0.4, 0.8, 1.2, 1.6]) for n in names}
    monkeypatch.setattr(latency, "measure_tables", lambda *a, **k: LatencyTables(tables, 4.0))
    for flat in names:
        errors = {n: ([0.001, 0.002, 0.003] if n == flat else [0.5, 0.9, 1.2]) for n in names}
        curves = tmp_path / f"curves-{len(flat)}.json"
        _write_curves(curves, errors, channels, params)
        config = _config(path, allocation="sensitivity", sensitivity=str(curves),
                         latency_budget=0.9, latency_calibrate=False)
        result = prune_structured(loaded, config)
        kept = {name: len(keep) for name, keep in result.keep.items()}
        assert kept[flat] < channels[flat] and kept[flat] >= channels[flat] // 4
        assert all(kept.get(n, channels[n]) == channels[n] for n in names if n != flat)
        assert result.latency["predicted_ratio"] <= 0.9 + 1e-9


def test_a_latency_budget_and_max_error_are_refused_together(calib, tmp_path, capsys):
    path, _ = calib
    model_path = tmp_path / "m.onnx"
    onnx.save(_two_blocks(), model_path)
    code = main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--structure",
                 "channels", "--allocation", "sensitivity", "--latency-budget", "0.8",
                 "--max-error", "0.1", "--calib", str(path), "--min-size", "0"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--max-error" in error[0] and "--latency-budget" in error[0]
    assert not (tmp_path / "o.onnx").exists()


def test_structured_options_without_structure_are_named_as_ignored(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    onnx.save(_two_blocks(), model_path)
    assert main(["sensitivity", str(model_path), "-o", str(tmp_path / "c"), "--levels", "0.5",
                 "--round-to", "4", "--min-size", "0"]) == 0
    assert "--round-to: ignored without --structure" in capsys.readouterr().err


def test_a_model_that_cannot_run_on_the_synthetic_inputs_is_a_one_line_error(tmp_path,
                                                                              capsys):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([-1, 7], np.int64), "shape"),
             numpy_helper.from_array(rng.normal(size=(7, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], inits)
    model_path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              model_path)
    code = main(["sensitivity", str(model_path), "-o", str(tmp_path / "c"), "--structure",
                 "channels", "--round-to", "1", "--min-size", "0", "--levels", "0.5",
                 "--dim", "S=10", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot run the model" in err and "Traceback" not in err
    assert "--dim" in err
    assert main(["sensitivity", str(model_path), "-o", str(tmp_path / "c"), "--structure",
                 "channels", "--round-to", "1", "--min-size", "0", "--levels", "0.5",
                 "--dim", "S=14", "-q"]) == 0
