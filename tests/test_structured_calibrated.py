"""Calibrated structured pruning: FLAP's score, bias compensation, the least-squares refit of
the consumers, and the bias slots they are written to — each against a slow, obviously
correct twin, and end to end in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import as_constant_nodes
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calib.stats import ActivationStats
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.io import LoadedModel
from onnxprune.structured import find_groups
from onnxprune.structured.bias_slots import add_bias_slots
from onnxprune.structured.reconstruction import (
    bias_shift,
    centred,
    layer_errors,
    least_squares,
)
from onnxprune.structured.run import prune_structured
from onnxprune.structured.selection import normalized
from onnxprune.structured.surgery import zeroed

# ---------------------------------------------------------------- the arithmetic


def _data(seed: int, tokens: int = 300, features: int = 12, rows: int = 5):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(features, features))
    inputs = rng.normal(size=(tokens, features)) @ mixing + rng.normal(size=features) * 2
    weights = rng.normal(size=(rows, features))
    return inputs, weights


def _naive_least_squares(inputs, weights, kept, damp):
    """min ‖X (W − W')ᵀ‖² + λ‖W − W'‖² over the kept columns (W' zero elsewhere), by lstsq
    on stacked rows."""
    hessian = inputs.T @ inputs
    lam = damp * np.mean(np.diagonal(hessian))
    design = np.vstack([inputs[:, kept], np.sqrt(lam) * np.eye(len(kept))])
    fitted = np.zeros_like(weights)
    for row in range(weights.shape[0]):
        target = np.concatenate([inputs @ weights[row], np.sqrt(lam) * weights[row, kept]])
        fitted[row, kept] = np.linalg.lstsq(design, target, rcond=None)[0]
    return fitted


@pytest.mark.parametrize("seed", range(5))
def test_least_squares_matches_a_stacked_lstsq(seed):
    inputs, weights = _data(seed)
    kept = np.sort(np.random.default_rng(seed).choice(12, 7, replace=False))
    fast = least_squares(weights, inputs.T @ inputs, kept, damp=0.01)
    slow = _naive_least_squares(inputs, weights, kept, 0.01)
    cut = np.zeros_like(weights)
    cut[:, kept] = weights[:, kept]
    better = (np.linalg.norm(inputs @ (weights - slow).T, axis=0)
              < np.linalg.norm(inputs @ (weights - cut).T, axis=0))
    expected = np.where(better[:, None], slow, cut)
    np.testing.assert_allclose(fast, expected, rtol=1e-7, atol=1e-9)
    assert np.all(fast[:, np.setdiff1d(np.arange(12), kept)] == 0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("damp", [0.0, 0.01, 10.0])
def test_the_refit_never_raises_the_layer_error_above_the_plain_cut(seed, damp):
    inputs, weights = _data(seed, tokens=40, features=16)  # few tokens: H is ill-posed
    hessian = inputs.T @ inputs
    kept = np.arange(0, 16, 3)
    cut = np.zeros_like(weights)
    cut[:, kept] = weights[:, kept]
    refit = least_squares(weights, hessian, kept, damp)
    errors = np.linalg.norm(inputs @ (weights - refit).T, axis=0) ** 2
    cut_errors = np.linalg.norm(inputs @ (weights - cut).T, axis=0) ** 2
    assert np.all(errors <= cut_errors * (1 + 1e-9) + 1e-9)
    np.testing.assert_allclose(layer_errors(weights, refit, hessian), errors, rtol=1e-6)


def test_bias_shift_keeps_a_linear_layers_output_mean():
    inputs, weights = _data(3)
    kept = np.array([0, 2, 5, 7, 11])
    cut = np.zeros_like(weights)
    cut[:, kept] = weights[:, kept]
    shift = bias_shift(weights, cut, inputs.mean(axis=0))
    np.testing.assert_allclose((inputs @ cut.T + shift).mean(axis=0),
                               (inputs @ weights.T).mean(axis=0), atol=1e-9)


def test_centred_statistics_are_the_covariance_times_tokens():
    inputs, _ = _data(4)
    centre = inputs - inputs.mean(axis=0)
    np.testing.assert_allclose(centred(inputs.T @ inputs, inputs.sum(axis=0), len(inputs)),
                               centre.T @ centre, rtol=1e-9, atol=1e-7)


def test_activation_stats_give_means_and_variances():
    inputs, _ = _data(5, tokens=64, features=6)
    for hessian in (False, True):
        stats = ActivationStats(1, 6, hessian=hessian)
        stats.add(0, inputs[:40].astype(np.float32))
        stats.add(0, inputs[40:].astype(np.float32))
        np.testing.assert_allclose(stats.means[0], inputs.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(stats.variances[0], inputs.var(axis=0), rtol=1e-4)


def test_standardized_scores_put_groups_on_one_scale():
    values = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(normalized(values, "standard"),
                               (values - 3.0) / np.std(values))
    np.testing.assert_allclose(normalized(values), values / 3.0)
    assert np.all(normalized(np.ones(3), "standard") == 0)


# ---------------------------------------------------------------- models


def _mlp(seed: int = 0, hidden: int = 24, bias_out: bool = False) -> onnx.ModelProto:
    """x [N, 8] → MatMul W1 + b1 → Relu → MatMul W2 [→ + b2] → y [N, 5]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(8, hidden)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(size=(hidden, 5)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "W2"], ["y0" if bias_out else "y"], name="fc2")]
    if bias_out:
        inits.append(numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "b2"))
        nodes.append(helper.make_node("Add", ["y0", "b2"], ["y"], name="add2"))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _calibration(tmp_path, seed: int = 1, samples: int = 8):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(samples, 16, 8)) + 0.5).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    return path, x


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": sample})[0] for sample in x])


