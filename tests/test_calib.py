"""Calibration inputs, activation capture through onnxruntime, and the staged (sequential) runs."""

from __future__ import annotations

import logging

import naive_calib as naive
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import REAL_MODELS, calibrated_prune, real_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calib import (
    ActivationCapture,
    ActivationStats,
    ConvInput,
    GraphIndex,
    MatrixInput,
    layer_inputs,
    load_calibration,
    target_view,
)
from onnxprune.config import Pattern
from onnxprune.errors import CalibrationError
from onnxprune.io import load_model, model_from_proto, read_array, write_array
from onnxprune.targets import Selection, discover_targets

RNG = np.random.default_rng(1234)


def _model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feed: dict, names: list[str]) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        if name not in [o.name for o in probe.graph.output]:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feed)


def _captured(model: onnx.ModelProto, feeds: list[dict], sequential=True):
    """Per target: (view, statistics) captured through the stages, pruning nothing."""
    loaded = model_from_proto(model)
    targets, _ = discover_targets(model, Selection(min_size=1))
    index = GraphIndex(model)
    views = [target_view(t, index) for t in targets]
    assert all(not isinstance(v, str) for v in views), views
    capture = ActivationCapture(loaded, index, views, feeds, sequential=sequential)
    out = {}
    for stage in capture.stages():
        for view in stage.views:
            out[view.target.name] = (view, capture.stats_of(view))
    return out


# ------------------------------------------------------------------ inputs


def _mlp_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "w")
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )


def test_load_calibration_synthetic_fallback_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        feeds = load_calibration(None, _mlp_model(), samples=3, seed=5)
    assert len(feeds) == 3 and feeds[0]["x"].shape == (1, 8)
    assert "synthetic" in caplog.text
    again = load_calibration(None, _mlp_model(), samples=3, seed=5)
    np.testing.assert_array_equal(feeds[2]["x"], again[2]["x"])


def test_load_calibration_npz_stacked_batch_and_folder(tmp_path):
    model = _mlp_model()
    stacked = RNG.standard_normal((5, 2, 8)).astype(np.float32)
    np.savez(tmp_path / "stacked.npz", x=stacked)
    feeds = load_calibration(tmp_path / "stacked.npz", model, samples=None, seed=0)
    assert len(feeds) == 5 and feeds[4]["x"].shape == (2, 8)
    assert len(load_calibration(tmp_path / "stacked.npz", model, samples=2, seed=0)) == 2
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=RNG.standard_normal((4, 8)).astype(np.float32))
    feeds = load_calibration(folder, model, samples=None, seed=0)
    assert len(feeds) == 3 and feeds[0]["x"].shape == (4, 8)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((2, 8), np.float32)}, "missing input"),
        ({"x": np.zeros((2, 8), np.int16)}, "dtype int16"),
        ({"x": np.zeros((2, 5), np.float32)}, "does not match"),
    ],
)
def test_load_calibration_errors_are_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationError, match=message) as info:
        load_calibration(tmp_path / "bad.npz", _mlp_model(), samples=None, seed=0)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ capture: MatMul / Gemm


