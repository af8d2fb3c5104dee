"""Why a tensor is no target, why a target stays dense, what set a plan entry: as data.

Every `SkipCause` and `DenseCause` is produced by a tiny model here and asserted as the enum
member (with its particulars); the words reports show are derived from it and checked
against the text users have always read. Models that a decline needs to be odd (a 1-D
MatMul weight, a rank-2 Conv weight) are built with onnx.helper and not checked.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import api
from onnxprune.config import Pattern
from onnxprune.errors import NothingToPruneError
from onnxprune.formats.storage import DenseCause, store
from onnxprune.pipeline import _dropped_by_selection
from onnxprune.plan import PlanOrigin, TargetPlan
from onnxprune.recipe import Override, apply_overrides, split_skipped
from onnxprune.report import Report, SkipReport, format_skipped, summarize
from onnxprune.targets import (
    SELECTION_CAUSES,
    Selection,
    SkipCause,
    SkippedTensor,
    discover_targets,
)

ALL = Selection(min_size=1)


def normal(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def model_of(nodes, inputs, outputs, initializers, opset: int = 17,
             domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A model from nodes; `inputs`/`outputs` are (name, elem type, shape) triples."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(a, n) if isinstance(a, np.ndarray) else a
         for n, a in initializers.items()])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


F = TensorProto.FLOAT


def matmul(weight: np.ndarray, *, extra_nodes=(), extra_init=None, outputs=()) -> onnx.ModelProto:
    """y = x @ W plus whatever else a case needs."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), *extra_nodes]
    return model_of(nodes, [("x", F, [2, weight.shape[0]])],
                    [("y", F, [2, weight.shape[-1]]), *outputs],
                    {"W": weight, **(extra_init or {})})


def skipped_of(model: onnx.ModelProto, selection: Selection = ALL) -> dict[str, SkippedTensor]:
    return {s.name: s for s in discover_targets(model, selection)[1]}


# --- every SkipCause -----------------------------------------------------------------------------

def _lstm_with_initial_state() -> onnx.ModelProto:
    node = helper.make_node("LSTM", ["x", "W", "R", "", "", "h0"], ["y"], hidden_size=4)
    return model_of([node], [("x", F, [5, 1, 8])], [("y", F, [5, 1, 1, 4])],
                    {"W": normal((1, 16, 8)), "R": normal((1, 16, 4)), "h0": normal((1, 1, 4))})


def _embedding() -> onnx.ModelProto:
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "fc"], ["y"])]
    return model_of(nodes, [("ids", TensorProto.INT64, [2, 3])], [("y", F, [2, 3, 16])],
                    {"embed": normal((32, 8)), "fc": normal((8, 16), 1)})


def _disagreeing() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]),
             helper.make_node("Gemm", ["x", "W"], ["z"], transB=1)]
    return model_of(nodes, [("x", F, [2, 8])], [("y", F, [2, 8]), ("z", F, [2, 8])],
                    {"W": normal((8, 8))})


def _quantized_with_runtime_scale() -> onnx.ModelProto:
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"]),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    return model_of(nodes, [("x", F, [2, 8]), ("s", F, [])], [("y", F, [2, 16])],
                    {"Wq": np.ones((8, 16), np.int8)})


