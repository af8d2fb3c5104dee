"""Quantized models in: every form onnxruntime's own tools write, pruned to exact zero points.

Each model here is quantized by onnxruntime's quantization tools from a demo model (or a
tiny float model for ConvInteger and LSTM): QDQ per channel and per tensor (int8, uint8
with zero points away from 0, int4), QOperator (QLinearMatMul, QLinearConv, QGemm),
dynamic (MatMulInteger, ConvInteger, DynamicQuantizeLSTM) and MatMulNBits. Checked: the
exact count of weights at their zero point, kept integers bit-identical, the magnitude
order on the dequantized values, and that onnxruntime runs the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.io import load_model, read_array
from onnxprune.methods.sparsegpt import sparsegpt_prune
from onnxprune.patterns import prune_count
from onnxprune.quantized import Grid
from onnxprune.targets import Selection, SkipCause, discover_targets, read_weights

quantization = pytest.importorskip("onnxruntime.quantization")
DIGITS = MODELS_DIR / "digits.onnx"
PIXELS = np.load(MODELS_DIR / "digits-test.npz")["pixels"]
LABELS = np.load(MODELS_DIR / "digits-test-labels.npy")


class Reader(quantization.CalibrationDataReader):
    """Calibration samples for onnxruntime's static quantizer."""

    def __init__(self, name: str, batches: list[np.ndarray]):
        self.batches = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.batches, None)


def _digits_reader() -> Reader:
    return Reader("pixels", [PIXELS[i:i + 32] for i in range(0, 128, 32)])


def _conv_model(path: Path) -> Path:
    """A float Conv -> Relu -> Conv model with initializer weights (for ConvInteger)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((32, 8, 3, 3)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((16, 32, 3, 3)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 12])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return _saved(graph, path)


def _lstm_model(path: Path) -> Path:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((1, 128, 32)) * 0.2).astype(np.float32)
    r = (rng.standard_normal((1, 128, 32)) * 0.2).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=32)], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 1, 1, 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    return _saved(graph, path)


def _saved(graph: onnx.GraphProto, path: Path) -> Path:
    """The graph as an opset-17 model file at `path`."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _make(form: str, folder: Path) -> Path:
    q = quantization
    out = folder / f"{form}.onnx"
    if form == "qdq-int8-channel":
        q.quantize_static(str(DIGITS), str(out), _digits_reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, weight_type=q.QuantType.QInt8)
    elif form == "qdq-uint8-tensor":  # asymmetric: zero points away from 0
        q.quantize_static(str(DIGITS), str(out), _digits_reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=False, weight_type=q.QuantType.QUInt8,
                          activation_type=q.QuantType.QUInt8,
                          extra_options={"WeightSymmetric": False})
    elif form == "qdq-int4-channel":
        q.quantize_static(str(DIGITS), str(out), _digits_reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, weight_type=q.QuantType.QInt4)
    elif form == "qoperator-matmul":
        q.quantize_static(str(DIGITS), str(out), _digits_reader(),
                          quant_format=q.QuantFormat.QOperator, per_channel=False,
                          weight_type=q.QuantType.QInt8)
    elif form in ("qoperator-conv", "dynamic-conv"):
        source = _conv_model(folder / "conv-float.onnx")
        if form == "dynamic-conv":
            q.quantize_dynamic(str(source), str(out), weight_type=q.QuantType.QInt8)
        else:
            reader = Reader("x", [np.random.default_rng(i).random((1, 8, 12, 12), np.float32)
                                  for i in range(4)])
            q.quantize_static(str(source), str(out), reader, per_channel=True,
                              quant_format=q.QuantFormat.QOperator)
    elif form == "dynamic-matmul":
        q.quantize_dynamic(str(DIGITS), str(out), weight_type=q.QuantType.QInt8)
    elif form == "dynamic-matmul-channel":  # per-channel zero points, the scale in a Mul
        q.quantize_dynamic(str(DIGITS), str(out), weight_type=q.QuantType.QInt8,
                           per_channel=True)
    elif form == "dynamic-lstm":
        q.quantize_dynamic(str(_lstm_model(folder / "lstm.onnx")), str(out),
                           weight_type=q.QuantType.QInt8, op_types_to_quantize=["LSTM"])
    elif form == "matmul-nbits":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(DIGITS), block_size=32, is_symmetric=False)
        quantizer.process()
        onnx.save(quantizer.model.model, out)
    return out


