"""RIA: scores against their definition, masks through the pipeline, the CLI on demo models."""

from __future__ import annotations

import naive_methods as naive
import numpy as np
import pytest
from conftest import prune_cli_and_run
from layer_cases import prune_matmul

from onnxprune.methods.ria import ria_scores
from onnxprune.patterns import prune_count


def test_scores_match_definition():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((2, 5, 7)).astype(np.float32)
    weights[1, :, 3] = 0.0  # a column of zeros: its share is 0, not NaN
    x = [rng.standard_normal((9, 7)) for _ in range(2)]
    sq_norms = np.stack([(xi ** 2).sum(axis=0) for xi in x])
    for alpha in (0.5, 1.0, 0.0):
        fast = ria_scores(weights, sq_norms, alpha)
        assert fast.dtype == np.float32 and np.isfinite(fast).all()
        for group in range(2):
            np.testing.assert_allclose(fast[group], naive.ria_scores(weights[group], x[group],
                                                                     alpha), rtol=1e-5)


def test_row_of_zeros_scores_zero():
    weights = np.zeros((1, 3, 4), np.float32)
    weights[0, 1] = [1, -2, 0, 3]
    scores = ria_scores(weights, np.ones((1, 4)), 0.5)
    assert np.isfinite(scores).all() and (scores[0, [0, 2]] == 0).all()


@pytest.mark.parametrize("pattern, alpha", [("unstructured", 0.5), ("unstructured", 1.0),
                                            ("2:4", 0.5), ("1:4", 0.0)])
def test_pipeline_matches_twin(pattern, alpha):
    original, pruned, x, report = prune_matmul(method="ria", pattern=pattern, sparsity=0.5,
                                               ria_alpha=alpha)
    scores = naive.ria_scores(original, x, alpha)
    if pattern == "unstructured":  # one exact count over the whole layer
        keep = naive.lowest_first(scores, prune_count(original.size, 0.5))
    else:
        n, m = map(int, pattern.split(":"))
        keep = naive.keep_n_of_m(scores, n, m)
    np.testing.assert_array_equal(pruned != 0, keep)
    np.testing.assert_array_equal(pruned[keep], original[keep])  # no weight update
    assert report.meets_plan and report.method == "ria"


def test_alpha_changes_the_mask():
    masks = [prune_matmul(method="ria", ria_alpha=alpha, seed=3)[1] != 0 for alpha in (0, 2)]
    assert (masks[0] != masks[1]).any()


@pytest.mark.parametrize("model", ["transformer.onnx", "cnn.onnx", "mlp.onnx"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_cli_output_runs_in_onnxruntime(tmp_path, model, pattern):
    targets = prune_cli_and_run(tmp_path, model, ["--method", "ria", "--pattern", pattern])
    if pattern == "2:4":
        assert all(t["is_2_4"] for t in targets if t["pattern"] == "2:4")