CASES = [  # (id, model, selection, tensor, cause, detail, reason as reports show it)
    ("integer", lambda: matmul(normal((8, 16)), extra_nodes=[
        helper.make_node("Reshape", ["y", "shape"], ["r"])], outputs=[("r", F, [2, 4, 4])],
        extra_init={"shape": np.array([2, 4, 4], np.int64)}),
     ALL, "shape", SkipCause.INTEGER, {}, "integer tensor"),
    ("not_float", lambda: matmul(normal((8, 16)), extra_init={
        "s": helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])}),
     ALL, "s", SkipCause.NOT_FLOAT, {"dtype": "string"}, "string tensor"),
    ("unused", lambda: matmul(normal((8, 16)), extra_init={"u": normal((4,))}),
     ALL, "u", SkipCause.UNUSED, {}, "unused"),
    ("graph_output", lambda: matmul(normal((8, 16)), extra_nodes=[
        helper.make_node("Identity", ["g"], ["go"])], outputs=[("go", F, [3])],
        extra_init={"g": normal((3,))}),
     ALL, "g", SkipCause.GRAPH_OUTPUT, {}, "graph output"),
    ("also_graph_output", lambda: matmul(normal((8, 16)), outputs=[("W", F, [8, 16])]),
     ALL, "W", SkipCause.ALSO_GRAPH_OUTPUT, {}, "also a graph output"),
    ("unknown_op", lambda: model_of(
        [helper.make_node("Fancy", ["x", "W"], ["y"], domain="my.ops")],
        [("x", F, [2, 8])], [("y", F, [2, 16])], {"W": normal((8, 16))}, domains=("my.ops",)),
     ALL, "W", SkipCause.UNKNOWN_OP, {"op": "my.ops.Fancy"},
     "consumed by my.ops.Fancy, which onnxprune does not know"),
    ("matmul_1d", lambda: matmul(normal((8,))),
     ALL, "W", SkipCause.MATMUL_1D, {}, "1-D MatMul operand"),
    ("gemm_not_2d", lambda: model_of(
        [helper.make_node("Gemm", ["x", "W"], ["y"])],
        [("x", F, [2, 8])], [("y", F, [2, 16])], {"W": normal((1, 8, 16))}),
     ALL, "W", SkipCause.GEMM_NOT_2D, {}, "Gemm operand is not 2-D"),
    ("data_input", lambda: model_of(
        [helper.make_node("Conv", ["X", "w"], ["y"])],
        [("w", F, [4, 2, 3, 3])], [("y", F, [1, 4, 3, 3])], {"X": normal((1, 2, 5, 5))}),
     ALL, "X", SkipCause.DATA_INPUT, {"op": "Conv"}, "Conv data input"),
    ("low_rank_weight", lambda: model_of(
        [helper.make_node("Conv", ["x", "W"], ["y"])],
        [("x", F, [1, 8, 5])], [("y", F, [1, 16, 5])], {"W": normal((16, 8))}),
     ALL, "W", SkipCause.LOW_RANK_WEIGHT, {"op": "Conv", "rank": 2}, "Conv weight of rank 2"),
    ("recurrent_state", _lstm_with_initial_state,
     ALL, "h0", SkipCause.RECURRENT_STATE, {"op": "LSTM"},
     "LSTM state or sequence-length input"),
    ("bias", lambda: model_of(
        [helper.make_node("Gemm", ["x", "W", "C"], ["y"])],
        [("x", F, [2, 8])], [("y", F, [2, 16])], {"W": normal((8, 16)), "C": normal((16,))}),
     ALL, "C", SkipCause.BIAS, {}, "bias"),
    ("normalization", lambda: model_of(
        [helper.make_node("LayerNormalization", ["x", "scale"], ["y"])],
        [("x", F, [2, 8])], [("y", F, [2, 8])], {"scale": normal((8,))}),
     ALL, "scale", SkipCause.NORMALIZATION, {}, "normalization parameter"),
    ("not_weight_input", lambda: model_of(
        [helper.make_node("Mul", ["x", "W"], ["y"])],
        [("x", F, [8, 16])], [("y", F, [8, 16])], {"W": normal((8, 16))}),
     ALL, "W", SkipCause.NOT_WEIGHT_INPUT, {"op": "Mul"}, "not a weight input (consumed by Mul)"),
    ("embedding", _embedding,
     ALL, "embed", SkipCause.EMBEDDING, {},
     "embedding (Gather); include it by name with --include to prune it"),
    ("axis_disagrees", _disagreeing,
     ALL, "W", SkipCause.AXIS_DISAGREES, {"axes": [0, 1]},
     "consumers disagree on the reduction axis ([0, 1])"),
    ("not_included", lambda: matmul(normal((8, 16))),
     Selection(include=("^zz$",), min_size=1), "W", SkipCause.NOT_INCLUDED, {},
     "not matched by --include"),
    ("excluded", lambda: matmul(normal((8, 16))),
     Selection(exclude=("^W$",), min_size=1), "W", SkipCause.EXCLUDED, {},
     "excluded by --exclude"),
    ("below_min_size", lambda: matmul(normal((8, 16))),
     Selection(min_size=129), "W", SkipCause.BELOW_MIN_SIZE, {"numel": 128, "min_size": 129},
     "below --min-size (128 < 129 elements)"),
    ("axis_not_multiple", lambda: matmul(normal((12, 16))),
     Selection(min_size=1, pattern=Pattern(4, 8)), "W", SkipCause.AXIS_NOT_MULTIPLE,
     {"length": 12, "per_group": 12, "group": 1, "pattern": Pattern(4, 8)},
     "reduction axis length 12 is not a multiple of 8 (pattern 4:8)"),
    ("quantized_form", _quantized_with_runtime_scale,
     ALL, "Wq", SkipCause.QUANTIZED_FORM,
     {"op": "DequantizeLinear", "why": "its scale is computed at run time, not stored"},
     "quantized weight of DequantizeLinear not supported: its scale is computed at run time, "
     "not stored"),
]