FORMS = {  # form -> the quantization op every target must be read by
    "qdq-int8-channel": "DequantizeLinear", "qdq-uint8-tensor": "DequantizeLinear",
    "qdq-int4-channel": "DequantizeLinear", "qoperator-matmul": "QLinearMatMul",
    "qoperator-conv": "QLinearConv", "dynamic-matmul": "MatMulInteger",
    "dynamic-matmul-channel": "MatMulInteger",
    "dynamic-conv": "ConvInteger", "dynamic-lstm": "DynamicQuantizeLSTM",
    "matmul-nbits": "MatMulNBits",
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quantized")
    return {form: _make(form, folder) for form in FORMS}


def _targets(path: Path):
    loaded = load_model(path)
    targets, _ = discover_targets(loaded.proto, Selection(min_size=100))
    return loaded, targets


def _run(path: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        shape = [d if isinstance(d, int) else 4 for d in value.shape]
        feeds[value.name] = np.random.default_rng(0).random(shape, np.float32)
    return session.run(None, feeds)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_quantized_form_is_found_and_pruned_to_exact_zero_points(
        quantized, form, tmp_path) -> None:
    path = quantized[form]
    before, targets = _targets(path)
    assert targets, f"{form}: no target found"
    assert {t.quant.op for t in targets} == {FORMS[form]}
    out = tmp_path / "p.onnx"
    report = tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), "--sparsity", "0.5", "--min-size", "100",
                 "--report", str(report), "-q"]) == 0
    after, pruned_targets = _targets(out)
    by_name = {t.name: t for t in pruned_targets}
    for target in targets:
        pruned = by_name[target.name]
        grid = target.quant.grid(before.base_dir)
        old = target.quant.to_ints(read_array(target.stored_tensor, before.base_dir))
        new = pruned.quant.to_ints(read_array(pruned.stored_tensor, after.base_dir))
        at_zero = new == np.broadcast_to(grid.zero_point, new.shape)
        # exactly the planned count sits at the zero point, nothing else moved
        assert int(at_zero.sum()) == prune_count(target.numel, 0.5), target.name
        assert np.array_equal(new[~at_zero], old[~at_zero])
        # magnitude on the dequantized values: nothing kept is smaller than what was pruned
        values = np.abs(grid.dequantize(old))
        assert values[at_zero].max() <= values[~at_zero].min()
        # the float view the report counts agrees
        assert np.count_nonzero(read_weights(pruned, after.base_dir) == 0) == at_zero.sum()
    reported = {t["name"]: t for t in json.loads(report.read_text())["targets"]}
    assert all(r["meets_plan"] and r["dtype"] == by_name[n].dtype for n, r in reported.items())
    outputs = _run(out)
    assert all(np.isfinite(o).all() for o in outputs)


def test_an_asymmetric_grid_prunes_to_its_nonzero_zero_point(quantized, tmp_path) -> None:
    path = quantized["qdq-uint8-tensor"]
    loaded, targets = _targets(path)
    zero_points = [int(np.asarray(t.quant.grid(loaded.base_dir).zero_point).reshape(-1)[0])
                   for t in targets]
    assert any(z != 0 for z in zero_points)  # the case this test is for
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--sparsity", "0.6", "--min-size", "100",
                 "-q"]) == 0
    pruned, again = _targets(out)
    for target, zero in zip(again, zero_points, strict=True):
        stored = read_array(target.stored_tensor, pruned.base_dir)
        assert np.count_nonzero(stored == zero) >= prune_count(target.numel, 0.6)
        assert np.count_nonzero(stored == 0) < stored.size // 4  # 0 is not what was written


