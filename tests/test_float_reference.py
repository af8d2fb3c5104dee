"""--float-reference: a quantized model's weights rebuilt from the float weights they were
rounded from (joint sparsification and quantization from the float values).

The quantized models are written by onnxruntime's own quantizer from the trained demo
model; the reference is that demo model. Checked: every target finds its own float tensor
(also transposed, for MatMulNBits), the rebuilt weights fit the float layer better than
pruning the float model and rounding afterwards, and a reference that does not match, or a
method that rebuilds nothing, changes nothing but a warning.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from test_quantized import DIGITS, PIXELS, _make, _targets

from onnxprune.cli import main
from onnxprune.float_reference import FloatReference
from onnxprune.io import load_model
from onnxprune.targets import read_weights

pytest.importorskip("onnxruntime.quantization")
FLOATS = {t.name: numpy_helper.to_array(t) for t in onnx.load(DIGITS).graph.initializer}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("float-reference")
    calib = folder / "calib.npz"
    np.savez(calib, pixels=PIXELS[:128])
    forms = ("qdq-int8-channel", "qdq-int4-channel", "qdq-uint8-tensor", "qoperator-matmul",
             "matmul-nbits", "dynamic-matmul", "dynamic-matmul-channel")
    return {form: _make(form, folder) for form in forms}, calib


def _float_of(target_name: str) -> np.ndarray:
    (name,) = [n for n in FLOATS if target_name.startswith(n + "_")]
    return FLOATS[name]


@pytest.mark.parametrize("form", ["qdq-int8-channel", "qdq-int4-channel", "qdq-uint8-tensor",
                                  "qoperator-matmul", "matmul-nbits", "dynamic-matmul",
                                  "dynamic-matmul-channel"])
def test_every_quantized_target_finds_the_float_tensor_it_was_rounded_from(models,
                                                                           form) -> None:
    loaded, targets = _targets(models[0][form])
    reference = FloatReference(DIGITS)
    for target in targets:
        grid = target.quant.grid(loaded.base_dir)
        ints = grid.quantize(read_weights(target, loaded.base_dir, grid=grid))
        found = reference.weights(target, grid, ints)
        expected = _float_of(target.name)
        if form == "matmul-nbits":  # stored [N, K], the float weight is [K, N]
            expected = expected.T
        assert found is not None and np.array_equal(found, expected), target.name


def test_a_weight_whose_scale_is_not_found_finds_no_float_counterpart(models,
                                                                      tmp_path) -> None:
    """A MatMulInteger whose output reaches its scale by another path than onnxruntime's
    Cast -> Mul is read as integers minus the zero point: they are not the float weights
    on that grid, so nothing may match them."""
    model = onnx.load(models[0]["dynamic-matmul-channel"])
    for node in list(model.graph.node):
        if node.op_type == "Cast":  # Cast -> Identity -> Mul
            model.graph.node.append(helper.make_node("Identity", [node.output[0]],
                                                     [node.output[0] + "_id"]))
            for user in model.graph.node:
                if user.op_type == "Mul" and node.output[0] in user.input:
                    user.input[list(user.input).index(node.output[0])] = node.output[0] + "_id"
    path = tmp_path / "indirect.onnx"
    onnx.save(model, path)
    loaded, targets = _targets(path)
    reference = FloatReference(DIGITS)
    assert targets
    for target in targets:
        grid = target.quant.grid(loaded.base_dir)
        assert np.all(grid.scale == 1)
        ints = grid.quantize(read_weights(target, loaded.base_dir, grid=grid))
        assert reference.weights(target, grid, ints) is None


def _layer_inputs() -> dict[str, np.ndarray]:
    """Each float MatMul weight's layer input on the calibration pixels (dense model)."""
    model = onnx.load(DIGITS)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    for node in matmuls:
        model.graph.output.append(helper.make_tensor_value_info(node.input[0], 1, None))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    values = session.run([n.input[0] for n in matmuls], {"pixels": PIXELS[:128]})
    return {n.input[1]: v.reshape(-1, v.shape[-1]).astype(np.float64)
            for n, v in zip(matmuls, values, strict=True)}