@pytest.mark.parametrize(("make", "selection", "name", "cause", "detail", "reason"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_each_skip_cause(make, selection, name, cause, detail, reason) -> None:
    skipped = skipped_of(make(), selection)
    assert skipped[name].cause is cause
    assert dict(skipped[name].detail) == detail
    assert skipped[name].reason == reason


def test_every_skip_cause_has_a_case() -> None:
    # OVERRIDE_SKIP comes from a recipe, not from discovery (test below)
    assert {case[4] for case in CASES} | {SkipCause.OVERRIDE_SKIP} == set(SkipCause)


def test_axis_not_multiple_of_a_grouped_conv_transpose() -> None:
    # ConvTranspose [Cin=8, Cout/g, k, k], group=2: 4 input channels per group, M = 8
    model = model_of([helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2)],
                     [("x", F, [1, 8, 5, 5])], [("y", F, [1, 4, 7, 7])],
                     {"W": normal((8, 2, 3, 3))})
    skip = skipped_of(model, Selection(min_size=1, pattern=Pattern(4, 8)))["W"]
    assert skip.cause is SkipCause.AXIS_NOT_MULTIPLE
    assert (skip.detail["length"], skip.detail["per_group"], skip.detail["group"]) == (8, 4, 2)
    assert skip.reason == ("reduction axis length 8 (4 per group of 2) is not a multiple of 8 "
                           "(pattern 4:8)")
    assert skip.summary == "reduction axis length 8 is not a multiple of 8"


def test_normalization_wins_over_other_consumers() -> None:
    model = model_of([helper.make_node("Mul", ["x", "s"], ["m"]),
                      helper.make_node("LayerNormalization", ["m", "s"], ["y"])],
                     [("x", F, [2, 8])], [("y", F, [2, 8])], {"s": normal((8,))})
    assert skipped_of(model)["s"].cause is SkipCause.NORMALIZATION


def test_override_skip() -> None:
    targets, _ = discover_targets(matmul(normal((8, 16))), ALL)
    kept, skipped = split_skipped(targets, [Override("^W$", skip=True, index=2, line=7)])
    assert not kept
    (skip,) = skipped
    assert skip.cause is SkipCause.OVERRIDE_SKIP
    assert skip.detail == {"override": "override 2 (line 7)"}
    assert skip.reason == "skipped by override 2 (line 7)"


def test_selection_causes_are_the_options() -> None:
    assert SELECTION_CAUSES == {SkipCause.NOT_INCLUDED, SkipCause.EXCLUDED,
                                SkipCause.BELOW_MIN_SIZE, SkipCause.AXIS_NOT_MULTIPLE}


# --- the pipeline counts by cause ----------------------------------------------------------------

def test_dropped_by_selection_counts_causes_not_words() -> None:
    pattern = Pattern(2, 4)
    axis = {"length": 6, "per_group": 6, "group": 1, "pattern": pattern}
    skipped = [SkippedTensor("a", SkipCause.AXIS_NOT_MULTIPLE, detail=axis),
               SkippedTensor("b", SkipCause.AXIS_NOT_MULTIPLE, detail={**axis, "length": 10,
                                                                        "per_group": 10}),
               SkippedTensor("c", SkipCause.BELOW_MIN_SIZE, detail={"numel": 1, "min_size": 9}),
               SkippedTensor("d", SkipCause.BELOW_MIN_SIZE, detail={"numel": 2, "min_size": 9}),
               SkippedTensor("e", SkipCause.BIAS),
               SkippedTensor("f", SkipCause.NOT_INCLUDED)]
    assert _dropped_by_selection(skipped) == {
        (SkipCause.AXIS_NOT_MULTIPLE, "reduction axis not a multiple of 4 (pattern 2:4)"): 2,
        (SkipCause.BELOW_MIN_SIZE, "below --min-size"): 2,
        (SkipCause.NOT_INCLUDED, "not matched by --include"): 1,
    }


def test_nothing_to_prune_names_the_selection_causes() -> None:
    with pytest.raises(NothingToPruneError) as info:
        api.prune(matmul(normal((12, 16))), pattern="2:8", min_size=0)
    assert "1 reduction axis not a multiple of 8 (pattern 2:8)" in str(info.value)


def test_axis_causes_are_warned_about(caplog) -> None:
    model = model_of([helper.make_node("MatMul", ["x", "a"], ["h"]),
                      helper.make_node("MatMul", ["h", "b"], ["y"])],
                     [("x", F, [2, 12])], [("y", F, [2, 16])],
                     {"a": normal((12, 6)), "b": normal((6, 16), 1)})
    logger = logging.getLogger("onnxprune.pipeline")  # the CLI may stop propagation
    logger.addHandler(caplog.handler)
    try:
        _, report = api.prune(model, pattern="2:4", min_size=0)
    finally:
        logger.removeHandler(caplog.handler)
    assert "1 of 2 weights skipped: reduction axis not a multiple of 4 (pattern 2:4)" \
        in caplog.text
    (skip,) = report.skipped
    assert skip.cause == SkipCause.AXIS_NOT_MULTIPLE.value
    entry = report.to_dict()["skipped"][0]
    assert entry["cause"] == "axis_not_multiple"
    assert entry["reason"] == "reduction axis length 6 is not a multiple of 4 (pattern 2:4)"
    assert "summary" not in entry


def test_inspect_table_counts_by_summary_and_hides_integers() -> None:
    skips = [SkippedTensor("w1", SkipCause.BELOW_MIN_SIZE, (4,), "float32", "initializer",
                           {"numel": 4, "min_size": 9}),
             SkippedTensor("w2", SkipCause.BELOW_MIN_SIZE, (5,), "float32", "initializer",
                           {"numel": 5, "min_size": 9}),
             SkippedTensor("shape", SkipCause.INTEGER, (3,), "int64", "initializer")]
    from onnxprune.pipeline import skip_report

    report = Report("m", [], [skip_report(s) for s in skips], summarize([], 0))
    assert format_skipped(report).splitlines() == [
        "skipped 3 tensors: 2 below --min-size, 1 integer tensor",
        "  w1 [4 float32]: below --min-size (4 < 9 elements)",
        "  w2 [5 float32]: below --min-size (5 < 9 elements)",
    ]
    # a report made by hand, without causes, still prints
    plain = Report("m", [], [SkipReport("b", "bias", [3], "float32")], summarize([], 0))
    assert format_skipped(plain).splitlines()[0] == "skipped 1 tensors: 1 bias"


# --- every DenseCause ----------------------------------------------------------------------------

def _pruned(shape=(64, 16), sparsity: float = 0.9) -> np.ndarray:
    weights = normal(shape)
    weights[np.random.default_rng(1).random(shape) < sparsity] = 0
    return weights


def _target(model: onnx.ModelProto):
    (target,), _ = discover_targets(model, Selection(min_size=0))
    return target


def test_empty_tensor_stays_dense() -> None:
    model = matmul(np.zeros((0, 16), np.float32))
    result = store(_target(model), np.zeros((0, 16), np.float32), "sparse", model=model)
    assert (result.format, result.cause) == ("dense", DenseCause.EMPTY_OR_SCALAR)
    assert result.reason == "empty or scalar tensor"


def test_lost_storage_stays_dense() -> None:
    weights = _pruned()
    model = matmul(weights)
    target = _target(model)
    del model.graph.initializer[0]
    result = store(target, weights, "compact", model=model)
    assert result.cause is DenseCause.STORAGE_NOT_FOUND


def test_graph_input_stays_dense() -> None:
    weights = _pruned()
    model = matmul(weights)
    target = _target(model)
    model.graph.input.append(helper.make_tensor_value_info("W", F, [64, 16]))
    for fmt in ("sparse", "compact"):
        result = store(target, weights, fmt, model=model)
        assert result.cause is DenseCause.GRAPH_INPUT
        assert result.reason == "also a graph input (an initializer callers may override)"


def test_compact_below_opset_11_stays_dense() -> None:
    weights = _pruned()
    model = matmul(weights)
    model.opset_import[0].version = 10
    result = store(_target(model), weights, "compact", model=model)
    assert result.cause is DenseCause.COMPACT_NEEDS_OPSET
    assert result.blocker.detail == {"opset": 10, "needed": 11}
    assert result.reason == "compact storage needs ai.onnx opset >= 11; the model has 10"


def test_fold_limit_stays_dense(monkeypatch) -> None:
    weights = _pruned()
    model = matmul(weights)
    monkeypatch.setattr("onnxprune.formats.storage.FOLD_CAP_BYTES", 4096)
    result = store(_target(model), weights, "compact", model=model)
    assert result.cause is DenseCause.FOLD_LIMIT
    assert result.blocker.detail == {"bytes": 4096, "limit": 4096}
    assert result.reason == ("4,096 bytes dense reach onnxruntime's constant-folding limit "
                             "(4,096 bytes per node output)")


def test_sparse_initializer_below_ir_6_stays_dense() -> None:
    weights = _pruned()
    model = matmul(weights)
    model.ir_version = 5
    result = store(_target(model), weights, "sparse", model=model)
    assert result.cause is DenseCause.SPARSE_NEEDS_IR_VERSION
    assert result.reason == "sparse_initializer needs IR version >= 6; the model has 5"


def test_sparse_constant_below_opset_11_stays_dense() -> None:
    weights = _pruned()
    nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weights, "W")),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = model_of(nodes, [("x", F, [2, 64])], [("y", F, [2, 16])], {}, opset=10)
    result = store(_target(model), weights, "sparse", model=model)
    assert result.cause is DenseCause.SPARSE_CONSTANT_NEEDS_OPSET
    assert result.reason == "Constant sparse_value needs ai.onnx opset >= 11; the model has 10"