def _prune(model, calib, **settings):
    config = PruneConfig.from_settings(structure="channels", calib=calib, round_to=1,
                                       min_size=0, **settings)
    loaded = LoadedModel(model, None, calib.parent, False)
    return prune_structured(loaded, config)


@pytest.mark.parametrize("bias_out", [False, True])
def test_flap_bias_compensation_keeps_the_output_mean_over_the_calibration_data(
        tmp_path, bias_out):
    model = _mlp(bias_out=bias_out)
    calib, x = _calibration(tmp_path)
    dense = _run(model, x)
    compensated = _prune(model, calib, method="flap", sparsity=0.5)
    plain = _prune(model, calib, method="flap", sparsity=0.5, bias_compensation=False)
    assert compensated.keep.keys() == plain.keep.keys()  # the same channels either way
    for name in plain.keep:
        np.testing.assert_array_equal(compensated.keep[name], plain.keep[name])
    np.testing.assert_allclose(_run(compensated.model, x).mean(axis=0), dense.mean(axis=0),
                               rtol=1e-4, atol=1e-4)
    drift = np.abs(_run(plain.model, x).mean(axis=0) - dense.mean(axis=0)).max()
    assert drift > 1e-2  # without it, the mean moves (so the check above can fail)
    onnx.checker.check_model(compensated.model, full_check=True)


def test_the_least_squares_refit_lowers_the_error_of_the_same_channels(tmp_path):
    model = _mlp(seed=2, hidden=32)
    calib, x = _calibration(tmp_path, seed=3)
    dense = _run(model, x)
    cut = _prune(model, calib, method="wanda", sparsity=0.5)
    refit = _prune(model, calib, method="wanda", sparsity=0.5, update="least-squares")
    for name in cut.keep:
        np.testing.assert_array_equal(cut.keep[name], refit.keep[name])
    error_cut = np.linalg.norm(_run(cut.model, x) - dense)
    error_refit = np.linalg.norm(_run(refit.model, x) - dense)
    assert error_refit < 0.8 * error_cut
    # with flap's compensation the refit is fitted with an intercept: the best affine fit
    compensated = _prune(model, calib, method="flap", sparsity=0.5)
    affine = _prune(model, calib, method="flap", sparsity=0.5, update="least-squares")
    assert np.linalg.norm(_run(affine.model, x) - dense) \
        < np.linalg.norm(_run(compensated.model, x) - dense)


