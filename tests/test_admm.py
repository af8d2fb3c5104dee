"""ADMM reconstruction: against the written-out iteration, layer-error properties, patterns,
the pipeline (`--method admm`, `--update admm`) and the CLI on the demo models."""

from __future__ import annotations

import logging

import naive_methods as naive
import numpy as np
import pytest
from conftest import prune_cli_and_run
from layer_cases import layer_problem, prune_matmul

from onnxprune import kernels
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.kernels.admm import admm_split
from onnxprune.methods.admm import SAMPLE_SIZE, MaskRule, admm_factor, admm_prune
from onnxprune.methods.sparsegpt import sparsegpt_prune
from onnxprune.methods.wanda import wanda_scores
from onnxprune.patterns import prune_count


def _count(weights, sparsity=0.5):
    return prune_count(weights.size, sparsity)


@pytest.mark.slow
@pytest.mark.parametrize("keep_n, group_m, gradual, iters", [
    (0, 0, True, 20), (0, 0, False, 20), (2, 4, True, 20), (2, 4, False, 8), (1, 4, True, 7),
    (0, 0, True, 0),
])
def test_matches_written_out_iteration(keep_n, group_m, gradual, iters):
    weights, hessian, _ = layer_problem(10, 24, tokens=200, rank=6, dead=(5,))
    rule = MaskRule(count=_count(weights), keep_n=keep_n, group_m=group_m,
                    ramp=max(1, round(0.75 * iters)) if gradual else 0)
    fast = admm_prune(weights, admm_factor(hessian), rule, iters)
    slow, keep = naive.admm(weights, hessian, count=_count(weights), keep_n=keep_n,
                            group_m=group_m, iters=iters, gradual=gradual)
    np.testing.assert_array_equal(fast != 0, keep)
    np.testing.assert_allclose(fast, slow, rtol=2e-3, atol=2e-4)


def test_factor_inverse_is_symmetric_and_exact():
    _, hessian, _ = layer_problem(2, 700, tokens=900, rank=40)  # more than one band of 512
    factor = admm_factor(hessian, rho=0.5, damp=0.2)
    shifted = factor.hessian.astype(np.float64) + (factor.damp + factor.rho) * np.eye(700)
    np.testing.assert_array_equal(factor.inverse, factor.inverse.T)
    np.testing.assert_allclose(factor.inverse @ shifted, np.eye(700), atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep_n, group_m", [(0, 0), (2, 4)])
def test_update_never_worse_than_the_same_mask_unchanged(seed, keep_n, group_m):
    # badly conditioned too: few tokens, strongly correlated inputs, few iterations
    weights, hessian, _ = layer_problem(16, 32, tokens=12 + 30 * seed, rank=3, seed=seed)
    scores = wanda_scores(weights, np.diag(hessian))
    keep = (kernels.nm_keep_mask(scores, keep_n, group_m) if group_m
            else naive.lowest_first(scores, _count(weights)))
    for iters in (1, 3, 20):
        updated = admm_prune(weights, admm_factor(hessian), MaskRule(fixed=keep), iters)
        np.testing.assert_array_equal(updated[~keep], 0)
        assert naive.quadratic_error(weights, updated, hessian) <= naive.quadratic_error(
            weights, weights * keep, hessian) * (1 + 1e-6)


def test_update_gains_a_lot_where_inputs_are_correlated():
    weights, hessian, _ = layer_problem(32, 64, tokens=1000, rank=16)
    keep = naive.lowest_first(wanda_scores(weights, np.diag(hessian)), _count(weights))
    updated = admm_prune(weights, admm_factor(hessian), MaskRule(fixed=keep), 20)
    assert naive.quadratic_error(weights, updated, hessian) < 0.2 * naive.quadratic_error(
        weights, weights * keep, hessian)


@pytest.mark.slow
@pytest.mark.parametrize("keep_n, group_m", [(0, 0), (2, 4), (4, 8)])
def test_gradual_beats_sparsegpt_and_meets_the_pattern(keep_n, group_m):
    weights, hessian, _ = layer_problem(32, 64, tokens=1000, rank=16)
    rule = MaskRule(count=_count(weights), keep_n=keep_n, group_m=group_m, ramp=15)
    pruned = admm_prune(weights, admm_factor(hessian), rule, 20)
    if group_m:
        assert kernels.nm_violations(np.ascontiguousarray(pruned), keep_n, group_m) == 0
        assert np.count_nonzero(pruned == 0) == weights.size * (group_m - keep_n) // group_m
    else:
        assert np.count_nonzero(pruned == 0) == _count(weights)
    reference = sparsegpt_prune(weights, hessian, sparsity=0.5, keep_n=keep_n, group_m=group_m)
    assert naive.quadratic_error(weights, pruned, hessian) < naive.quadratic_error(
        weights, reference, hessian)


def test_mask_ramps_cubically_and_never_revives():
    weights, hessian, _ = layer_problem(8, 16)
    prior = np.ones(weights.shape, bool)
    prior[0, :12] = False  # an earlier step pruned these
    rule = MaskRule(prior=prior, count=_count(weights), ramp=4)
    kept = [int(rule.select(np.abs(weights), step).sum()) for step in range(4)]
    count = _count(weights)
    expected = [weights.size - max(12, round(count * (1 - (1 - (s + 1) / 4) ** 3)))
                for s in range(4)]
    assert kept == expected
    pruned = admm_prune(weights, admm_factor(hessian), rule, 8)
    assert (pruned[~prior] == 0).all()


@pytest.mark.parametrize("keep_n, group_m", [(0, 0), (2, 4)])
def test_large_matrices_ramp_by_a_sampled_threshold_and_end_exact(keep_n, group_m):
    # above SAMPLE_SIZE the intermediate steps take a sampled threshold: near the step's
    # count, never reviving, the N best of every M kept; the last step is exact
    rng = np.random.default_rng(3)
    magnitudes = np.abs(rng.standard_normal((320, 256))).astype(np.float32)
    assert magnitudes.size > SAMPLE_SIZE
    prior = rng.random(magnitudes.shape) > 0.1
    count = _count(magnitudes)
    rule = MaskRule(prior=prior, count=count, keep_n=keep_n, group_m=group_m, ramp=6)
    rest = magnitudes.size * (group_m - keep_n) // group_m if group_m else count
    for step in range(6):
        keep = rule.select(magnitudes.copy(), step)
        assert not (keep & ~prior).any()
        if group_m:
            best = kernels.nm_keep_mask(np.where(prior, magnitudes, -np.inf), keep_n, group_m)
            assert (keep[best & prior]).all()
        share = 1 - (1 - (step + 1) / 6) ** 3
        expected = magnitudes.size - max(round(rest * share), np.count_nonzero(~prior))
        if step == 5:
            ranked = np.where(prior, magnitudes, -np.inf)
            if group_m:
                ranked[best] = np.inf
            np.testing.assert_array_equal(keep, naive.lowest_first(ranked, rest) & prior)
        else:
            assert abs(int(keep.sum()) - expected) <= 0.01 * magnitudes.size


def test_weights_without_update_stay_bit_identical():
    weights, hessian, _ = layer_problem(6, 16)
    keep = naive.lowest_first(np.abs(weights), 40)
    plain = admm_prune(weights, admm_factor(hessian), MaskRule(fixed=keep), 0)
    np.testing.assert_array_equal(plain, np.where(keep, weights, 0))


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [True, False])
def test_given_masks_are_honoured(fixed):
    rng = np.random.default_rng(5)
    given = rng.random((32, 12)) < 0.7  # stored layout [inputs, outputs]
    _, pruned, _, report = prune_matmul(method="admm", masks={"w": given}, fixed_masks=fixed)
    if fixed:  # exactly this mask, reconstructed
        np.testing.assert_array_equal(pruned.T != 0, given)
    else:  # never revived, and the plan's count still met
        assert not (pruned.T[~given] != 0).any()
        assert np.count_nonzero(pruned == 0) >= prune_count(pruned.size, 0.5)
    assert report.meets_plan