@pytest.mark.parametrize("form", ["qdq-int8-channel", "qoperator-matmul", "dynamic-matmul"])
def test_calibrated_methods_see_the_layer_inputs_of_quantized_models(
        quantized, form, tmp_path) -> None:
    """wanda and sparsegpt see the layer inputs (dequantized where the op computes on
    integers): wanda's mask on the quantized model is, but for rounding, its mask on the
    float model, and sparsegpt keeps more held-out accuracy than magnitude at 80 %."""
    path = quantized[form]
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=PIXELS[:256])

    def pruned(model: Path, method: str) -> Path:
        out = tmp_path / f"{method}-{model.stem}.onnx"
        assert main(["prune", str(model), "-o", str(out), "--sparsity", "0.8", "--min-size",
                     "100", "--method", method, "--calib", str(calib), "-q"]) == 0
        return out

    def accuracy(model: Path) -> float:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"pixels": PIXELS[256:]})[0]
        return float((logits.argmax(1) == LABELS[256:]).mean())

    def masks(model: Path) -> list[np.ndarray]:
        loaded, targets = _targets(model)
        return [read_weights(t, loaded.base_dir) != 0 for t in targets]

    for float_mask, quantized_mask in zip(masks(pruned(DIGITS, "wanda")),
                                          masks(pruned(path, "wanda")), strict=True):
        assert float_mask.shape == quantized_mask.shape
        assert (float_mask == quantized_mask).mean() > 0.9
    assert accuracy(pruned(path, "sparsegpt")) > accuracy(pruned(path, "magnitude"))


def test_captured_layer_inputs_of_qlinear_ops_are_dequantized(quantized) -> None:
    """The statistics of a QLinearMatMul target are those of (x_q - zero) * scale of its
    uint8 input, read from onnxruntime and dequantized by hand here."""
    from onnxprune.calib import ActivationCapture, GraphIndex, target_view

    path = quantized["qoperator-matmul"]
    loaded, targets = _targets(path)
    target = next(t for t in targets if t.shape == (256, 128))
    index = GraphIndex(loaded.proto)
    view = target_view(target, index)
    assert not isinstance(view, str), view
    node = next(n for n in loaded.proto.graph.node
                if n.op_type == "QLinearMatMul" and n.input[3] == target.tensor_name)
    feeds = [{"pixels": PIXELS[:16]}]
    capture = ActivationCapture(loaded, index, [view], feeds, sequential=False, hessian=False,
                                weights={})
    for _ in capture.stages():
        pass
    stats = capture.stats_of(view)
    probe = onnx.load(path)
    zero = next(t for t in probe.graph.initializer if t.name == node.input[2])
    probe.graph.output.append(helper.make_tensor_value_info(node.input[0], zero.data_type,
                                                            None))
    session = ort.InferenceSession(probe.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x_q = session.run([node.input[0]], feeds[0])[0]
    inits = {t.name: numpy_helper.to_array(t) for t in probe.graph.initializer}
    x = (x_q.astype(np.float32) - inits[node.input[2]].astype(np.float32)) * inits[node.input[1]]
    np.testing.assert_allclose(stats.sq_norms[0], (x.astype(np.float64) ** 2).sum(0),
                               rtol=1e-5)


def test_joint_sparse_quantized_reconstruction_beats_prune_then_quantize() -> None:
    """Rounding each kept weight to the grid as the sweep reaches it, and spreading the
    rounding error, gives a smaller layer error on the calibration data than rounding the
    pruned and reconstructed weights afterwards."""
    rng = np.random.default_rng(0)
    for trial in range(4):
        rows, cols = 48, 96
        weights = rng.standard_normal((rows, cols)).astype(np.float32)
        x = rng.standard_normal((400, cols)) @ rng.standard_normal((cols, cols)) * 0.1 + \
            rng.standard_normal((400, cols))
        hessian = x.T @ x
        scale = (np.abs(weights).max(1, keepdims=True) / 7).astype(np.float32)
        grid = Grid(scale, np.zeros((rows, 1), np.int32), -8, 7)
        for n, m in ((0, 0), (2, 4)):
            afterwards = grid.round(sparsegpt_prune(weights, hessian, keep_n=n, group_m=m))
            joint = sparsegpt_prune(weights, hessian, keep_n=n, group_m=m, grid=(
                np.broadcast_to(scale, weights.shape).copy(),
                np.zeros(weights.shape, np.float32), -8, 7))
            assert np.array_equal(grid.round(joint), joint)  # on the grid already

            def error(pruned, weights=weights, x=x):
                return float(np.sum(((weights - pruned) @ x.T) ** 2))

            assert error(joint) < error(afterwards), (trial, n, m)
            assert np.count_nonzero(joint == 0) >= prune_count(joint.size, 0.5)


def test_sparsegpt_on_a_qdq_model_writes_grid_integers_with_the_planned_zeros(
        quantized, tmp_path) -> None:
    path = quantized["qdq-int8-channel"]
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=PIXELS[:128])
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--pattern", "2:4", "--method",
                 "sparsegpt", "--min-size", "100", "--calib", str(calib), "-q"]) == 0
    loaded, targets = _targets(out)
    for target in targets:
        stored = read_array(target.stored_tensor, loaded.base_dir)
        assert stored.dtype == np.int8
        groups = np.moveaxis(stored, target.reduction_axis, -1).reshape(-1, 4)
        assert (np.count_nonzero(groups, axis=1) <= 2).all()  # 2:4 on int8, zero point 0


