"""Non-uniform allocations (erk, owl, sensitivity): exact overall counts, bounds, what each
allocation favours, and a trained model where the sensitivity allocation beats uniform."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnxprune.allocation.erk import erk_ratio
from onnxprune.allocation.exact import round_counts
from onnxprune.allocation.owl import block_of, blocks, outlier_ratio, owl_offsets
from onnxprune.allocation.sensitivity import allocate, lower_hull
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.io import load_model, model_from_proto
from onnxprune.patterns import prune_count, row_keep_mask
from onnxprune.pipeline import run
from onnxprune.sensitivity_sweep import analyze
from onnxprune.targets import Consumer, WeightTarget


def _prune(model: str, **settings):
    loaded = load_model(MODELS_DIR / model)
    return run(loaded, PruneConfig.from_settings(**settings))


def _assert_exact(result, sparsity: float) -> None:
    total = sum(t.numel for t in result.targets)
    assert sum(t.zeros for t in result.targets) == prune_count(total, sparsity)
    for report in result.targets:  # every target prunes exactly its planned count
        assert report.zeros == result.plan[report.name].count


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp.onnx", "cnn.onnx", "transformer.onnx"])
@pytest.mark.parametrize("allocation", ["erk", "owl"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_overall_sparsity_exact_to_the_weight(model, allocation, method):
    for sparsity in (0.333, 0.7):
        result = _prune(model, sparsity=sparsity, allocation=allocation, method=method,
                        min_size=1000)
        _assert_exact(result, sparsity)
        assert len({t.zeros / t.numel for t in result.targets}) > 1  # not uniform


@pytest.mark.slow
@pytest.mark.parametrize("allocation", ["erk", "owl", "sensitivity"])
def test_exact_with_sparsegpt(allocation):
    result = _prune("transformer.onnx", sparsity=0.6, allocation=allocation, method="sparsegpt",
                    calib_samples=4)
    _assert_exact(result, 0.6)


def test_erk_density_follows_shape():
    result = _prune("mlp.onnx", sparsity=0.7, allocation="erk")
    densities = {t.name: 1 - t.sparsity for t in result.targets}
    ratios = {t.name: erk_ratio(t.shape) for t in result.targets}
    uncapped = [name for name, density in densities.items() if density < 1]
    assert 0 < len(uncapped) < len(densities)  # fc3 [256, 16] would exceed density 1
    scale = densities[uncapped[0]] / ratios[uncapped[0]]
    for name, density in densities.items():
        # density = scale · sum(shape)/prod(shape), capped at 1, up to a weight of rounding
        expected = min(1.0, scale * ratios[name])
        assert density == pytest.approx(expected, abs=2 / 4096)
    assert scale * ratios["fc3.weight"] > 1


def test_bounds_are_honoured_and_unreachable_bounds_refused():
    result = _prune("mlp.onnx", sparsity=0.7, allocation="erk", max_target_sparsity=0.72)
    _assert_exact(result, 0.7)
    assert all(t.zeros <= int(0.72 * t.numel) for t in result.targets)
    result = _prune("transformer.onnx", sparsity=0.5, allocation="owl",
                    min_target_sparsity=0.48, max_target_sparsity=0.51)
    _assert_exact(result, 0.5)
    assert all(0.48 * t.numel <= t.zeros <= 0.51 * t.numel for t in result.targets)
    with pytest.raises(ConfigError, match="out of reach"):
        _prune("mlp.onnx", sparsity=0.5, allocation="erk", min_target_sparsity=0.6)
    with pytest.raises(ConfigError, match="above"):
        _prune("mlp.onnx", sparsity=0.5, allocation="erk", min_target_sparsity=0.6,
               max_target_sparsity=0.4)


def test_owl_spread_and_direction():
    config = dict(sparsity=0.6, allocation="owl", method="wanda", owl_lambda=0.05)
    result = _prune("transformer.onnx", **config)
    _assert_exact(result, 0.6)
    sparsities = [t.sparsity for t in result.targets]
    assert max(sparsities) - min(sparsities) <= 2 * 0.05 + 1e-3
    flat = _prune("transformer.onnx", **{**config, "owl_lambda": 0.0})
    assert max(t.sparsity for t in flat.targets) - min(t.sparsity for t in flat.targets) < 1e-3


def test_owl_offsets_and_outlier_ratio():
    assert outlier_ratio(np.array([1.0] * 99 + [1000.0]), 5.0) == pytest.approx(0.01)
    assert outlier_ratio(np.ones(10), 5.0) == 0.0
    offsets = owl_offsets(np.array([0.01, 0.03, 0.02]), 0.08)
    # the most outliers: the least pruned
    np.testing.assert_allclose(offsets, [0.08, -0.08, 0.0], atol=1e-12)
    np.testing.assert_array_equal(owl_offsets(np.array([0.2, 0.2]), 0.08), [0.0, 0.0])


def _named(name: str, node: str = "") -> WeightTarget:
    return WeightTarget(name, "MatMul", (8, 8), "float32", 0, "initializer",
                        (Consumer(node or f"/{name}/MatMul", "MatMul", 1),))


def test_owl_blocks_are_read_from_names():
    assert block_of(_named("model.layers.12.mlp.up_proj.weight")) == "12"
    assert block_of(_named("onnx::MatMul_470", "/encoder/layer.0/attention/query/MatMul")) == "0"
    assert block_of(_named("p_encoder__layer__3__output__dense__weight")) == "3"
    assert block_of(_named("transformer.h.5.attn.c_attn.weight")) == "5"
    assert block_of(_named("attn.q_proj.weight")) is None
    assert block_of(_named("shape.7")) is None and block_of(_named("highway.2")) is None
    named = [_named(f"layers.{i}.fc{j}") for i in (0, 1) for j in (0, 1)]
    assert blocks(named) == ["block 0", "block 0", "block 1", "block 1"]
    mixed = named + [_named("lm_head")]  # one target names no block: each its own
    assert blocks(mixed) == [t.name for t in mixed]


@pytest.mark.parametrize("allocation", ["erk", "owl", "sensitivity"])
def test_nm_pattern_falls_back_to_uniform(allocation, caplog):
    with caplog.at_level(logging.WARNING):
        result = _prune("mlp.onnx", pattern="2:4", allocation=allocation)
    assert all(t.sparsity == 0.5 for t in result.targets)
    assert f"--allocation {allocation} does not apply to pattern 2:4" in caplog.text


def test_round_counts_exact_within_bounds():
    ideal = np.array([10.5, 20.5, 30.5, 0.2])
    counts = round_counts(ideal, 62, np.zeros(4, np.int64), np.array([11, 20, 40, 5]))
    assert counts.sum() == 62 and counts[1] == 20 and counts[0] <= 11
    counts = round_counts(np.array([3.9, 3.9]), 6, np.zeros(2, np.int64), np.full(2, 9))
    assert counts.tolist() == [3, 3]


def test_row_keep_mask_spreads_an_exact_count():
    rng = np.random.default_rng(3)
    scores = rng.random((7, 20)).astype(np.float32)
    for count in (0, 1, 13, 70, 139, 140):
        keep = row_keep_mask(scores, 0.0, count)
        assert int((~keep).sum()) == count
        per_row = (~keep).sum(axis=1)
        assert per_row.max() - per_row.min() <= 1
        # each row prunes its lowest scores
        for row in range(7):
            pruned = np.sort(scores[row][~keep[row]])
            np.testing.assert_array_equal(pruned, np.sort(scores[row])[:per_row[row]])
    keep = row_keep_mask(scores, 0.0, 7 * 3 + 2)  # two rows lose a 4th: the cheapest 4ths
    fourth = np.sort(scores, axis=1)[:, 3]
    assert set(np.flatnonzero((~keep).sum(axis=1) == 4)) == set(np.argsort(fourth)[:2])


def test_hull_allocation_is_optimal_on_a_grid():
    # two targets of 100 weights, convex energies; the optimum splits the need by slope
    xs = np.linspace(0, 1, 11)
    hulls = [lower_hull(xs, xs ** 2), lower_hull(xs, 4 * xs ** 2)]
    counts = allocate(np.array([100, 100]), hulls, 100, None)
    assert counts.sum() == pytest.approx(100)
    grid = {a: (a / 100) ** 2 + 4 * ((100 - a) / 100) ** 2 for a in range(0, 101, 10)}
    best = min(grid, key=grid.get)
    assert counts[0] == pytest.approx(best)
    # a non-convex curve: its hull skips the bump
    hx, hy = lower_hull(np.array([0, 0.5, 1.0]), np.array([0.0, 0.9, 1.0]))
    assert hx.tolist() == [0, 1.0] and hy.tolist() == [0.0, 1.0]


def test_max_error_takes_more_sparsity_for_a_larger_budget(tmp_path):
    curves = tmp_path / "curves.json"
    loaded = load_model(MODELS_DIR / "mlp.onnx")
    curves.write_text(analyze(loaded, PruneConfig(calib_samples=4)).to_json())
    achieved = []
    for error in (0.05, 0.2):
        result = _prune("mlp.onnx", allocation="sensitivity", sensitivity=str(curves),
                        max_error=error)
        zeros = sum(t.zeros for t in result.targets)
        achieved.append(zeros / sum(t.numel for t in result.targets))
    assert 0 < achieved[0] < achieved[1] <= 0.95


def test_sensitivity_curves_must_cover_the_targets(tmp_path, capsys):
    curves = tmp_path / "curves.json"
    loaded = load_model(MODELS_DIR / "mlp.onnx")
    curves.write_text(analyze(loaded, PruneConfig(include=("fc1",), calib_samples=2)).to_json())
    code = main(["prune", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path / "out.onnx"),
                 "--allocation", "sensitivity", "--sensitivity", str(curves), "-q"])
    assert code == 2
    assert "no entry for target 'fc2.weight'" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    code = main(["prune", str(MODELS_DIR / "mlp.onnx"), "-o", str(tmp_path / "out.onnx"),
                 "--allocation", "sensitivity", "--sensitivity", str(tmp_path / "bad.json")])
    assert code == 2 and "not a sensitivity JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


# --------------------------------------------------------------------------- trained model

def _trained_digits_mlp():
    """A 64-128-128-10 ReLU MLP trained with numpy on scikit-learn's digits; the ONNX model,
    the training and held-out images."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.target))
    images = (digits.data[order] / 16.0).astype(np.float32)
    labels = digits.target[order][:1200]
    train, held_out = images[:1200], images[1200:]
    sizes = [64, 128, 128, 10]
    weights = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32)
               for a, b in zip(sizes, sizes[1:], strict=False)]
    biases = [np.zeros(b, np.float32) for b in sizes[1:]]
    for _ in range(12):
        for start in range(0, 1200, 32):
            batch, target = train[start:start + 32], labels[start:start + 32]
            acts = [batch]
            for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
                z = acts[-1] @ w + b
                acts.append(np.maximum(z, 0) if i < 2 else z)
            p = np.exp(acts[-1] - acts[-1].max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(target)), target] -= 1
            grad = p / len(target)
            for i in (2, 1, 0):
                grad_w, grad_b = acts[i].T @ grad, grad.sum(0)
                if i:
                    grad = (grad @ weights[i].T) * (acts[i] > 0)
                weights[i] -= 0.1 * grad_w
                biases[i] -= 0.1 * grad_b
    nodes, inits, previous = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"),
                  numpy_helper.from_array(b, f"fc{i}.bias")]
        nodes += [helper.make_node("MatMul", [previous, f"fc{i}.weight"], [f"mm{i}"]),
                  helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"fc{i}"])]
        previous = f"fc{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [previous], [f"relu{i}"]))
            previous = f"relu{i}"
    graph = helper.make_graph(
        nodes, "digits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, train, held_out


def _output_error(dense: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray) -> float:
    outputs = [ort.InferenceSession(m.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
               for m in (dense, pruned)]
    return float(np.linalg.norm(outputs[1] - outputs[0]) / np.linalg.norm(outputs[0]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_sensitivity_allocation_beats_uniform_on_held_out_inputs(method):
    model, train, held_out = _trained_digits_mlp()
    feeds = [{"x": train[i:i + 100]} for i in range(0, 1200, 100)]  # calibration: train only
    errors = {}
    for allocation in ("uniform", "sensitivity"):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        loaded = model_from_proto(copy)
        result = run(loaded, PruneConfig(sparsity=0.7, allocation=allocation, method=method,
                                         min_size=1000), feeds=feeds)
        if allocation == "sensitivity":
            _assert_exact(result, 0.7)
        errors[allocation] = _output_error(model, loaded.proto, held_out)
    assert errors["sensitivity"] < 0.9 * errors["uniform"], errors
