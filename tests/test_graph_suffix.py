"""The part of a model after some weights, run on its own (`graph_suffix`): where the cut
is drawn, and structured sensitivity curves through suffixes equal to the whole model's."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR, real_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.config import PruneConfig
from onnxprune.graph_suffix import CutValues, suffix_plan
from onnxprune.io import load_model
from onnxprune.sensitivity_sweep import OutputSweep
from onnxprune.structured import sensitivity
from onnxprune.structured.run import score_groups


def _chain() -> onnx.ModelProto:
    """x → fc1 → Relu → fc2 (+ x: a residual read after the cut) → y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(size=(6, 4)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["m"]),
             helper.make_node("Add", ["m", "x"], ["y"])]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_cut_is_before_the_first_reader_and_carries_what_the_rest_reads():
    plan = suffix_plan(_chain(), {"W2"})
    assert plan is not None
    assert plan.start == 2 and plan.cut == ("a", "x") and plan.initializers == ("W2",)


def test_no_cut_where_it_cannot_be_drawn_simply():
    model = _chain()
    assert suffix_plan(model, {"W1"}) is None  # read by the first node: nothing to save
    early = _chain()
    early.graph.output.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, None))
    assert suffix_plan(early, {"W2"}) is None  # an output computed before the cut
    branchy = _chain()
    branch = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    branchy.graph.node.insert(2, helper.make_node("If", ["c"], ["unused"], then_branch=branch,
                                                  else_branch=branch))
    assert suffix_plan(branchy, {"W2"}) is None  # captured values are not in node.input


def _curves(loaded, config, groups, monkeypatch, *, whole: bool):
    if whole:  # no cut anywhere: every point runs the whole model
        monkeypatch.setattr(sensitivity, "suffix_plan", lambda proto, names: None)
    scored = score_groups(loaded, config)
    scored = dataclasses.replace(scored, groups=scored.groups[:groups])
    result = sensitivity.group_curves(loaded, scored, config, levels=(0.25, 0.5))
    monkeypatch.undo()
    return {c.name: [p.relative_l2 for p in c.points] for c in result.targets}


@pytest.mark.parametrize("model, structure, groups", [
    (MODELS_DIR / "transformer.onnx", "ffn,heads", 4),
    (MODELS_DIR / "cnn.onnx", "channels", 4),
    ("nudenet_320n", "channels", 3),
])
def test_curves_through_suffixes_are_the_whole_models(model, structure, groups, monkeypatch):
    path = real_model(model) if isinstance(model, str) else model
    loaded = load_model(path)
    config = PruneConfig.from_settings(structure=structure, min_size=0, calib_samples=2,
                                       synthetic_shapes={"images": [1, 3, 64, 64]}
                                       if isinstance(model, str) else None)
    whole = _curves(loaded, config, groups, monkeypatch, whole=True)
    cut = _curves(loaded, config, groups, monkeypatch, whole=False)
    assert whole.keys() == cut.keys() and whole
    for name, errors in whole.items():
        assert cut[name] == pytest.approx(errors, rel=1e-4, abs=1e-6)


def test_cut_values_are_computed_in_batches_within_the_budget():
    """The first batch is one plan (its size measured), then as many as the budget holds."""
    import onnxruntime as ort

    model = _chain()
    feeds = [{"x": np.random.default_rng(i).normal(size=(2, 4)).astype(np.float32)}
             for i in range(3)]
    plan = suffix_plan(model, {"W2"})
    plans = [plan, None, plan, plan]
    w1 = numpy_helper.to_array(model.graph.initializer[0])
    for budget, passes in ((1, 3), (1 << 30, 2)):
        probes = []

        def session_of(data, probes=probes):
            probes.append(data)
            return ort.InferenceSession(data, providers=["CPUExecutionProvider"])

        values = CutValues(model, plans, feeds, session_of, OutputSweep.outputs_named,
                           budget=budget)
        for index in (0, 2, 3):
            for sample, cut in zip(feeds, values.values(index), strict=True):
                assert np.allclose(cut["a"], np.maximum(sample["x"] @ w1, 0), atol=1e-5)
                assert np.array_equal(cut["x"], sample["x"])
        assert len(probes) == passes
        assert set(values.cached) == {3}  # earlier plans' values are dropped
