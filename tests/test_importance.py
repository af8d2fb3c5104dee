"""Wanda and OBD scores, per-row selection, and the error ordering of all calibrated methods."""

from __future__ import annotations

import naive_calib as naive
import numpy as np
import pytest
from conftest import calibrated_prune
from onnx import TensorProto, helper, numpy_helper

from onnxprune import kernels
from onnxprune.calib import load_calibration
from onnxprune.config import Pattern
from onnxprune.io import load_model
from onnxprune.kernels.obs_sweep import row_keep_mask
from onnxprune.methods.obd import obd_scores
from onnxprune.methods.wanda import wanda_scores
from onnxprune.patterns import prune_count
from onnxprune.patterns import row_keep_mask as per_row_keep_mask
from onnxprune.targets import Selection, discover_targets

RNG = np.random.default_rng(77)


def test_scores_match_twins():
    weights = RNG.standard_normal((5, 12)).astype(np.float32)
    x = RNG.standard_normal((40, 12)) * np.arange(1, 13)
    sq_norms = (x ** 2).sum(axis=0)
    np.testing.assert_allclose(wanda_scores(weights, sq_norms), naive.wanda_scores(weights, x),
                               rtol=1e-5)
    np.testing.assert_allclose(obd_scores(weights, sq_norms), naive.obd_scores(weights, x),
                               rtol=1e-5)


@pytest.mark.parametrize("case", ["random", "ties", "nan", "zeros"])
def test_row_keep_mask_matches_twin(case):
    scores = RNG.random((9, 16)).astype(np.float32)
    if case == "ties":
        scores = np.round(scores * 3).astype(np.float32)
    elif case == "nan":
        scores[RNG.random(scores.shape) < 0.2] = np.nan
    elif case == "zeros":
        scores[:] = 0
    for n_prune in (0, 5, 16):
        np.testing.assert_array_equal(row_keep_mask(scores, n_prune),
                                      naive.row_keep_mask(scores, n_prune))


def test_per_row_keep_mask_prunes_the_same_count_in_every_row():
    keep = per_row_keep_mask(RNG.random((3, 7, 30)).astype(np.float32), 0.4)
    assert (keep.reshape(-1, 30).sum(axis=1) == 30 - prune_count(30, 0.4)).all()


# ------------------------------------------------------------------ a model with real structure

def _structured_model(tmp_path):
    """An MLP (MatMul B, Gemm transB=1, MatMul B) and a grouped Conv, fed inputs with a few
    high-variance features, and saved with a calibration .npz of such inputs."""
    rng = np.random.default_rng(5)
    d, h = 64, 128
    scale = np.ones(d, np.float32)
    scale[rng.choice(d, 6, replace=False)] = 12.0
    w1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    w1[:, : h // 4] *= 4.0  # some hidden units fire far more than others
    w2 = (rng.standard_normal((h, h)) / np.sqrt(h)).astype(np.float32)
    w3 = (rng.standard_normal((h, 32)) / np.sqrt(h)).astype(np.float32)
    conv = (rng.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32)
    bias = rng.standard_normal(h).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2"], ["h2"], transB=1),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["y"]),
        helper.make_node("Conv", ["img", "wc"], ["c"], group=2, pads=[1, 1, 1, 1],
                         strides=[2, 1]),
    ]
    graph = helper.make_graph(
        nodes, "structured",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d]),
         helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 8, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, n) for w, n in
         ((w1, "w1"), (w2.T.copy(), "w2"), (w3, "w3"), (conv, "wc"), (bias, "b1"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "structured.onnx"
    path.write_bytes(model.SerializeToString())
    channel_scale = np.array([1, 1, 8, 1, 1, 1, 1, 8], np.float32)[None, :, None, None]
    np.savez(tmp_path / "calib.npz",
             x=(rng.standard_normal((12, 48, d)) * scale).astype(np.float32),
             img=(rng.standard_normal((12, 1, 8, 10, 10)) * channel_scale).astype(np.float32))
    return path, tmp_path / "calib.npz"


@pytest.fixture(scope="module")
def structured(tmp_path_factory):
    return _structured_model(tmp_path_factory.mktemp("structured"))


def _errors(path, calib, method, pattern):
    loaded = load_model(path)
    pattern = Pattern.parse(pattern)
    targets, _ = discover_targets(loaded.proto, Selection(min_size=1, pattern=pattern))
    feeds = load_calibration(calib, loaded.proto, samples=None, seed=0)
    results = calibrated_prune(loaded, targets, feeds, method=method, pattern=pattern,
                                     sparsity=0.5)
    return targets, results


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_error_order_sparsegpt_wanda_magnitude(structured, pattern):
    path, calib = structured
    errors = {}
    for method in ("magnitude", "wanda", "obd", "sparsegpt"):
        targets, results = _errors(path, calib, method, pattern)
        errors[method] = {name: r.reconstruction_error for name, r in results.items()}
        for target in targets:
            weights = results[target.name].weights
            matrix = np.ascontiguousarray(target.to_matrix(weights), dtype=np.float32)
            if pattern == "2:4":
                assert kernels.nm_violations(matrix, 2, 4) == 0
                assert results[target.name].zeros == target.numel // 2
            elif method == "wanda":
                rows = weights if target.op_type != "Conv" else weights.reshape(16, -1)
                rows = rows.T if target.reduction_axis == 0 else rows
                assert ((rows == 0).sum(axis=1) == rows.shape[1] // 2).all()
            else:
                assert results[target.name].zeros == target.numel // 2
    for name in errors["magnitude"]:
        sparsegpt, wanda = errors["sparsegpt"][name], errors["wanda"][name]
        obd, magnitude = errors["obd"][name], errors["magnitude"][name]
        assert sparsegpt <= wanda <= magnitude, (name, errors)
        assert sparsegpt <= obd <= magnitude, (name, errors)
        if pattern == "2:4":
            assert wanda == pytest.approx(obd)  # within-group comparisons coincide


def test_error_is_measured_on_the_layer_output(structured):
    """The reported error equals ‖XWᵀ − XŴᵀ‖²/‖XWᵀ‖² recomputed from the raw inputs."""
    path, calib = structured
    _, results = _errors(path, calib, "wanda", "unstructured")
    dense = load_model(path)
    feeds = load_calibration(calib, dense.proto, samples=None, seed=0)
    x = np.concatenate([f["x"] for f in feeds])
    from onnxprune.io import read_array

    w1 = read_array(next(t for t in dense.proto.graph.initializer if t.name == "w1"),
                    dense.base_dir)
    assert results["w1"].reconstruction_error == pytest.approx(
        naive.output_error(w1.T, results["w1"].weights.T, x), rel=1e-4)