UNSUPPORTED = [
    ("scale computed at run time", "DequantizeLinear",
     "its scale is computed at run time, not stored"),
    ("act-order MatMulNBits", "MatMulNBits", "act-order weights (g_idx) are not supported"),
    ("float zero points", "MatMulNBits", "float zero points put no weight exactly at zero"),
]


def _unsupported_model(case: str) -> onnx.ModelProto:
    q = numpy_helper.from_array(np.ones((16, 8), np.int8), "Wq")
    if case == "scale computed at run time":
        nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"]),
                 helper.make_node("MatMul", ["x", "W"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16]),
                  helper.make_tensor_value_info("s", TensorProto.FLOAT, [])]
        inits = [q]
    else:
        packed = numpy_helper.from_array(np.ones((8, 1, 8), np.uint8), "Wq")
        scales = numpy_helper.from_array(np.ones(8, np.float32), "scales")
        extra = []
        if case == "float zero points":
            extra = [numpy_helper.from_array(np.ones(8, np.float32), "zeros")]
            names = ["x", "Wq", "scales", "zeros"]
        else:
            extra = [numpy_helper.from_array(np.zeros(16, np.int32), "g_idx")]
            names = ["x", "Wq", "scales", "", "g_idx"]
        nodes = [helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=16,
                                  N=8, bits=4, block_size=16)]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])]
        inits = [packed, scales, *extra]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize(("case", "op", "why"), UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED])
def test_an_unsupported_quantized_form_is_skipped_naming_the_op(case, op, why) -> None:
    targets, skipped = discover_targets(_unsupported_model(case), Selection(min_size=1))
    assert not targets
    skip = next(s for s in skipped if s.name == "Wq")
    assert skip.cause is SkipCause.QUANTIZED_FORM
    assert dict(skip.detail) == {"op": op, "why": why}
    assert skip.reason == f"quantized weight of {op} not supported: {why}"