@pytest.mark.parametrize("form", ["qdq-int8-channel", "qdq-int4-channel"])
@pytest.mark.parametrize("pattern", [["--sparsity", "0.5"], ["--pattern", "2:4"]])
def test_joint_reconstruction_from_float_weights_fits_the_float_layers_best(
        models, form, pattern, tmp_path) -> None:
    """Layer error ‖X(W_float - W)‖² on the calibration data (one-pass: every run sees
    the dense model's inputs): the quantized model pruned with the float reference is
    below the float model pruned by the same method and then rounded onto the same grid
    (prune, then quantize), and, for the coarse int4 grid in every layer, below the same
    prune started from the integers."""
    paths, calib = models
    common = [*pattern, "--method", "sparsegpt", "--calib", str(calib), "--calib-mode",
              "one-pass", "--min-size", "100", "-q"]
    runs = {"joint": (paths[form], ["--float-reference", str(DIGITS)]),
            "from ints": (paths[form], []), "float": (DIGITS, [])}
    pruned = {}
    for name, (source, extra) in runs.items():
        out = tmp_path / f"{name}.onnx"
        assert main(["prune", str(source), "-o", str(out), *common, *extra]) == 0
        pruned[name] = load_model(out)
    inputs = _layer_inputs()
    quantized, targets = _targets(paths[form])
    float_pruned = {t.name: numpy_helper.to_array(t)
                    for t in pruned["float"].proto.graph.initializer}
    totals = {"joint": 0.0, "afterwards": 0.0}
    for target in targets:
        name = next(n for n in FLOATS if target.name.startswith(n + "_"))
        x, dense = inputs[name], FLOATS[name]
        grid = target.quant.grid(quantized.base_dir)

        def error(weights, x=x, dense=dense):
            return float(np.sum((x @ (dense - weights)) ** 2))

        weights = {}
        for run in ("joint", "from ints"):
            loaded = pruned[run]
            (found,) = [t for t in _targets(loaded.path)[1] if t.name == target.name]
            weights[run] = read_weights(found, loaded.base_dir)
        afterwards = grid.round(float_pruned[name])
        assert np.count_nonzero(weights["joint"] == 0) >= target.numel // 2
        totals["joint"] += error(weights["joint"])
        totals["afterwards"] += error(afterwards)
        if form == "qdq-int4-channel":
            assert error(weights["joint"]) < error(afterwards), target.name
            assert error(weights["joint"]) < error(weights["from ints"]), target.name
    assert totals["joint"] < totals["afterwards"], totals


def _with_and_without(models, tmp_path, capsys, method: str, reference) -> tuple[str, bool]:
    """Prune the int8 QDQ model by `method` without and with `--float-reference reference`:
    what the second run said, and whether both wrote the same initializers."""
    paths, calib = models
    common = [str(paths["qdq-int8-channel"]), "--method", method, "--calib", str(calib),
              "--min-size", "100"]
    assert main(["prune", *common, "-o", str(tmp_path / "plain.onnx")]) == 0
    capsys.readouterr()
    assert main(["prune", *common, "-o", str(tmp_path / "ref.onnx"),
                 "--float-reference", str(reference)]) == 0
    said = capsys.readouterr().err
    plain, ref = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "ref.onnx")
    return said, [(t.name, t.raw_data) for t in plain.graph.initializer] == \
        [(t.name, t.raw_data) for t in ref.graph.initializer]


def test_a_reference_that_does_not_match_changes_nothing_but_warns(models, tmp_path,
                                                                    capsys) -> None:
    other = onnx.load(DIGITS)
    for tensor in other.graph.initializer:  # other weights of the same shapes
        values = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array(values[::-1].copy(), tensor.name))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(other, wrong)
    said, same = _with_and_without(models, tmp_path, capsys, "sparsegpt", wrong)
    assert "have no float counterpart" in said
    assert same


