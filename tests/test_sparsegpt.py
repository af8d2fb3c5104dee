"""SparseGPT: the blocked, lazy, numba sweep against the textbook loop, patterns, numerics."""

from __future__ import annotations

import logging

import naive_calib as naive
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import calibrated_prune
from onnx import TensorProto, helper, numpy_helper

from onnxprune import kernels
from onnxprune.calib import load_calibration
from onnxprune.config import Pattern
from onnxprune.io import load_model, model_from_proto
from onnxprune.kernels.obs_sweep import obs_sweep_block
from onnxprune.methods.sparsegpt import inverse_cholesky_upper, sparsegpt_prune
from onnxprune.patterns import prune_count
from onnxprune.targets import Selection, discover_targets


def _problem(rows, cols, tokens=400, seed=0, dead=()):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, cols)) * np.exp(rng.normal(0, 1, cols))
    x[:, list(dead)] = 0.0
    weights = rng.standard_normal((rows, cols)).astype(np.float32)
    return weights, x.T @ x, x


@pytest.mark.parametrize(
    "rows, cols, keep_n, group_m, block",
    [
        (16, 64, 0, 0, 16),  # unstructured, several blocks: the lazy update matters
        (9, 40, 0, 0, 128),  # one partial block
        (16, 64, 2, 4, 16),
        (8, 48, 4, 8, 16),
        (6, 24, 1, 3, 4),  # block rounded up to a multiple of M
    ],
)
def test_matches_textbook_loop(rows, cols, keep_n, group_m, block):
    weights, hessian, _ = _problem(rows, cols, dead=(3,))
    fast = sparsegpt_prune(
        weights, hessian, sparsity=0.5, keep_n=keep_n, group_m=group_m, block_size=block
    )
    slow = naive.sparsegpt(weights, hessian, 0.5, keep_n, group_m, block)
    np.testing.assert_array_equal(fast == 0, slow == 0)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    assert (fast[:, 3] == 0).all()  # a dead input's weights go


@pytest.mark.parametrize("keep_n, group_m", [(0, 0), (2, 4)])
def test_rounding_onto_a_grid_matches_the_textbook_loop(keep_n, group_m):
    """Joint sparsification and quantization: the kernel's rounding of kept weights (and
    the spread of its error) equals the plain loop's, up to float32 against float64."""
    weights, hessian, _ = _problem(12, 48, dead=(5,))
    scale = np.broadcast_to((np.abs(weights).max(1, keepdims=True) / 7).astype(np.float32),
                            weights.shape).copy()
    zero = np.zeros(weights.shape, np.float32)
    zero[::2] = 1.0  # some rows with a zero point away from 0
    grid = (scale, zero, -8, 7)
    fast = sparsegpt_prune(weights, hessian, sparsity=0.5, keep_n=keep_n, group_m=group_m,
                           block_size=16, grid=grid)
    slow = naive.sparsegpt(weights, hessian, 0.5, keep_n, group_m, 16, grid=grid)
    np.testing.assert_array_equal(fast == 0, slow == 0)
    on_grid = np.clip(np.rint(fast / scale) + zero, -8, 7)
    np.testing.assert_allclose((on_grid - zero) * scale, fast, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_inverse_cholesky_matches_explicit_inverse():
    _, hessian, _ = _problem(4, 50)
    upper = inverse_cholesky_upper(hessian, 0.01)
    np.testing.assert_allclose(
        upper, naive.inverse_cholesky_upper(hessian, 0.01), rtol=1e-8, atol=1e-12
    )
    assert np.allclose(upper, np.triu(upper))


def test_not_positive_definite_raises_damping(caplog):
    hessian = np.diag([1.0, 1.0, -0.5])
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        upper = inverse_cholesky_upper(hessian, 0.01)
    assert np.isfinite(upper).all() and "damping raised" in caplog.text
    # rank-deficient but PSD (fewer tokens than inputs): plain damping suffices
    _, low_rank, _ = _problem(4, 30, tokens=5)
    assert np.isfinite(inverse_cholesky_upper(low_rank, 0.01)).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_count_is_exact_per_layer(sparsity):
    weights, hessian, _ = _problem(7, 37)
    pruned = sparsegpt_prune(weights, hessian, sparsity=sparsity, block_size=8)
    assert np.count_nonzero(pruned == 0) == prune_count(weights.size, sparsity)


@pytest.mark.parametrize("keep_n, group_m", [(2, 4), (4, 8), (1, 4)])
def test_nm_is_exact(keep_n, group_m):
    weights, hessian, _ = _problem(12, 64)
    pruned = np.ascontiguousarray(sparsegpt_prune(weights, hessian, keep_n=keep_n, group_m=group_m))
    assert kernels.nm_violations(pruned, keep_n, group_m) == 0
    assert np.count_nonzero(pruned == 0) == weights.size * (group_m - keep_n) // group_m


def test_reconstruction_beats_plain_masking():
    weights, hessian, x = _problem(32, 64, tokens=1000)
    pruned = sparsegpt_prune(weights, hessian, sparsity=0.5)
    keep = np.abs(weights) >= np.median(np.abs(weights))
    assert naive.output_error(weights, pruned, x) < 0.5 * naive.output_error(
        weights, weights * keep, x
    )


def test_sweep_kernel_rejects_bad_arguments():
    block = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError):
        obs_sweep_block(
            block.astype(np.float64),
            np.eye(4, dtype=np.float32),
            np.zeros((2, 4), bool),
            np.zeros((2, 4), np.float32),
        )
    with pytest.raises(ValueError):
        obs_sweep_block(
            block,
            np.eye(4, dtype=np.float32),
            np.zeros((2, 4), bool),
            np.zeros((2, 4), np.float32),
            2,
            3,
        )


