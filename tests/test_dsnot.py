"""DSnoT: the swap kernel against swaps judged from scratch, monotone error, patterns after
every swap, earlier zeros never revived, the pipeline (`--refine dsnot`) and the CLI."""

from __future__ import annotations

import naive_methods as naive
import numpy as np
import pytest
from conftest import prune_cli_and_run
from layer_cases import layer_problem, prune_matmul

from onnxprune import kernels
from onnxprune.kernels.swaps import prune_and_grow
from onnxprune.methods.dsnot import refine_matrix
from onnxprune.methods.wanda import wanda_scores
from onnxprune.patterns import prune_count


def _wanda_mask(weights, hessian, keep_n=0, group_m=0):
    scores = wanda_scores(weights, np.diag(hessian))
    if group_m:
        return kernels.nm_keep_mask(scores, keep_n, group_m)
    return naive.lowest_first(scores, prune_count(weights.size, 0.5))


@pytest.mark.parametrize("keep_n, group_m", [(0, 0), (2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_swaps_judged_from_scratch(keep_n, group_m, seed):
    weights, hessian, _ = layer_problem(6, 16, tokens=60, rank=4, seed=seed, dead=(2,))
    keep = _wanda_mask(weights, hessian, keep_n, group_m)
    growable = np.ones(keep.shape, bool)
    growable[0, ::3] = False
    growable &= keep | (np.arange(16) % 5 != 1)  # some zeros of an earlier step
    keep &= growable
    fast = keep.copy()
    refine_matrix(weights, hessian, fast, growable, 6, keep_n, group_m)
    slow = naive.dsnot(weights, hessian, keep, 6, keep_n, group_m, growable)
    np.testing.assert_array_equal(fast, slow)
    assert (fast != keep).any()  # swaps happened


@pytest.mark.parametrize("keep_n, group_m", [(0, 0), (2, 4), (4, 8)])
def test_each_swap_lowers_the_error_and_keeps_the_pattern(keep_n, group_m):
    weights, hessian, _ = layer_problem(12, 32, tokens=300, rank=8)
    start = _wanda_mask(weights, hessian, keep_n, group_m)
    growable = np.ones(start.shape, bool)
    growable[:, 5] = False
    start &= growable
    errors = []
    for cycles in range(12):  # the mask after every single swap of each row
        keep = start.copy()
        refine_matrix(weights, hessian, keep, growable, cycles, keep_n, group_m)
        errors.append(naive.quadratic_error(weights, weights * keep, hessian))
        np.testing.assert_array_equal(keep.sum(axis=1), start.sum(axis=1))
        assert not keep[~growable].any()
        if group_m:
            assert kernels.nm_violations(np.ascontiguousarray(weights * keep), keep_n,
                                         group_m) == 0
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.9 * errors[0]


def test_row_stops_when_no_swap_helps():
    weights, hessian, _ = layer_problem(4, 8)
    keep = np.ones(weights.shape, bool)  # nothing pruned: nothing to grow
    gradient = np.zeros(weights.shape)
    swaps = prune_and_grow(weights, hessian, gradient, keep, np.ones_like(keep), 10)
    assert (swaps == 0).all() and keep.all()
    with pytest.raises(TypeError):
        prune_and_grow(weights, hessian.astype(np.float32), gradient, keep, keep, 1)
    with pytest.raises(ValueError):
        prune_and_grow(weights, hessian, gradient, keep, keep, 1, 2, 3)


@pytest.mark.parametrize("method, pattern", [("wanda", "unstructured"), ("ria", "2:4"),
                                             ("magnitude", "4:8")])
def test_pipeline_matches_twin(method, pattern):
    _, plain, _, plain_report = prune_matmul(method=method, pattern=pattern)
    original, pruned, x, report = prune_matmul(method=method, pattern=pattern,
                                               refine="dsnot", dsnot_iters=7)
    n, m = map(int, pattern.split(":")) if ":" in pattern else (0, 0)
    keep = naive.dsnot(original, x.T @ x, plain != 0, 7, n, m)
    np.testing.assert_array_equal(pruned != 0, keep)
    np.testing.assert_array_equal(pruned[keep], original[keep])  # no weight update
    assert report.meets_plan
    assert report.reconstruction_error < plain_report.reconstruction_error


def test_refine_then_update():
    _, refined, _, refined_report = prune_matmul(method="wanda", pattern="2:4", refine="dsnot")
    _, both, _, report = prune_matmul(method="wanda", pattern="2:4", refine="dsnot",
                                      update="admm")
    np.testing.assert_array_equal(both != 0, refined != 0)
    assert report.reconstruction_error < refined_report.reconstruction_error


@pytest.mark.parametrize("model", ["transformer.onnx", "cnn.onnx", "mlp.onnx"])
def test_cli_output_runs_in_onnxruntime(tmp_path, model):
    prune_cli_and_run(tmp_path, model, ["--method", "wanda", "--refine", "dsnot",
                                        "--dsnot-iters", "20", "--pattern", "2:4"])