def test_matmul_with_batch_dims_capture_equals_gram_and_layer_output():
    w = RNG.standard_normal((6, 5)).astype(np.float32)
    model = _model(
        [helper.make_node("MatMul", ["a", "w"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3, 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    feeds = [{"a": RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)} for _ in range(3)]
    view, stats = _captured(model, feeds)["w"]
    x = np.concatenate([f["a"].reshape(-1, 6) for f in feeds])
    np.testing.assert_allclose(stats.hessian[0], naive.gram(x), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats.sq_norms[0], (x.astype(np.float64) ** 2).sum(0), rtol=1e-5)
    assert stats.tokens == 3 * 24
    # W2·Xᵀ is the layer's own output
    w2 = view.to_obs(w)[0]
    (y,) = _run(model, feeds[0], ["y"])
    got = layer_inputs(view.inputs[0][1], feeds[0]["a"])[0] @ w2.T
    np.testing.assert_allclose(got, y.reshape(-1, 5), rtol=1e-5, atol=1e-5)


def test_weight_as_matmul_a_and_gemm_transposes():
    w_a = RNG.standard_normal((7, 6)).astype(np.float32)  # MatMul(w_a [M, K], b [.., K, N])
    w_g = RNG.standard_normal((5, 7)).astype(np.float32)  # Gemm(transA=1, B=w_g, transB=1)
    w_h = RNG.standard_normal((3, 5)).astype(np.float32)  # Gemm(A=w_h, B=act, transB=0)
    nodes = [
        helper.make_node("MatMul", ["w_a", "b"], ["m"]),  # [7, 4]
        helper.make_node("Gemm", ["m", "w_g"], ["g"], transA=1, transB=1),  # [4, 5]
        helper.make_node("Transpose", ["g"], ["gt"], perm=[1, 0]),  # [5, 4]
        helper.make_node("Gemm", ["w_h", "gt"], ["y"]),  # [3, 4]
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(w_a, "w_a"),
            numpy_helper.from_array(w_g, "w_g"),
            numpy_helper.from_array(w_h, "w_h"),
        ],
    )
    feeds = [{"b": RNG.standard_normal((6, 4)).astype(np.float32)} for _ in range(2)]
    captured = _captured(model, feeds)
    m, g, gt, y = _run(model, feeds[0], ["m", "g", "gt", "y"])
    cases = {"w_a": (feeds[0]["b"], w_a, m.T), "w_g": (m, w_g, g), "w_h": (gt, w_h, y.T)}
    for name, (activation, weight, output) in cases.items():
        view, stats = captured[name]
        x = layer_inputs(view.inputs[0][1], activation)[0]
        np.testing.assert_allclose(
            x @ view.to_obs(weight)[0].T, output, rtol=1e-5, atol=1e-5, err_msg=name
        )
        assert stats.tokens == 2 * x.shape[0]
    view, stats = captured["w_a"]
    x = np.concatenate([f["b"].T for f in feeds])
    np.testing.assert_allclose(stats.hessian[0], naive.gram(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ capture: Conv (im2col)

CONV_CASES = [
    # kernel, strides, dilations, pads, group, auto_pad, spatial
    ((3, 3), (2, 2), (1, 1), (1, 0, 2, 1), 2, "NOTSET", (9, 8)),
    ((3, 2), (1, 2), (2, 1), (0, 0, 0, 0), 1, "NOTSET", (8, 7)),
    ((3, 3), (2, 2), (1, 1), None, 4, "SAME_UPPER", (7, 6)),
    ((2, 3), (2, 1), (1, 1), None, 1, "SAME_LOWER", (5, 8)),  # ORT: no dilation with SAME
    ((3, 3), (1, 1), (1, 1), None, 2, "VALID", (6, 6)),
    ((5,), (3,), (2,), (2, 3), 2, "NOTSET", (20,)),  # Conv1d
]


@pytest.mark.parametrize("kernel, strides, dilations, pads, group, auto_pad, spatial", CONV_CASES)
def test_conv_im2col_matches_onnxruntime_and_loops(
    kernel, strides, dilations, pads, group, auto_pad, spatial
):
    channels, out_channels = 8, 6 if group != 4 else 8
    weight = RNG.standard_normal((out_channels, channels // group, *kernel)).astype(np.float32)
    attrs = dict(strides=list(strides), dilations=list(dilations), group=group)
    if auto_pad == "NOTSET":
        attrs["pads"] = list(pads)
    else:
        attrs["auto_pad"] = auto_pad
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    feeds = [
        {"x": RNG.standard_normal((2, channels, *spatial)).astype(np.float32)} for _ in range(2)
    ]
    view, stats = _captured(model, feeds)["w"]
    layout = view.inputs[0][1]
    assert isinstance(layout, ConvInput) and view.groups == group
    (y,) = _run(model, feeds[0], ["y"])
    xs = layer_inputs(layout, feeds[0]["x"])
    obs = view.to_obs(weight)
    per_group = out_channels // group
    for g in range(group):
        got = xs[g] @ obs[g].T  # [batch * positions, O/g]
        want = np.moveaxis(y[:, g * per_group : (g + 1) * per_group], 1, -1).reshape(-1, per_group)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(view.from_obs(obs), weight)
    # the loops twin, with the pads onnxruntime's geometry implies
    _, begin, end = layout.geometry(spatial)
    slow = naive.im2col(feeds[0]["x"], kernel, strides, dilations, begin, end, group)
    for g in range(group):
        np.testing.assert_allclose(xs[g], slow[g], rtol=0, atol=0)
    both = [layer_inputs(layout, f["x"]) for f in feeds]
    for g in range(group):
        x = np.concatenate([b[g] for b in both])
        np.testing.assert_allclose(stats.hessian[g], naive.gram(x), rtol=1e-5, atol=1e-4)


def test_conv_obs_columns_put_nm_groups_on_input_channels():
    """M consecutive OBS columns are M consecutive input channels at one kernel offset."""
    weight = np.arange(2 * 8 * 2 * 2, dtype=np.float32).reshape(2, 8, 2, 2)
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    targets, _ = discover_targets(model, Selection(min_size=1))
    view = target_view(targets[0], GraphIndex(model))
    row = view.to_obs(weight)[0, 1]
    for offset in range(4):
        kh, kw = divmod(offset, 2)
        np.testing.assert_array_equal(row[offset * 8 : (offset + 1) * 8], weight[1, :, kh, kw])


def test_large_conv_input_is_chunked(monkeypatch):
    import onnxprune.calib.layouts as layouts

    monkeypatch.setattr(layouts, "CHUNK_ELEMENTS", 500)
    layout = MatrixInput(4)
    assert len(list(layout.rows(np.zeros((1000, 4), np.float32)))) == 8
    conv = ConvInput(2, 1, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    chunks = list(conv.rows(RNG.standard_normal((1, 2, 10, 10)).astype(np.float32)))
    assert len(chunks) > 1 and sum(c.shape[0] for _, c in chunks) == 100


def test_stats_diag_only_and_merge():
    x = RNG.standard_normal((50, 6)).astype(np.float32)
    diag_only = ActivationStats(1, 6, hessian=False)
    full = ActivationStats(1, 6, hessian=True)
    for start in range(0, 50, 7):
        diag_only.add(0, x[start : start + 7])
        full.add(0, x[start : start + 7])
    np.testing.assert_allclose(diag_only.sq_norms, full.sq_norms, rtol=1e-5)
    full.merge(full)
    assert full.tokens == 100


# ------------------------------------------------------------------ sequential stages


def test_sequential_capture_sees_the_already_pruned_model(models_dir):
    """Each target's captured H equals XᵀX of its input in the final pruned model."""
    loaded = load_model(models_dir / "transformer.onnx")
    targets, _ = discover_targets(loaded.proto)
    index = GraphIndex(loaded.proto)
    views = [target_view(t, index) for t in targets]
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 512, (1, 12), dtype=np.int64)} for _ in range(3)]
    capture = ActivationCapture(loaded, index, views, feeds, sequential=True)
    # q/k/v share one level; o_proj, fc1, fc2 and lm_head each come after the previous one
    assert capture.levels == 5
    hessians = {}
    for stage in capture.stages():
        for view in stage.views:
            hessians[view.target.name] = (view, capture.stats_of(view).hessian[0])
            weights = read_array(view.target.tensor, loaded.base_dir, writable=True)
            weights[np.abs(weights) < np.median(np.abs(weights))] = 0  # prune something
            write_array(view.target.tensor, weights)
            capture.release(view)
    for name, (view, hessian) in hessians.items():
        activation = view.inputs[0][0]
        xs = [
            layer_inputs(view.inputs[0][1], _run(loaded.proto, f, [activation])[0])[0]
            for f in feeds
        ]
        np.testing.assert_allclose(
            hessian, naive.gram(np.concatenate(xs)), rtol=1e-4, atol=1e-3, err_msg=name
        )


def test_one_pass_uses_the_dense_model(models_dir):
    loaded = load_model(models_dir / "mlp.onnx")
    dense = onnx.ModelProto()
    dense.CopyFrom(loaded.proto)
    targets, _ = discover_targets(loaded.proto)
    feeds = [{"x": RNG.standard_normal((4, 256)).astype(np.float32)} for _ in range(2)]
    index = GraphIndex(loaded.proto)
    views = [target_view(t, index) for t in targets]
    capture = ActivationCapture(loaded, index, views, feeds, sequential=False)
    assert capture.levels == 1
    (stage,) = list(capture.stages())
    view = next(v for v in stage.views if v.target.name == "fc3.weight")
    activation = view.inputs[0][0]
    x = np.concatenate([_run(dense, f, [activation])[0] for f in feeds])
    np.testing.assert_allclose(
        capture.stats_of(view).hessian[0], naive.gram(x), rtol=1e-4, atol=1e-3
    )


def test_shared_weight_sums_both_consumers():
    w = RNG.standard_normal((6, 6)).astype(np.float32)
    model = _model(
        [
            helper.make_node("MatMul", ["a", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"]),
        ],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    feeds = [{"a": RNG.standard_normal((5, 6)).astype(np.float32)}]
    view, stats = _captured(model, feeds)["w"]
    (r,) = _run(model, feeds[0], ["r"])
    np.testing.assert_allclose(
        stats.hessian[0], naive.gram(feeds[0]["a"]) + naive.gram(r), rtol=1e-5, atol=1e-5
    )
    assert stats.tokens == 10


def _three_layer_model(w1, w2, w3) -> onnx.ModelProto:
    """x -> MatMul w1 (initializer) -> Relu -> MatMul w2 (Constant node) -> Relu -> MatMul w3
    (initializer, read through a Transpose): three sequential levels."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
            helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("Transpose", ["w3"], ["w3t"], perm=[1, 0]),
            helper.make_node("MatMul", ["r2", "w3t"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w3, "w3")],
    )


def _layer_weights():
    w1, w2 = (RNG.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    return w1, w2, RNG.standard_normal((4, 8)).astype(np.float32)


def _fill_stored(model: onnx.ModelProto, name: str, value: float) -> None:
    """Overwrite a stored tensor of `model` in place (initializer or Constant value)."""
    targets, _ = discover_targets(model, Selection(min_size=1))
    (target,) = [t for t in targets if t.name == name]
    write_array(target.tensor, np.full(target.shape, value, np.float32))


def _capture_stats(model, feeds, weights=None, prune_into=None) -> dict[str, tuple]:
    """(tokens, H) per target; `prune_into` ("proto" or "weights") zeroes the small half of
    each target after its stage, where later stages must see it."""
    loaded = model_from_proto(model)
    targets, _ = discover_targets(model, Selection(min_size=1))
    index = GraphIndex(model)
    views = [target_view(t, index) for t in targets]
    capture = ActivationCapture(loaded, index, views, feeds, weights=weights)
    assert capture.levels == 3
    out = {}
    for stage in capture.stages():
        for view in stage.views:
            stats = capture.stats_of(view)
            out[view.target.name] = (stats.tokens, stats.hessian.copy())
            if prune_into is not None:
                dense = read_array(view.target.tensor, loaded.base_dir).copy()
                dense[np.abs(dense) < np.median(np.abs(dense))] = 0
                if prune_into == "proto":
                    write_array(view.target.tensor, dense)
                else:
                    weights[view.target.tensor_name] = dense
    return out


def _assert_same_stats(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for name, (tokens, hessian) in expected.items():
        assert actual[name][0] == tokens
        np.testing.assert_array_equal(actual[name][1], hessian, err_msg=name)


@pytest.mark.parametrize("replaced", ["w1", "w2"])
def test_capture_weights_replace_the_stored_tensor(replaced):
    """weights={name: zeros} captures what a model with that tensor zeroed captures, for an
    initializer and a Constant node, while the model's own tensor is never read."""
    feeds = [{"x": RNG.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]
    w1, w2, w3 = _layer_weights()
    zeroed = _three_layer_model(w1, w2, w3)
    _fill_stored(zeroed, replaced, 0.0)
    expected = _capture_stats(zeroed, feeds)
    stale = _three_layer_model(w1, w2, w3)
    _fill_stored(stale, replaced, np.nan)  # what the proto holds must not matter
    shape = (8, 8)
    actual = _capture_stats(stale, feeds, weights={replaced: np.zeros(shape, np.float32)})
    _assert_same_stats(expected, actual)
    untouched = _capture_stats(_three_layer_model(w1, w2, w3), feeds)
    assert not np.array_equal(untouched["w3"][1], expected["w3"][1])  # the zeros mattered


def test_capture_weights_added_between_stages_match_pruning_the_proto():
    """Streaming: each pruned target goes into `weights` instead of the proto, whose
    tensors stay dense; later stages must see the pruned arrays all the same."""
    feeds = [{"x": RNG.standard_normal((5, 8)).astype(np.float32)} for _ in range(3)]
    layers = _layer_weights()
    expected = _capture_stats(_three_layer_model(*layers), feeds, prune_into="proto")
    weights: dict[str, np.ndarray] = {}
    actual = _capture_stats(_three_layer_model(*layers), feeds, weights=weights,
                            prune_into="weights")
    assert sorted(weights) == ["w1", "w2", "w3"]
    _assert_same_stats(expected, actual)
    dense = _capture_stats(_three_layer_model(*layers), feeds)
    assert not np.array_equal(dense["w3"][1], expected["w3"][1])  # pruning mattered


def test_capture_weights_must_match_the_tensor_they_replace():
    feeds = [{"x": RNG.standard_normal((5, 8)).astype(np.float32)}]
    model = _three_layer_model(*_layer_weights())
    with pytest.raises(ValueError, match=r"weights\['w1'\] is float64\[8, 8\]"):
        _capture_stats(model, feeds, weights={"w1": np.zeros((8, 8))})
    with pytest.raises(ValueError, match="replaces no initializer or Constant"):
        _capture_stats(model, feeds, weights={"r1": np.zeros((5, 8), np.float32)})


def test_external_data_model_is_calibrated_in_place(tmp_path, models_dir):
    proto = onnx.load(str(models_dir / "mlp.onnx"))
    onnx.save(
        proto,
        str(tmp_path / "mlp.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="mlp.data",
        size_threshold=0,
    )
    loaded = load_model(tmp_path / "mlp.onnx")
    assert loaded.uses_external_data
    targets, _ = discover_targets(loaded.proto)
    feeds = [{"x": RNG.standard_normal((8, 256)).astype(np.float32)} for _ in range(2)]
    results = calibrated_prune(
        loaded, targets, feeds, method="sparsegpt", pattern="unstructured", sparsity=0.5
    )
    assert all(r.method == "sparsegpt" for r in results.values())
    assert all(r.zeros >= r.weights.size // 2 for r in results.values())


def test_file_to_file_calibration_reads_lazily_and_matches_in_memory(tmp_path, models_dir):
    """prune(path, output) loads lazily (tensors stay in the file); same weights as a proto."""
    from onnxprune import api

    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=RNG.integers(0, 512, (4, 1, 16), dtype=np.int64))
    source = models_dir / "transformer.onnx"
    options = dict(method="sparsegpt", pattern="2:4", calib=str(calib))
    _, report = api.prune(source, output=tmp_path / "file.onnx", **options)
    in_memory, _ = api.prune(onnx.load(str(source)), **options)
    assert {t.method for t in report.targets} == {"sparsegpt"}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    written = {t.name: numpy_helper.to_array(t)
               for t in onnx.load(str(tmp_path / "file.onnx")).graph.initializer}
    expected = {t.name: numpy_helper.to_array(t) for t in in_memory.graph.initializer}
    assert written.keys() == expected.keys()
    for name, array in expected.items():
        assert written[name].tobytes() == array.tobytes(), name
    changed = [name for name in expected if expected[name].tobytes() != original[name].tobytes()]
    assert len(changed) == len(report.targets) >= 4


# ------------------------------------------------------------------ real exports


def test_paddle_cnn_with_constant_node_weights(caplog):
    path = real_model("ppocr_cls")
    loaded = load_model(path)
    targets, _ = discover_targets(loaded.proto, Selection(pattern=Pattern(2, 4)))
    assert any(t.source == "constant_node" for t in targets)
    rng = np.random.default_rng(0)
    feeds = [REAL_MODELS["ppocr_cls"].make_feeds(rng) for _ in range(2)]
    results = calibrated_prune(loaded, targets, feeds, method="wanda", pattern="2:4")
    assert all(r.method == "wanda" and r.reconstruction_error is not None for r in results.values())
    session = ort.InferenceSession(
        loaded.proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert np.isfinite(session.run(None, feeds[0])[0]).all()


def test_subgraph_weights_fall_back_to_magnitude(caplog):
    path = real_model("silero_vad")
    loaded = load_model(path)
    targets, _ = discover_targets(loaded.proto)
    feeds = [REAL_MODELS["silero_vad"].make_feeds(np.random.default_rng(0))]
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        results = calibrated_prune(
            loaded, targets, feeds, method="sparsegpt", pattern="unstructured"
        )
    assert all(r.method == "magnitude" and "subgraph" in r.note for r in results.values())
    assert "pruned by magnitude" in caplog.text


@pytest.mark.slow
def test_torch_dynamo_export_is_calibrated(tmp_path):
    """A transformer block exported by torch.onnx.export(dynamo=True): MatMul B [K, N]."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)
            self.norm = torch.nn.LayerNorm(64)
            self.fc1 = torch.nn.Linear(64, 128)
            self.fc2 = torch.nn.Linear(128, 64)

        def forward(self, x):
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))

    torch.manual_seed(0)
    path = tmp_path / "block.onnx"
    seq = torch.export.Dim("seq", min=2, max=64)
    torch.onnx.export(Block().eval(), (torch.randn(1, 8, 64),), str(path), dynamo=True,
                      input_names=["x"], dynamic_shapes={"x": {1: seq}})
    onnx.save(onnx.load(str(path)), str(path))  # inline, so the test can run it from bytes
    loaded = load_model(path)
    targets, _ = discover_targets(loaded.proto)
    assert {"MatMul", "Gemm"} & {t.op_type for t in targets}
    feeds = [{"x": RNG.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(4)]
    reference = _run(loaded.proto, feeds[0], [loaded.proto.graph.output[0].name])[0]
    results = calibrated_prune(loaded, targets, feeds, method="sparsegpt", pattern="2:4")
    assert all(r.method == "sparsegpt" for r in results.values())
    pruned = _run(loaded.proto, feeds[0], [loaded.proto.graph.output[0].name])[0]
    assert np.isfinite(pruned).all() and not np.allclose(pruned, reference)