def test_a_model_with_only_unsupported_quantized_weights_is_refused_in_one_line(
        tmp_path, capsys) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_unsupported_model("act-order MatMulNBits"), path)
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--min-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized form not supported" in err[0]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_compact_int8_weights_load_run_identically_and_densify_bit_exact(
        quantized, pattern, tmp_path, capsys) -> None:
    """values + positions of int8 weights (zero point 0), rebuilt before the
    DequantizeLinear: same outputs as the dense pruned model, smaller file, densify restores
    the integers exactly; the stored size is within 1.1x of the entropy bound."""
    path = quantized["qdq-int8-channel"]
    option = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    dense, compact, restored = (tmp_path / f"{n}.onnx" for n in ("dense", "compact", "back"))
    for out, fmt in ((dense, "dense"), (compact, "compact")):
        assert main(["prune", str(path), "-o", str(out), *option, "--min-size", "100",
                     "--format", fmt, "-q"]) == 0
    assert compact.stat().st_size < dense.stat().st_size
    assert np.array_equal(_run(dense)[0], _run(compact)[0])
    assert main(["densify", str(compact), "-o", str(restored)]) == 0
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(dense).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(restored).graph.initializer}
    for name, values in before.items():
        assert values.dtype == after[name].dtype and np.array_equal(values, after[name]), name
    capsys.readouterr()
    assert main(["inspect", str(compact), "--min-size", "100", "--json"]) == 0
    compacted = [t for t in json.loads(capsys.readouterr().out)["targets"]
                 if t["format"].startswith("compact")]
    assert compacted
    for target in compacted:
        # the bound of what is stored: int8 values and their positions (bytes: the stored
        # tensors; the rebuild's nodes add a fixed ~2.5 KB per tensor)
        nnz = target["numel"] - target["zeros"]
        bound = nnz + target["numel"] * _entropy(nnz / target["numel"]) / 8
        if ":" in pattern:  # positions of 2 in 4: log2(6) bits per group
            bound = nnz + target["numel"] / 4 * np.log2(6) / 8
        assert target["bytes"] <= 1.1 * bound, target["name"]


def _entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def test_inspect_sizes_a_quantized_weight_by_its_integers(quantized, capsys) -> None:
    assert main(["inspect", str(quantized["qdq-int8-channel"]), "--min-size", "100",
                 "--json"]) == 0
    targets = json.loads(capsys.readouterr().out)["targets"]
    for target in targets:
        assert target["dtype"] == "int8"
        assert target["format_bytes"]["dense"] == target["numel"]  # one byte each
    assert main(["inspect", str(quantized["qdq-int4-channel"]), "--min-size", "100",
                 "--json"]) == 0
    for target in json.loads(capsys.readouterr().out)["targets"]:
        sizes = target["format_bytes"]
        assert sizes["dense"] == target["numel"] // 2  # two to a byte
        assert sizes["sparse"] is None  # onnxruntime loads no int4 sparse tensor
        # compact and the bound: 4-bit values (tests/test_compact_int4.py)
        assert sizes["compact_format"].startswith("compact-")
        numel, nnz = target["numel"], target["numel"] - target["zeros"]
        assert sizes["entropy_bound"] == round(nnz / 2 + numel * _entropy(nnz / numel) / 8)


def test_structured_pruning_of_a_qdq_model_declines_naming_the_quantization(
        quantized, capsys) -> None:
    assert main(["inspect", str(quantized["qdq-int8-channel"]), "--structured"]) == 0
    out = capsys.readouterr().out
    assert "is quantized (DequantizeLinear): remove channels from the float model" in out


SURVIVAL = {  # name -> onnxruntime quantizer settings
    "qdq per-channel symmetric int8": dict(quant_format="QDQ", per_channel=True,
                                           weight_type="QInt8"),
    "qoperator per-tensor int8": dict(quant_format="QOperator", per_channel=False,
                                      weight_type="QInt8"),
    "qdq per-tensor asymmetric uint8": dict(quant_format="QDQ", per_channel=False,
                                            weight_type="QUInt8", activation_type="QUInt8",
                                            extra_options={"WeightSymmetric": False}),
    "dynamic int8": dict(dynamic=True, weight_type="QInt8"),
}