def test_flap_scores_are_the_weighted_fluctuation_of_each_channel(tmp_path):
    """Twin: Var(h_j) over the calibration tokens times Σ_i W2[j, i]², by hand, standardized
    over the group's channels."""
    from onnxprune.structured.run import _consumer_statistics
    from onnxprune.structured.scores import Flap

    model = _mlp(seed=4)
    calib, x = _calibration(tmp_path, seed=5)
    config = PruneConfig(structure="channels", calib=calib, method="flap")
    loaded = LoadedModel(model, None, calib.parent, False)
    groups, _ = find_groups(model)
    (group,) = groups
    calibration = _consumer_statistics(loaded, [group], config)
    tensors = {m.tensor: numpy_helper.to_array(next(t for t in model.graph.initializer
                                                    if t.name == m.tensor))
               for m in group.members}
    scores = Flap().scores(group, tensors, 0, calibration)
    weights = tensors["W1"].astype(np.float64)
    hidden = np.maximum(x.reshape(-1, 8).astype(np.float64) @ weights
                        + tensors["b1"], 0.0)
    raw = hidden.var(axis=0) * (tensors["W2"].astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_allclose(scores, (raw - raw.mean()) / raw.std(), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- bias slots


def _conv_chain() -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.normal(size=(6, 3, 3, 3)).astype(np.float32), "C1"),
             numpy_helper.from_array(rng.normal(size=(4, 6, 1, 1)).astype(np.float32), "C2"),
             numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "G")]
    nodes = [helper.make_node("Conv", ["x", "C1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "C2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "G"], ["y"], name="gemm")]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bias_slots_change_no_output_and_no_group_name():
    for model in (_mlp(), _mlp(bias_out=True), _conv_chain()):
        before, _ = find_groups(model)
        slotted = onnx.ModelProto()
        slotted.CopyFrom(model)
        weights = [t.name for t in model.graph.initializer if len(t.dims) >= 2]
        slots = add_bias_slots(slotted, weights)
        assert set(slots) == set(weights)
        onnx.checker.check_model(slotted, full_check=True)
        after, _ = find_groups(slotted)
        assert [g.name for g in after] == [g.name for g in before]
        rng = np.random.default_rng(0)
        shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
        feed = {model.graph.input[0].name: rng.normal(size=shape).astype(np.float32)}
        outputs = [ort.InferenceSession(m.SerializeToString(),
                                        providers=["CPUExecutionProvider"]).run(None, feed)[0]
                   for m in (model, slotted)]
        np.testing.assert_array_equal(outputs[0], outputs[1])
    slotted = _conv_chain()
    slots = add_bias_slots(slotted, ["C1", "G"])
    conv = next(n for n in slotted.graph.node if n.name == "conv1")
    gemm = next(n for n in slotted.graph.node if n.name == "gemm")
    assert conv.input[2] == slots["C1"] and gemm.input[2] == slots["G"]  # inputs, no Add


def test_least_squares_is_a_structured_update_only():
    PruneConfig(structure="channels", update="least-squares")
    with pytest.raises(ConfigError, match="least-squares"):
        PruneConfig(update="least-squares")  # unstructured updates are other parts
    with pytest.raises(ConfigError, match="admm"):
        PruneConfig(structure="channels", update="admm")


def test_flap_standardizes_columns_before_averaging_a_heads_columns():
    """A head of 2 columns: each column's fluctuation is standardized over all 6 columns of
    the group, then the head's score is the mean of its two (FLAP's head metric)."""
    from onnxprune.calib.layouts import MatrixInput, TargetView
    from onnxprune.structured.groups import ChannelGroup, Member, MemberRole, StructureKind
    from onnxprune.structured.scores import Flap

    rng = np.random.default_rng(7)
    weights = rng.normal(size=(6, 4)).astype(np.float32)  # o_proj [K = 3 heads x 2, N]
    inputs = rng.normal(size=(50, 6)) * np.array([1, 2, 3, 0.5, 1, 4])
    stats = ActivationStats(1, 6, hessian=False)
    stats.add(0, inputs.astype(np.float32))
    target = next(iter(_targets_of(weights)))
    view = TargetView(target, (("x", MatrixInput(6, transposed=False)),), (0,), 1, 6)
    group = ChannelGroup("heads", StructureKind.HEADS, 3,
                         (Member("o", 0, MemberRole.INPUT, 0, 2),))
    scores = Flap().scores(group, {"o": weights}, 0, {"o": (view, stats)})
    columns = inputs.var(axis=0) * (weights.astype(np.float64) ** 2).sum(axis=1)
    standard = (columns - columns.mean()) / columns.std()
    np.testing.assert_allclose(scores, standard.reshape(3, 2).mean(axis=1), rtol=1e-4,
                               atol=1e-6)