def test_split_kernel():
    rng = np.random.default_rng(0)
    sums, target = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2))
    keep = rng.random((3, 5)) < 0.5
    rhs = np.empty_like(sums)
    before = sums.copy()
    admm_split(sums, keep, target, 0.5, rhs)
    np.testing.assert_array_equal(sums, np.where(keep, 0, before))
    np.testing.assert_allclose(rhs, target + 0.5 * np.where(keep, before, -before), rtol=1e-6)
    with pytest.raises(TypeError):
        admm_split(sums.astype(np.float64), keep, target, 0.5, rhs)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("gradual", [True, False])
def test_method_in_pipeline_matches_twin(pattern, gradual):
    original, pruned, x, report = prune_matmul(method="admm", pattern=pattern, sparsity=0.5,
                                               admm_fixed_mask=not gradual, admm_iters=12)
    n, m = (2, 4) if pattern == "2:4" else (0, 0)
    slow, keep = naive.admm(original, x.T @ x, count=_count(original), keep_n=n, group_m=m,
                            iters=12, gradual=gradual)
    np.testing.assert_array_equal(pruned != 0, keep)
    np.testing.assert_allclose(pruned, slow, rtol=2e-3, atol=2e-4)
    assert report.meets_plan and report.method == "admm"


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria"])
def test_update_in_pipeline_keeps_the_methods_mask(method):
    _, plain, _, plain_report = prune_matmul(method=method, pattern="2:4")
    original, pruned, x, report = prune_matmul(method=method, pattern="2:4", update="admm",
                                               admm_rho=0.5)
    keep = plain != 0
    np.testing.assert_array_equal(pruned != 0, keep)
    slow, _ = naive.admm(original, x.T @ x, fixed=keep, rho=0.5, gradual=False)
    np.testing.assert_allclose(pruned, slow, rtol=2e-3, atol=2e-4)
    assert report.reconstruction_error < plain_report.reconstruction_error


def test_bad_settings_are_user_errors():
    for settings in ({"admm_iters": -1}, {"admm_rho": 0.0}, {"admm_rho": float("nan")}):
        with pytest.raises(ConfigError):
            PruneConfig.from_settings(method="admm", **settings)
    with pytest.raises(ConfigError, match="scoring method"):
        PruneConfig(method="admm", update="admm")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["transformer.onnx", "cnn.onnx"])
@pytest.mark.parametrize("args", [["--method", "admm", "--pattern", "2:4", "--admm-iters", "6"],
                                  ["--method", "admm", "--admm-fixed-mask", "--admm-iters",
                                   "6"],
                                  ["--method", "wanda", "--update", "admm", "--admm-iters",
                                   "5", "--pattern", "2:4"]])
def test_cli_output_runs_in_onnxruntime(tmp_path, model, args):
    prune_cli_and_run(tmp_path, model, args)


@pytest.mark.slow
def test_update_calibrates_sequentially(caplog):
    with caplog.at_level(logging.INFO, logger="onnxprune.pipeline"):
        prune_matmul(method="ria", update="admm")
    assert "(sequential)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="onnxprune.pipeline"):
        prune_matmul(method="ria", refine="dsnot")
    assert "(one-pass)" in caplog.text