@pytest.mark.parametrize("pattern", ["0.6", "2:4"])
@pytest.mark.parametrize("setting", list(SURVIVAL))
def test_pruned_zeros_survive_onnxruntime_quantization(setting, pattern, tmp_path) -> None:
    """Prune the float model, quantize it with onnxruntime's tools: every pruned weight is
    stored as exactly its zero point, and every 2:4 group keeps at most 2 other values."""
    q = quantization
    option = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    pruned, quantized_path = tmp_path / "p.onnx", tmp_path / "q.onnx"
    assert main(["prune", str(DIGITS), "-o", str(pruned), *option, "-q"]) == 0
    kwargs = dict(SURVIVAL[setting])
    types = {k: getattr(q.QuantType, kwargs.pop(k)) for k in ("weight_type", "activation_type")
             if k in kwargs}
    if kwargs.pop("dynamic", False):
        q.quantize_dynamic(str(pruned), str(quantized_path), **types)
    else:
        kwargs["quant_format"] = getattr(q.QuantFormat, kwargs["quant_format"])
        q.quantize_static(str(pruned), str(quantized_path), _digits_reader(), **types, **kwargs)
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(pruned).graph.initializer}
    loaded, targets = _targets(quantized_path)
    pruned_names = {t.name for t in discover_targets(onnx.load(pruned))[0]}
    targets = [t for t in targets if t.name.removesuffix("_quantized") in pruned_names]
    assert len(targets) == 2  # W1 and W2; W3 is below the default --min-size
    for target in targets:
        original = floats[target.name.removesuffix("_quantized")]
        grid = target.quant.grid(loaded.base_dir)
        ints = target.quant.to_ints(read_array(target.stored_tensor, loaded.base_dir))
        at_zero = ints == np.broadcast_to(grid.zero_point, ints.shape)
        assert at_zero[original == 0].all()  # no pruned weight lost
        if ":" in pattern:
            groups = np.moveaxis(~at_zero, target.reduction_axis, -1).reshape(-1, 4)
            assert (groups.sum(axis=1) <= 2).all()


def test_compact_of_an_asymmetric_int8_weight_stays_dense_with_a_warning(
        quantized, tmp_path, capsys) -> None:
    """Pruned weights of a grid whose zero point is not 0 are not zero bytes: compact would
    not be smaller, and the user is told how to get the small file."""
    report = tmp_path / "r.json"
    assert main(["prune", str(quantized["qdq-uint8-tensor"]), "-o", str(tmp_path / "o.onnx"),
                 "--format", "compact", "--report", str(report)]) == 0
    targets = json.loads(report.read_text())["targets"]
    assert targets and all(t["format"] == "dense" for t in targets)
    assert all("quantize with symmetric weights" in t["format_reason"] for t in targets)
    assert "zero points are not 0" in capsys.readouterr().err


# --- found by tools/fuzz.py --quantized: each failed before its fix -----------------------