def _targets_of(weights: np.ndarray):
    """The MatMul weight `o` of a one-node model, as target discovery finds it."""
    from onnxprune.config import Pattern
    from onnxprune.targets import Selection, discover_targets

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "o"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 4])],
        [numpy_helper.from_array(weights, "o")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    targets, _ = discover_targets(model, Selection((), (), 0, Pattern()))
    return targets


# ---------------------------------------------------------------- structured OBS


def _naive_obs(inputs, weights, blocks, count, damp):
    """One channel at a time: try removing each remaining channel, refit the rest by damped
    least squares on the kept features, keep the removal of least error."""
    hessian = inputs.T @ inputs
    damped = hessian + damp * np.mean(np.diagonal(hessian)) * np.eye(len(hessian))
    alive = list(range(len(blocks)))
    while len(alive) > count:
        best = None
        for channel in alive:
            kept = np.sort(np.concatenate([blocks[c] for c in alive if c != channel]))
            fitted = np.linalg.solve(damped[np.ix_(kept, kept)],
                                     (weights @ damped[:, kept]).T).T
            full = np.zeros_like(weights)
            full[:, kept] = fitted
            delta = weights - full
            error = np.einsum("rf,fg,rg->", delta, damped, delta)
            if best is None or error < best[0]:
                best = (error, channel)
        alive.remove(best[1])
    return np.array(alive)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per", [1, 3])
def test_structured_obs_removes_what_a_brute_force_greedy_removes(seed, per):
    from onnxprune.structured.reconstruction import obs_select

    inputs, weights = _data(seed, tokens=200, features=6 * per, rows=4)
    blocks = np.arange(6 * per).reshape(6, per)
    kept, (refit,) = obs_select([weights], [inputs.T @ inputs], [blocks], 3, damp=0.01,
                                rounds=10)  # one channel per round: the exact greedy
    np.testing.assert_array_equal(kept, _naive_obs(inputs, weights, list(blocks), 3, 0.01))
    removed = blocks[np.setdiff1d(np.arange(6), kept)].reshape(-1)
    assert np.all(refit[:, removed] == 0)
    # the weights left are the damped least-squares refit of the kept channels
    expected = least_squares(weights, inputs.T @ inputs, blocks[kept].reshape(-1), 0.01)
    np.testing.assert_allclose(refit, expected, rtol=1e-6, atol=1e-8)


def test_obs_chooses_channels_and_refits_no_worse_than_cutting_them(tmp_path):
    """End to end, `--method obs` keeps the allocated count, chooses which channels on the
    calibration data, and the refitted output beats cutting the same channels plainly."""
    model = _mlp(seed=8, hidden=32)
    calib, x = _calibration(tmp_path, seed=9)
    dense = _run(model, x)
    chosen = _prune(model, calib, method="obs", sparsity=0.5, bias_compensation=False)
    (name,) = chosen.keep
    assert len(chosen.keep[name]) == 16
    zeroed_model = zeroed(model, find_groups(model)[0], chosen.keep)
    error_obs = np.linalg.norm(_run(chosen.model, x) - dense)
    error_cut = np.linalg.norm(_run(zeroed_model, x) - dense)
    assert error_obs < error_cut
    scored = _prune(model, calib, method="wanda", sparsity=0.5, update="least-squares")
    assert error_obs <= 1.05 * np.linalg.norm(_run(scored.model, x) - dense)


def test_constant_node_weights_get_bias_slots_and_compensation(tmp_path):
    """A model whose weights are Constant nodes is compensated like one with initializers
    (it was not: no slot, and the refit still centred XᵀX, dropping the removed channels'
    mean contribution)."""
    calib, x = _calibration(tmp_path, seed=11)
    for method, update in (("flap", "none"), ("flap", "least-squares"), ("obs", "none")):
        results = []
        for model in (_mlp(seed=10), as_constant_nodes(_mlp(seed=10))):
            pruned = _prune(model, calib, method=method, sparsity=0.5, update=update)
            results.append(_run(pruned.model, x))
        np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-5)
    slotted = as_constant_nodes(_mlp())
    assert set(add_bias_slots(slotted, ["W1", "W2"])) == {"W1", "W2"}