def test_a_method_that_rebuilds_nothing_leaves_the_reference_unused(models, tmp_path,
                                                                    capsys) -> None:
    said, same = _with_and_without(models, tmp_path, capsys, "wanda", DIGITS)
    assert "--float-reference is unused" in said
    assert same


@pytest.mark.parametrize("bad", ["missing", "not onnx"])
def test_a_bad_reference_is_a_one_line_error_and_writes_nothing(models, tmp_path, capsys,
                                                                bad) -> None:
    paths, calib = models
    reference = tmp_path / "ref.onnx"
    if bad == "not onnx":
        reference.write_bytes(b"not a model at all")
    out = tmp_path / "out.onnx"
    code = main(["prune", str(paths["qdq-int8-channel"]), "-o", str(out), "--method",
                 "sparsegpt", "--calib", str(calib), "--min-size", "100", "-q",
                 "--float-reference", str(reference)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and not out.exists()
    assert len(err.splitlines()) == 1 and "ref.onnx" in err and "Traceback" not in err


def test_the_report_counts_the_quantized_models_zeros_before_pruning(models,
                                                                    tmp_path) -> None:
    """zeros_before is the quantized weights' count (their rounding made zeros), not that
    of the float weights the rebuild started from."""
    paths, calib = models
    reports = []
    for extra in ([], ["--float-reference", str(DIGITS)]):
        report = tmp_path / f"r{len(extra)}.json"
        assert main(["prune", str(paths["qdq-int8-channel"]), "-o",
                     str(tmp_path / f"o{len(extra)}.onnx"), "--method", "sparsegpt",
                     "--calib", str(calib), "--min-size", "100", "--report", str(report),
                     "-q", *extra]) == 0
        reports.append({t["name"]: t["zeros_before"]
                        for t in json.loads(report.read_text())["targets"]})
    assert reports[0] == reports[1] and sum(reports[0].values()) > 0


def test_same_shaped_weights_are_told_apart_by_value_whatever_their_names(tmp_path) -> None:
    """Two 64x64 weights; in the reference their names are swapped, so the name order tries
    the wrong one first: each target still gets its own values."""
    from test_quantized import Reader, quantization

    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((64, 64)).astype(np.float32) * 0.1 for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "B"], ["y"])], "two",
        [helper.make_tensor_value_info("x", 1, [8, 64])],
        [helper.make_tensor_value_info("y", 1, [8, 64])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source, quantized = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    onnx.save(model, source)
    quantization.quantize_static(
        str(source), str(quantized),
        Reader("x", [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(4)]),
        quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        weight_type=quantization.QuantType.QInt8)
    swapped = onnx.load(source)
    swapped.graph.initializer[0].name, swapped.graph.initializer[1].name = "B", "A"
    reference_path = tmp_path / "swapped.onnx"
    onnx.save(swapped, reference_path)
    loaded, targets = _targets(quantized)
    reference = FloatReference(reference_path)
    assert len(targets) == 2
    for target in targets:
        grid = target.quant.grid(loaded.base_dir)
        ints = grid.quantize(read_weights(target, loaded.base_dir, grid=grid))
        expected = a if target.name.startswith("A") else b
        assert np.array_equal(reference.weights(target, grid, ints), expected), target.name


def test_a_target_that_loses_nothing_keeps_its_integers_with_a_reference(models,
                                                                         tmp_path) -> None:
    """tools/fuzz.py --quantized --seed 41, case 432: at --sparsity 0 sparsegpt started from
    the float reference and re-rounded every weight onto the grid, changing integers where
    nothing was to be pruned. A target that loses nothing keeps its integers."""
    paths, calib = models
    source = paths["qdq-int4-channel"]
    out = tmp_path / "out.onnx"
    assert main(["prune", str(source), "-o", str(out), "--sparsity", "0", "--method",
                 "sparsegpt", "--calib", str(calib), "--min-size", "100", "-q",
                 "--float-reference", str(DIGITS)]) == 0
    before = {t.name: t.raw_data for t in onnx.load(source).graph.initializer}
    after = {t.name: t.raw_data for t in onnx.load(out).graph.initializer}
    assert all(after[name] == data for name, data in before.items())