def test_sequential_calibration_of_int4_weights_writes_their_packed_bytes(
        quantized, tmp_path) -> None:
    """Stage sessions replace a pruned int4 weight by its packed bytes (it was an internal
    error: the stage model wanted an int4 array)."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=PIXELS[:64])
    out = tmp_path / "p.onnx"
    assert main(["prune", str(quantized["qdq-int4-channel"]), "-o", str(out), "--method",
                 "sparsegpt", "--min-size", "100", "--calib", str(calib), "-q"]) == 0
    loaded, targets = _targets(out)
    for target in targets:
        grid = target.quant.grid(loaded.base_dir)
        ints = target.quant.to_ints(read_array(target.stored_tensor, loaded.base_dir))
        at_zero = ints == np.broadcast_to(grid.zero_point, ints.shape)
        assert at_zero.sum() >= prune_count(target.numel, 0.5)
    assert all(np.isfinite(o).all() for o in _run(out))


def _with_scale(source: Path, folder: Path, value: float) -> Path:
    model = onnx.load(source)
    tensor = next(t for t in model.graph.initializer if t.name == "W1_scale")
    scale = numpy_helper.to_array(tensor).copy()
    scale[0] = value
    tensor.CopyFrom(numpy_helper.from_array(scale, "W1_scale"))
    path = folder / f"scale-{value}.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("value", "words"), [(np.inf, "NaN or infinite"),
                                              (np.nan, "NaN or infinite"),
                                              (3e38, "overflow float32")])
def test_a_scale_that_makes_no_grid_is_refused_in_one_line(quantized, tmp_path, capsys,
                                                           value, words) -> None:
    path = _with_scale(quantized["qdq-int8-channel"], tmp_path, value)
    out = tmp_path / "o.onnx"
    assert main(["prune", str(path), "-o", str(out), "--min-size", "100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "DequantizeLinear" in err[0]
    assert not out.exists()


def test_zero_points_that_do_not_match_the_scales_are_skipped_with_the_reason() -> None:
    q = numpy_helper.from_array(np.ones((16, 8), np.int8), "Wq")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], axis=1),
         helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        [q, numpy_helper.from_array(np.ones(8, np.float32), "s"),
         numpy_helper.from_array(np.zeros(1, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, skipped = discover_targets(model, Selection(min_size=1))
    skip = next(s for s in skipped if s.name == "Wq")
    assert skip.cause is SkipCause.QUANTIZED_FORM
    assert skip.detail["why"] == "1 zero points for 8 scales"


def test_an_attribute_of_the_wrong_type_is_a_skip_not_a_crash() -> None:
    model = _unsupported_model("float zero points")
    node = model.graph.node[0]
    bits = next(a for a in node.attribute if a.name == "bits")
    node.attribute.remove(bits)
    node.attribute.append(helper.make_attribute("bits", [4]))  # a list where an int goes
    _, skipped = discover_targets(model, Selection(min_size=1))
    skip = next(s for s in skipped if s.name == "Wq")
    assert skip.detail == {"op": "MatMulNBits", "why": "its attribute bits is not an integer"}


def test_a_compact_description_that_lies_about_the_type_is_refused(quantized, tmp_path,
                                                                  capsys) -> None:
    compact = tmp_path / "c.onnx"
    assert main(["prune", str(quantized["qdq-int8-channel"]), "-o", str(compact),
                 "--min-size", "100", "--format", "compact", "-q"]) == 0
    model = onnx.load(compact)
    node = next(n for n in model.graph.node if n.doc_string.startswith("onnxprune:compact"))
    head, text = node.doc_string.split(" ", 1)
    description = json.loads(text)
    description["data_type"] = TensorProto.FLOAT  # the payload holds int8
    node.doc_string = head + " " + json.dumps(description)
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, damaged)
    assert main(["prune", str(damaged), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its description says float32, its values are int8" in err[0]


def test_restoring_a_2_4_model_compact_finds_the_n_m_form(quantized, tmp_path) -> None:
    """A model pruned 2:4 before (then quantized) and stored compact by a later run that
    prunes nothing (--sparsity 0) gets the N:M form, not the larger bitmask."""
    pruned, again = tmp_path / "p.onnx", tmp_path / "c.onnx"
    report = tmp_path / "r.json"
    assert main(["prune", str(quantized["qdq-int8-channel"]), "-o", str(pruned), "--pattern",
                 "2:4", "--min-size", "100", "-q"]) == 0
    assert main(["prune", str(pruned), "-o", str(again), "--sparsity", "0", "--format",
                 "compact", "--min-size", "100", "--report", str(report), "-q"]) == 0
    targets = json.loads(report.read_text())["targets"]
    formats = {t["name"]: t["format"] for t in targets}
    assert formats["W1_quantized"] == formats["W2_quantized"] == "compact-nm"
    assert all(t["zeros"] == t["zeros_before"] for t in targets)  # nothing more pruned


def _integers(path: Path) -> dict[str, np.ndarray]:
    """Every integer initializer of the model at `path`, by name."""
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}


@pytest.mark.parametrize("allocation", ["uniform", "erk"])
def test_sparsegpt_at_sparsity_0_changes_no_integer(allocation, tmp_path) -> None:
    """tools/fuzz.py --quantized --seed 21, case 932: a target planned at sparsity 0 (here
    every one, or the small last layer under erk) came out of sparsegpt with the weights of
    the inputs that never fired on the synthetic calibration samples set to their zero point
    (72 integers of W3_quantized), though nothing was to be pruned there."""
    path = _make("qdq-int4-channel", tmp_path)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    sparsity = "0" if allocation == "uniform" else "0.3"
    assert main(["prune", str(path), "-o", str(out), "--sparsity", sparsity, "--method",
                 "sparsegpt", "--allocation", allocation, "--min-size", "16", "--report",
                 str(report), "-q"]) == 0
    before, after = _integers(path), _integers(out)
    untouched = [t["name"] for t in json.loads(report.read_text())["targets"]
                 if t["requested_sparsity"] == 0]
    assert untouched  # the case this is about: some target planned at 0
    for name in untouched:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in set(before) - {t["name"] for t in json.loads(report.read_text())["targets"]}:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_sparsegpt_prunes_no_dead_input_when_it_prunes_nothing() -> None:
    """The kernel: a dead input (H_jj = 0) is zeroed only when the matrix loses weights."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 16))
    x[:, 3] = 0.0
    weights = rng.standard_normal((8, 16)).astype(np.float32)
    kept = sparsegpt_prune(weights, x.T @ x, sparsity=0.0)
    np.testing.assert_array_equal(kept, weights)
    assert (sparsegpt_prune(weights, x.T @ x, sparsity=0.25)[:, 3] == 0).all()