@pytest.mark.parametrize("fmt", ["sparse", "compact"])
def test_format_not_smaller_stays_dense(fmt) -> None:
    weights = normal((64, 16))  # nothing pruned
    model = matmul(weights)
    result = store(_target(model), weights, fmt, model=model)
    assert result.cause is DenseCause.NOT_SMALLER
    detail = result.blocker.detail
    assert (detail["format"], detail["dense_bytes"], detail["sparsity"]) == (fmt, 4096, 0.0)
    assert detail["bytes"] >= 4096
    assert result.reason.startswith(f"{fmt} ({detail['bytes']:,} bytes ")
    assert result.reason.endswith("is not smaller than dense (4,096 bytes) at 0.0% sparsity")
    if fmt == "compact":
        assert f"bytes as {detail['encoding']})" in result.reason


def test_stored_result_has_no_cause() -> None:
    weights = _pruned()
    model = matmul(weights)
    result = store(_target(model), weights, "sparse", model=model)
    assert result.format == "sparse" and result.cause is None and result.reason is None


# --- what set a plan entry -----------------------------------------------------------------------

def test_override_plans_say_so_as_data() -> None:
    model = matmul(normal((8, 16)))
    targets, _ = discover_targets(model, ALL)
    plan = {"W": TargetPlan("W", 0.5, Pattern(), "magnitude", set_by="overrides")}
    assert plan["W"].origin is PlanOrigin.ALLOCATION  # whatever an allocation calls itself
    result = apply_overrides(plan, targets, [Override("W", method="random")])
    assert result["W"].origin is PlanOrigin.OVERRIDE
    assert result["W"].set_by == "override 'W'"


def test_override_method_is_reported() -> None:
    _, report = api.prune(matmul(normal((8, 16))), sparsity=0.5, min_size=0,
                          overrides=[{"match": "W", "method": "random"}])
    (target,) = report.targets
    assert (target.method, target.set_by) == ("random", "override 1")
