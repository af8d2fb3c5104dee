"""`--method l1`: the proximal L1 step, checked against a naive soft-threshold twin."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main


def matmul_model(weights: np.ndarray) -> onnx.ModelProto:
    """Y = X @ W with W [K, N] an initializer (reduction axis 0)."""
    k, n = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weights, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def naive_soft_threshold(weights: np.ndarray, count: int,
                         alive: np.ndarray | None = None) -> np.ndarray:
    """τ = the count-th smallest |w| (earlier-masked weights first, as zeros); then
    sign(w) · max(|w| − τ, 0), and the earlier mask kept."""
    alive = np.ones(weights.shape, bool) if alive is None else alive
    magnitudes = np.where(alive, np.abs(weights), -1.0).ravel()
    order = np.argsort(magnitudes, kind="stable")
    threshold = max(float(magnitudes[order[count - 1]]), 0.0) if count else 0.0
    shrunk = np.sign(weights) * np.maximum(np.abs(weights) - np.float32(threshold), 0)
    return np.where(alive, shrunk, 0).astype(weights.dtype)


def naive_nm_soft_threshold(weights: np.ndarray, n: int, m: int) -> np.ndarray:
    """Per group of m along axis 0 of W [K, N]: keep the n largest |w|, shrink by the
    largest pruned |w| of the group."""
    out = np.zeros_like(weights)
    for col in range(weights.shape[1]):
        for start in range(0, weights.shape[0], m):
            group = weights[start:start + m, col]
            order = np.argsort(-np.abs(group), kind="stable")
            tau = np.abs(group[order[n:]]).max()
            kept = order[:n]
            out[start + kept, col] = (np.sign(group[kept])
                                      * np.maximum(np.abs(group[kept]) - tau, 0))
    return out


def pruned_weights(model: onnx.ModelProto, **options) -> tuple[np.ndarray, object]:
    pruned, report = onnxprune.prune(model, min_size=0, method="l1", **options)
    return numpy_helper.to_array(pruned.graph.initializer[0]), report


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_matches_naive_soft_threshold(sparsity):
    weights = np.random.default_rng(1).standard_normal((64, 48)).astype(np.float32)
    result, report = pruned_weights(matmul_model(weights), sparsity=sparsity)
    count = int(np.floor(sparsity * weights.size + 0.5))
    expected = naive_soft_threshold(weights, count)
    assert np.array_equal(result, expected)
    assert report.targets[0].zeros == count
    kept = result != 0
    assert np.array_equal(np.sign(result[kept]), np.sign(weights[kept]))  # sign kept
    if count:  # every survivor lost exactly the same magnitude
        shrink = np.abs(weights[kept]) - np.abs(result[kept])
        assert np.allclose(shrink, shrink[0], atol=1e-6) and shrink[0] > 0


def test_nm_pattern_has_a_threshold_per_group():
    weights = np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32)
    result, report = pruned_weights(matmul_model(weights), pattern="2:4")
    assert np.array_equal(result, naive_nm_soft_threshold(weights, 2, 4))
    assert report.targets[0].meets_plan is True


def test_existing_mask_is_kept_and_does_not_set_the_threshold():
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((64, 32)).astype(np.float32)
    alive = rng.random(weights.shape) > 0.2
    weights[~alive] *= 100  # large masked values: they must neither survive nor set τ
    count = int(np.floor(0.6 * weights.size + 0.5))
    result, _ = pruned_weights(matmul_model(weights), sparsity=0.6,
                               masks={"W": alive}, fixed_masks=False)
    assert np.array_equal(result, naive_soft_threshold(weights, count, alive))
    assert not result[~alive].any()


def test_float16_and_global_scope():
    weights = np.random.default_rng(4).standard_normal((64, 64)).astype(np.float16)
    result, report = pruned_weights(matmul_model(weights), sparsity=0.5, scope="global")
    assert result.dtype == np.float16
    assert report.targets[0].zeros >= weights.size // 2
    kept = result != 0
    assert np.all(np.abs(result[kept]) < np.abs(weights[kept]))


def test_cli_runs_without_calibration(tmp_path, capsys, caplog):
    weights = np.random.default_rng(5).standard_normal((128, 64)).astype(np.float32)
    source = tmp_path / "m.onnx"
    onnx.save(matmul_model(weights), source)
    out = tmp_path / "out.onnx"
    status = main(["prune", str(source), "-o", str(out), "--method", "l1",
                   "--sparsity", "0.75", "--min-size", "0"])
    assert status == 0
    result = numpy_helper.to_array(onnx.load(out).graph.initializer[0])
    assert np.array_equal(result, naive_soft_threshold(weights, 6144))
    assert "calib" not in capsys.readouterr().err