def test_float16_weights_written_back_in_their_dtype():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((64, 32)).astype(np.float16)
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
                helper.make_node("MatMul", ["x", "w"], ["y"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w16")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    loaded = model_from_proto(model)
    targets, _ = discover_targets(model, Selection(min_size=1))
    feeds = [{"x": rng.standard_normal((16, 64)).astype(np.float32)} for _ in range(4)]
    result = calibrated_prune(loaded, targets, feeds, method="sparsegpt", pattern="2:4")[
        "w16"
    ]
    assert result.weights.dtype == np.float16
    assert (
        kernels.nm_violations(np.ascontiguousarray(result.weights.T.astype(np.float32)), 2, 4) == 0
    )
    assert result.reconstruction_error < 0.5


def test_grouped_conv_nm_runs_along_input_channels(models_dir):
    loaded = load_model(models_dir / "cnn.onnx")
    targets, _ = discover_targets(loaded.proto, Selection(pattern=Pattern(2, 4)))
    feeds = load_calibration(None, loaded.proto, samples=2, seed=0)
    results = calibrated_prune(loaded, targets, feeds, method="sparsegpt", pattern="2:4")
    for target in targets:
        weights = results[target.name].weights
        matrix = np.ascontiguousarray(target.to_matrix(weights), dtype=np.float32)
        assert kernels.nm_violations(matrix, 2, 4) == 0, target.name
        assert results[target.name].zeros == target.numel // 2
    session = ort.InferenceSession(
        loaded.proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert np.isfinite(session.run(None, feeds[0])[0]).all()
    assert onnx.checker.check_model(loaded.proto) is None


@pytest.mark.parametrize("method, rows, warned", [("sparsegpt", 128, True),
                                                  ("sparsegpt", 300, False),
                                                  ("wanda", 128, False)])
def test_a_rebuild_from_fewer_tokens_than_inputs_is_warned(tmp_path, caplog, method, rows,
                                                           warned):
    """digits' W2 reads 256 inputs: rebuilt from 128 calibration rows its XᵀX is singular
    and the refit can fit them exactly; the run says so, naming it. Wanda rebuilds
    nothing, and 300 rows are enough."""
    from conftest import MODELS_DIR

    from onnxprune import prune

    calib = tmp_path / "calib.npz"
    np.savez(calib, pixels=np.load(MODELS_DIR / "digits-test.npz")["pixels"][:rows])
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        prune(str(MODELS_DIR / "digits.onnx"), str(tmp_path / "out.onnx"), method=method,
              calib=str(calib), min_size=100)
    said = "fewer calibration tokens than they have inputs (e.g. W2: 128 tokens for 256"
    assert (said in caplog.text) is warned
    if not warned:
        assert "fewer calibration tokens" not in caplog.text