def test_a_dynamic_per_channel_weight_is_scored_with_its_scale_after_the_op(
        quantized, tmp_path) -> None:
    """quantize_dynamic per channel: MatMulInteger's weight scale sits in the Mul after it
    (op -> Cast -> Mul(., Mul(activation scale, weight scale))). The grid carries that
    scale, so magnitude compares (q - zero point) * scale, the float weights, across the
    output channels: nothing kept is smaller than what was pruned on that scale."""
    path = quantized["dynamic-matmul-channel"]
    before, targets = _targets(path)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    out = tmp_path / "p.onnx"
    assert main(["prune", str(path), "-o", str(out), "--sparsity", "0.7", "--min-size", "100",
                 "-q"]) == 0
    after, pruned = _targets(out)
    by_name = {t.name: t for t in pruned}
    for target in targets:
        scale = inits[target.name.replace("_quantized", "_scale")]
        zero = inits[target.name.replace("_quantized", "_zero_point")].astype(np.int32)
        assert scale.size > 1  # per channel: the case this test is for
        old = inits[target.name].astype(np.int32)
        values = np.abs((old - zero) * scale)  # computed here, not by onnxprune
        new = by_name[target.name].quant.to_ints(
            read_array(by_name[target.name].stored_tensor, after.base_dir))
        at_zero = new == zero
        assert int(at_zero.sum()) == prune_count(target.numel, 0.7)
        assert values[at_zero].max() <= values[~at_zero].min()


@pytest.mark.parametrize("attribute, value", [("strides", [1]), ("pads", [0, 0]),
                                              ("dilations", [1, 1, 1]), ("strides", [0, 0]),
                                              ("dilations", [0, 1]), ("pads", [-1, 0, 0, 0])])
def test_conv_attributes_that_do_not_fit_the_kernel_are_a_fallback_not_a_crash(
        quantized, tmp_path, capsys, attribute, value) -> None:
    """tools/fuzz.py --quantized --seed 47, case 87: onnxruntime runs a QLinearConv whose
    strides, pads or dilations do not fit its kernel (it checks them for Conv only), and
    the im2col of calibration raised. Such a layer is now pruned without calibration, with
    the reason, or the run stops in one line where onnxruntime refuses the graph of a
    calibration stage; never an internal error."""
    model = onnx.load(quantized["qoperator-conv"])
    node = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    for old in [a for a in node.attribute if a.name == attribute]:
        node.attribute.remove(old)
    node.attribute.append(helper.make_attribute(attribute, value))
    path, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    code = main(["prune", str(path), "-o", str(out), "--method", "sparsegpt", "--min-size",
                 "16"])
    err = capsys.readouterr().err
    assert "internal error" not in err
    assert f"its {attribute} do not fit" in err
    if code == 0:
        assert out.is_file()
    else:
        assert code == 2 and not out.exists()
        assert err.strip().splitlines()[-1].startswith("onnxprune: error: ")
