"""The structured rewrite (`structured.surgery`): shrinking equals zeroing.

Each case builds a small model and its channel groups by hand, picks kept channels, and
checks that `shrink` leaves its input alone, passes strict shape inference and the full
checker, removes exactly the parameters of the removed channels, and computes in
onnxruntime what `zeroed` (the original with the removed channels zeroed where they are
read) computes. Groups found by the analysis on the demo and real models follow when
`structured.analysis.find_groups` exists.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph import GraphIndex, walk_graphs
from onnxprune.io import read_array
from onnxprune.structured import (
    AttributeEdit,
    ChannelGroup,
    Member,
    MemberRole,
    ShapeEdit,
    StructureKind,
    SurgeryError,
    check_shrunk,
    shrink,
    zeroed,
)

OUT, IN, PER = MemberRole.OUTPUT, MemberRole.INPUT, MemberRole.PER_CHANNEL
RNG_SEED = 0


# --- building blocks ----------------------------------------------------------------------

def _rand(rng: np.random.Generator, *shape: int, positive: bool = False) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32)
    return np.abs(values) + 0.5 if positive else values


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _info(name: str, shape: Sequence[int] | None, elem=TensorProto.FLOAT
          ) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # stale shapes on purpose: shrink must drop them
    return onnx.shape_inference.infer_shapes(model)


def _group(name: str, channels: int, members: Sequence[Member], **extra) -> ChannelGroup:
    return ChannelGroup(name, StructureKind.CHANNELS, channels, tuple(members), **extra)


def _keep(rng: np.random.Generator, channels: int, count: int) -> np.ndarray:
    return np.sort(rng.choice(channels, count, replace=False)).astype(np.int64)


def _feeds(model: onnx.ModelProto, rng: np.random.Generator,
           fixed: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    feeds = dict(fixed or {})
    stored = {tensor.name for tensor in model.graph.initializer}
    for value in model.graph.input:
        if value.name in feeds or value.name in stored:
            continue
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def _parameters(model: onnx.ModelProto) -> int:
    """Stored float values (int64 shape constants, which a rewrite may copy, are not parameters)."""
    return sum(math.prod(item.tensor.dims) for item in GraphIndex(model).stored
               if item.tensor.data_type not in _INTEGER_TYPES)


_INTEGER_TYPES = {TensorProto.INT64}


def _expected_removed(model: onnx.ModelProto, groups: Sequence[ChannelGroup],
                      keep: Mapping[str, np.ndarray]) -> int:
    """Parameters the kept sets remove: each member's axis loses the removed channels' blocks
    (sections of one axis add up), and a tensor loses what its new shape no longer holds."""
    dims = {item.name: tuple(item.tensor.dims) for item in GraphIndex(model).stored
            if item.tensor.data_type not in _INTEGER_TYPES}
    shrunk = {name: list(shape) for name, shape in dims.items()}
    for group in groups:
        if group.name not in keep:
            continue
        gone = group.channels - len(keep[group.name])
        for member in dict.fromkeys(group.members):
            shrunk[member.tensor][member.axis] -= gone * member.block
    return sum(math.prod(dims[name]) - math.prod(shape) for name, shape in shrunk.items())


def _check_case(model: onnx.ModelProto, groups: Sequence[ChannelGroup],
                keep: Mapping[str, np.ndarray], *, feeds_list=None, seed: int = RNG_SEED,
                rtol: float = 1e-4, atol: float = 1e-5, exact_params: bool = True
                ) -> onnx.ModelProto:
    """shrink vs zeroed: input untouched, checker passes, parameters removed as expected,
    outputs equal in onnxruntime (and different from the original's: the removed channels
    mattered)."""
    before = model.SerializeToString()
    shrunk = shrink(model, groups, keep)
    assert model.SerializeToString() == before, "shrink changed its input"
    check_shrunk(shrunk)
    assert not any(graph.value_info for graph, _ in walk_graphs(shrunk.graph))
    removed = _parameters(model) - _parameters(shrunk)
    if exact_params:
        assert removed == _expected_removed(model, groups, keep)
    else:
        assert removed > 0
    reference = zeroed(model, groups, keep)
    assert model.SerializeToString() == before, "zeroed changed its input"
    rng = np.random.default_rng(seed)
    for fixed in feeds_list or [None]:
        feeds = _feeds(model, rng, fixed)
        got, want = _run(shrunk, feeds), _run(reference, feeds)
        original = _run(model, feeds)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
        assert any(not np.allclose(o, w, rtol=rtol, atol=atol)
                   for o, w in zip(original, want, strict=True)), "nothing was removed"
    return shrunk


def _stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    found = [item.tensor for item in GraphIndex(model).stored if item.name == name]
    assert len(found) == 1, name
    return read_array(found[0], Path("."))


# --- hand-built cases ---------------------------------------------------------------------

def _mlp(rng, hidden: int = 16) -> tuple[onnx.ModelProto, ChannelGroup]:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w2"], ["y"])]
    inits = [_init("w1", _rand(rng, 8, hidden)), _init("b1", _rand(rng, hidden)),
             _init("w2", _rand(rng, hidden, 4))]
    model = _model(nodes, [_info("x", [2, 8])], [_info("y", [2, 4])], inits)
    group = _group("hidden", hidden, [Member("w1", 1, OUT), Member("b1", 0, PER),
                                      Member("w2", 0, IN)])
    return model, group


def test_mlp_matmul_bias_matmul():
    rng = np.random.default_rng(1)
    model, group = _mlp(rng)
    keep = {"hidden": _keep(rng, 16, 6)}
    shrunk = _check_case(model, [group], keep)
    assert _stored(shrunk, "w1").shape == (8, 6)
    np.testing.assert_array_equal(_stored(shrunk, "w1"),
                                  _stored(model, "w1")[:, keep["hidden"]])
    np.testing.assert_array_equal(_stored(shrunk, "w2"),
                                  _stored(model, "w2")[keep["hidden"], :])
    assert _parameters(model) - _parameters(shrunk) == 10 * (8 + 1 + 4)


def test_a_group_not_in_keep_is_left_whole():
    rng = np.random.default_rng(2)
    model, group = _mlp(rng)
    shrunk = shrink(model, [group], {})
    assert _stored(shrunk, "w1").shape == (8, 16)
    assert not shrunk.graph.value_info  # stale shapes are dropped all the same


def test_conv_batchnorm_relu_conv():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "w1", "c1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [_init("w1", _rand(rng, 8, 3, 3, 3)), _init("c1", _rand(rng, 8)),
             _init("s", _rand(rng, 8)), _init("bb", _rand(rng, 8)), _init("m", _rand(rng, 8)),
             _init("v", _rand(rng, 8, positive=True)), _init("w2", _rand(rng, 5, 8, 3, 3))]
    model = _model(nodes, [_info("x", [1, 3, 8, 8])], [_info("y", [1, 5, 8, 8])], inits)
    group = _group("conv1", 8, [Member("w1", 0, OUT), Member("c1", 0, PER),
                                *(Member(n, 0, PER) for n in ("s", "bb", "m", "v")),
                                Member("w2", 1, IN)])
    shrunk = _check_case(model, [group], {"conv1": _keep(rng, 8, 3)})
    assert _stored(shrunk, "w2").shape == (5, 3, 3, 3)


def test_gemm_trans_b_feeding_gemm():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gemm", ["x", "w1", "c1"], ["h"], transB=1),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("Gemm", ["t", "w2", "c2"], ["y"], transB=1)]
    inits = [_init("w1", _rand(rng, 16, 8)), _init("c1", _rand(rng, 16)),
             _init("w2", _rand(rng, 4, 16)), _init("c2", _rand(rng, 4))]
    model = _model(nodes, [_info("x", [2, 8])], [_info("y", [2, 4])], inits)
    group = _group("fc1", 16, [Member("w1", 0, OUT), Member("c1", 0, PER),
                               Member("w2", 1, IN)])
    shrunk = _check_case(model, [group], {"fc1": _keep(rng, 16, 8)})
    assert _stored(shrunk, "w1").shape == (8, 8)
    assert _stored(shrunk, "c2").shape == (4,)


def test_depthwise_conv_in_the_middle_rewrites_group():
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1", "c1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wd", "cd"], ["d"], name="dw", group=8,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["e"]),
             helper.make_node("Conv", ["e", "w2"], ["y"])]
    inits = [_init("w1", _rand(rng, 8, 3, 3, 3)), _init("c1", _rand(rng, 8)),
             _init("wd", _rand(rng, 8, 1, 3, 3)), _init("cd", _rand(rng, 8)),
             _init("w2", _rand(rng, 4, 8, 1, 1))]
    model = _model(nodes, [_info("x", [1, 3, 6, 6])], [_info("y", [1, 4, 6, 6])], inits)
    group = _group("conv1", 8, [Member("w1", 0, OUT), Member("c1", 0, PER),
                                Member("wd", 0, PER), Member("cd", 0, PER),
                                Member("w2", 1, IN)],
                   attributes=(AttributeEdit("dw", "group"),))
    shrunk = _check_case(model, [group], {"conv1": _keep(rng, 8, 3)})
    dw = next(n for n in shrunk.graph.node if n.name == "dw")
    assert helper.get_attribute_value(dw.attribute[0]) == 3
    assert next(n for n in model.graph.node if n.name == "dw").attribute[0].i == 8


def test_grouped_conv_attribute_counts_units():
    """A channel of the group is one group of a grouped Conv (two of its input channels,
    one output): `group` becomes kept // channels_per_unit."""
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wg"], ["g"], name="grouped", group=4),
             helper.make_node("Relu", ["g"], ["s"]),
             helper.make_node("Conv", ["s", "wc"], ["y"])]
    inits = [_init("w1", _rand(rng, 8, 3, 1, 1)), _init("wg", _rand(rng, 4, 2, 1, 1)),
             _init("wc", _rand(rng, 3, 4, 1, 1))]
    model = _model(nodes, [_info("x", [1, 3, 4, 4])], [_info("y", [1, 3, 4, 4])], inits)
    group = _group("units", 4, [Member("w1", 0, OUT, block=2), Member("wg", 0, OUT),
                                Member("wc", 1, IN)],
                   attributes=(AttributeEdit("grouped", "group"),))
    shrunk = _check_case(model, [group], {"units": np.array([0, 2])})
    node = next(n for n in shrunk.graph.node if n.name == "grouped")
    assert helper.get_attribute_value(node.attribute[0]) == 2
    np.testing.assert_array_equal(_stored(shrunk, "w1"), _stored(model, "w1")[[0, 1, 4, 5]])


def _fused_split(rng, n: int = 6, p: int = 3) -> onnx.ModelProto:
    """x @ B[8, 2n+p] + bias, Split [n, n, p] into a (Relu), b (Sigmoid), c (as is), each
    read by its own MatMul, the three summed."""
    nodes = [helper.make_node("MatMul", ["x", "B"], ["f0"]),
             helper.make_node("Add", ["f0", "bias"], ["f"]),
             helper.make_node("Split", ["f", "sizes"], ["a", "b", "c"], axis=1),
             helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Sigmoid", ["b"], ["sb"]),
             helper.make_node("MatMul", ["ra", "wa"], ["ya"]),
             helper.make_node("MatMul", ["sb", "wb"], ["yb"]),
             helper.make_node("MatMul", ["c", "wc"], ["yc"]),
             helper.make_node("Sum", ["ya", "yb", "yc"], ["y"])]
    inits = [_init("B", _rand(rng, 8, 2 * n + p)), _init("bias", _rand(rng, 2 * n + p)),
             _init("sizes", np.array([n, n, p], np.int64)),
             _init("wa", _rand(rng, n, 4)), _init("wb", _rand(rng, n, 4)),
             _init("wc", _rand(rng, p, 4))]
    return _model(nodes, [_info("x", [2, 8])], [_info("y", [2, 4])], inits, opset=18)


def test_fused_weight_two_sections_one_keep_set():
    rng = np.random.default_rng(7)
    n = 6
    model = _fused_split(rng, n)
    group = _group("gate_up", n, [Member("B", 1, OUT, offset=0), Member("B", 1, OUT, offset=n),
                                  Member("bias", 0, PER, offset=0),
                                  Member("bias", 0, PER, offset=n),
                                  Member("wa", 0, IN), Member("wb", 0, IN)],
                   shapes=(ShapeEdit("sizes", 0), ShapeEdit("sizes", 1)))
    kept = _keep(rng, n, 2)
    shrunk = _check_case(model, [group], {"gate_up": kept})
    original = _stored(model, "B")
    columns = [*kept, *(n + kept), *range(2 * n, 2 * n + 3)]  # the third section stays
    np.testing.assert_array_equal(_stored(shrunk, "B"), original[:, columns])
    assert _stored(shrunk, "sizes").tolist() == [2, 2, 3]


def test_fused_weight_sections_of_two_groups_cut_in_one_go():
    rng = np.random.default_rng(8)
    n = 6
    model = _fused_split(rng, n)
    first = _group("a", n, [Member("B", 1, OUT), Member("bias", 0, PER), Member("wa", 0, IN)],
                   shapes=(ShapeEdit("sizes", 0),))
    second = _group("b", n, [Member("B", 1, OUT, offset=n), Member("bias", 0, PER, offset=n),
                             Member("wb", 0, IN)], shapes=(ShapeEdit("sizes", 1),))
    keep = {"a": _keep(rng, n, 4), "b": _keep(rng, n, 1)}
    shrunk = _check_case(model, [first, second], keep)
    columns = [*keep["a"], *(n + keep["b"]), *range(2 * n, 2 * n + 3)]
    np.testing.assert_array_equal(_stored(shrunk, "B"), _stored(model, "B")[:, columns])
    assert _stored(shrunk, "sizes").tolist() == [4, 1, 3]


def test_weights_in_constant_nodes():
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Constant", [], ["w1"], value=_init("w1v", _rand(rng, 8, 12))),
             helper.make_node("Constant", [], ["b1"], value=_init("b1v", _rand(rng, 12))),
             helper.make_node("MatMul", ["x", "w1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]),
             helper.make_node("Constant", [], ["w2"], value=_init("w2v", _rand(rng, 12, 4))),
             helper.make_node("MatMul", ["h2", "w2"], ["y"])]
    model = _model(nodes, [_info("x", [2, 8])], [_info("y", [2, 4])])
    group = _group("hidden", 12, [Member("w1", 1, OUT), Member("b1", 0, PER),
                                  Member("w2", 0, IN)])
    shrunk = _check_case(model, [group], {"hidden": _keep(rng, 12, 5)})
    assert _stored(shrunk, "w2").shape == (5, 4)


def test_heads_through_reshapes_with_shape_edits():
    """x @ Wv[8, H*dh] -> Reshape [0,0,H,dh] -> Relu -> Reshape [0,0,H*dh] -> @ Wo: a head is
    a block of dh positions; both shape constants count heads."""
    rng = np.random.default_rng(10)
    heads, head_dim = 4, 3
    nodes = [helper.make_node("MatMul", ["x", "wv"], ["v"]),
             helper.make_node("Reshape", ["v", "split_heads"], ["vh"]),
             helper.make_node("Relu", ["vh"], ["rh"]),
             helper.make_node("Reshape", ["rh", "merge_heads"], ["m"]),
             helper.make_node("MatMul", ["m", "wo"], ["y"])]
    inits = [_init("wv", _rand(rng, 8, heads * head_dim)),
             _init("split_heads", np.array([0, 0, heads, head_dim], np.int64)),
             _init("merge_heads", np.array([0, 0, heads * head_dim], np.int64)),
             _init("wo", _rand(rng, heads * head_dim, 8))]
    model = _model(nodes, [_info("x", [1, 5, 8])], [_info("y", [1, 5, 8])], inits)
    group = ChannelGroup("heads", StructureKind.HEADS, heads,
                         (Member("wv", 1, OUT, block=head_dim),
                          Member("wo", 0, IN, block=head_dim)),
                         shapes=(ShapeEdit("split_heads", 2),
                                 ShapeEdit("merge_heads", 2, per_channel=head_dim)))
    shrunk = _check_case(model, [group], {"heads": np.array([1, 3])})
    assert _stored(shrunk, "split_heads").tolist() == [0, 0, 2, 3]
    assert _stored(shrunk, "merge_heads").tolist() == [0, 0, 6]
    np.testing.assert_array_equal(_stored(shrunk, "wv"),
                                  _stored(model, "wv")[:, [3, 4, 5, 9, 10, 11]])


def test_attention_heads_edit_two_attributes_of_one_node():
    """ai.onnx Attention (opset 23) on 3-D q, k, v: a head is dh columns of each projection
    and dh rows of the output projection; q_num_heads and kv_num_heads count heads."""
    rng = np.random.default_rng(24)
    heads, head_dim, hidden = 4, 3, 8
    nodes = [*(helper.make_node("MatMul", ["x", f"w{p}"], [p]) for p in "qkv"),
             helper.make_node("Attention", ["q", "k", "v"], ["a"], name="attn",
                              q_num_heads=heads, kv_num_heads=heads),
             helper.make_node("MatMul", ["a", "wo"], ["y"])]
    inits = [*(_init(f"w{p}", _rand(rng, hidden, heads * head_dim)) for p in "qkv"),
             _init("wo", _rand(rng, heads * head_dim, hidden))]
    model = _model(nodes, [_info("x", [1, 5, hidden])], [_info("y", [1, 5, hidden])], inits,
                   opset=23)
    group = ChannelGroup("heads", StructureKind.HEADS, heads,
                         (*(Member(f"w{p}", 1, OUT, block=head_dim) for p in "qkv"),
                          Member("wo", 0, IN, block=head_dim)),
                         attributes=(AttributeEdit("attn", "q_num_heads"),
                                     AttributeEdit("attn", "kv_num_heads")))
    shrunk = _check_case(model, [group], {"heads": np.array([0, 2, 3])})
    attention = next(n for n in shrunk.graph.node if n.name == "attn")
    assert {a.name: a.i for a in attention.attribute} == {"q_num_heads": 3, "kv_num_heads": 3}


def test_conv_flatten_gemm_channel_is_a_block():
    rng = np.random.default_rng(11)
    nodes = [helper.make_node("Conv", ["x", "w1", "c1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "w2", "c2"], ["y"], transB=1)]
    inits = [_init("w1", _rand(rng, 6, 3, 3, 3)), _init("c1", _rand(rng, 6)),
             _init("w2", _rand(rng, 5, 6 * 16)), _init("c2", _rand(rng, 5))]
    model = _model(nodes, [_info("x", [1, 3, 4, 4])], [_info("y", [1, 5])], inits)
    group = _group("conv1", 6, [Member("w1", 0, OUT), Member("c1", 0, PER),
                                Member("w2", 1, IN, block=16)])
    shrunk = _check_case(model, [group], {"conv1": np.array([0, 4, 5])})
    assert _stored(shrunk, "w2").shape == (5, 48)


def test_weights_read_inside_if_branches():
    """Main-graph weights w1, b1, w2 read by both branches of an If (a group shared by the
    branches), and a group of the else branch's own initializers v1, v2."""
    rng = np.random.default_rng(12)
    then_nodes = [helper.make_node("MatMul", ["x", "w1"], ["t0"]),
                  helper.make_node("Add", ["t0", "b1"], ["t1"]),
                  helper.make_node("Relu", ["t1"], ["t2"]),
                  helper.make_node("MatMul", ["t2", "w2"], ["t_out"])]
    else_nodes = [helper.make_node("MatMul", ["x", "w1"], ["e0"]),
                  helper.make_node("Add", ["e0", "b1"], ["e1"]),
                  helper.make_node("Sigmoid", ["e1"], ["e2"]),
                  helper.make_node("MatMul", ["e2", "w2"], ["e3"]),
                  helper.make_node("MatMul", ["x", "v1"], ["u0"]),
                  helper.make_node("Tanh", ["u0"], ["u1"]),
                  helper.make_node("MatMul", ["u1", "v2"], ["u2"]),
                  helper.make_node("Add", ["e3", "u2"], ["e_out"])]
    then_branch = helper.make_graph(then_nodes, "then", [], [_info("t_out", [2, 4])])
    else_branch = helper.make_graph(else_nodes, "else", [], [_info("e_out", [2, 4])],
                                    [_init("v1", _rand(rng, 8, 10)),
                                     _init("v2", _rand(rng, 10, 4))])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_branch,
                              else_branch=else_branch)]
    inits = [_init("w1", _rand(rng, 8, 12)), _init("b1", _rand(rng, 12)),
             _init("w2", _rand(rng, 12, 4))]
    model = _model(nodes, [_info("x", [2, 8]), _info("cond", [], TensorProto.BOOL)],
                   [_info("y", [2, 4])], inits)
    assert any(len(g.value_info) for g in (model.graph.node[0].attribute[0].g,
                                           model.graph.node[0].attribute[1].g))
    shared = _group("shared", 12, [Member("w1", 1, OUT), Member("b1", 0, PER),
                                   Member("w2", 0, IN)])
    local = _group("local", 10, [Member("v1", 1, OUT), Member("v2", 0, IN)])
    feeds = [{"cond": np.array(True)}, {"cond": np.array(False)}]
    for keep in ({"shared": _keep(rng, 12, 7)}, {"local": _keep(rng, 10, 3)}):
        # (each alone: with cond True the local group changes nothing, see _check_case)
        cases = feeds if "shared" in keep else feeds[1:]
        shrunk = _check_case(model, [shared, local], keep, feeds_list=cases)
        for attr in shrunk.graph.node[0].attribute:
            assert not attr.g.value_info
    shrunk = shrink(model, [shared, local], {"shared": np.array([0, 5]),
                                             "local": np.array([9])})
    check_shrunk(shrunk)
    assert _stored(shrunk, "v1").shape == (8, 1)
    assert _stored(shrunk, "w2").shape == (2, 4)


def test_one_tensor_cut_on_two_axes_by_two_groups():
    """w2 is the consumer of the first hidden layer (axis 0) and the producer of the second
    (axis 1)."""
    rng = np.random.default_rng(21)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["b"]),
             helper.make_node("Add", ["b", "b2"], ["c"]),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("MatMul", ["s", "w3"], ["y"])]
    inits = [_init("w1", _rand(rng, 8, 12)), _init("w2", _rand(rng, 12, 10)),
             _init("b2", _rand(rng, 10)), _init("w3", _rand(rng, 10, 4))]
    model = _model(nodes, [_info("x", [2, 8])], [_info("y", [2, 4])], inits)
    first = _group("first", 12, [Member("w1", 1, OUT), Member("w2", 0, IN)])
    second = _group("second", 10, [Member("w2", 1, OUT), Member("b2", 0, PER),
                                   Member("w3", 0, IN)])
    keep = {"first": _keep(rng, 12, 5), "second": _keep(rng, 10, 3)}
    shrunk = _check_case(model, [first, second], keep)
    np.testing.assert_array_equal(_stored(shrunk, "w2"),
                                  _stored(model, "w2")[np.ix_(keep["first"], keep["second"])])
    assert _parameters(model) - _parameters(shrunk) == (
        7 * 8 + (12 * 10 - 5 * 3) + 7 + 7 * 4)


def test_concat_branches_are_sections_of_the_consumer():
    rng = np.random.default_rng(22)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"]),
             helper.make_node("MatMul", ["x", "wb"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [_init("wa", _rand(rng, 8, 6)), _init("wb", _rand(rng, 8, 5)),
             _init("w2", _rand(rng, 11, 4))]
    model = _model(nodes, [_info("x", [2, 8])], [_info("y", [2, 4])], inits)
    branch_a = _group("a", 6, [Member("wa", 1, OUT), Member("w2", 0, IN)])
    branch_b = _group("b", 5, [Member("wb", 1, OUT), Member("w2", 0, IN, offset=6)])
    keep = {"a": np.array([0, 5]), "b": np.array([1, 2, 4])}
    shrunk = _check_case(model, [branch_a, branch_b], keep)
    np.testing.assert_array_equal(_stored(shrunk, "w2"), _stored(model, "w2")[[0, 5, 7, 8, 10]])
    # the second branch alone: the first section stays whole
    shrunk = _check_case(model, [branch_a, branch_b], {"b": np.array([3])})
    np.testing.assert_array_equal(_stored(shrunk, "w2"),
                                  _stored(model, "w2")[[0, 1, 2, 3, 4, 5, 9]])


def test_group_without_consumer_weights_is_zeroed_at_its_producers():
    """Query and key dimensions meet in a dot product of two activations: no INPUT member,
    so the oracle zeroes the producers (and bias) instead."""
    rng = np.random.default_rng(23)
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q0"]),
             helper.make_node("Add", ["q0", "bq"], ["q"]),
             helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
             helper.make_node("MatMul", ["q", "kt"], ["y"])]
    inits = [_init("wq", _rand(rng, 8, 10)), _init("bq", _rand(rng, 10)),
             _init("wk", _rand(rng, 8, 10))]
    model = _model(nodes, [_info("x", [3, 8])], [_info("y", [3, 3])], inits)
    group = _group("qk", 10, [Member("wq", 1, OUT), Member("bq", 0, PER),
                              Member("wk", 1, OUT)])
    _check_case(model, [group], {"qk": _keep(rng, 10, 4)})


def test_initializer_listed_as_graph_input_gets_its_new_shape():
    rng = np.random.default_rng(13)
    model, group = _mlp(rng)
    for tensor in model.graph.initializer:  # as IR 3 models list them
        model.graph.input.append(_info(tensor.name, list(tensor.dims)))
    model.ir_version = 3
    shrunk = _check_case(model, [group], {"hidden": _keep(rng, 16, 4)})
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in shrunk.graph.input}
    assert shapes["w1"] == [8, 4] and shapes["b1"] == [4] and shapes["x"] == [2, 8]


# --- storage: dtypes, typed fields, external data -----------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, "bfloat16", np.float64])
def test_other_float_types_are_cut_bit_exact(dtype):
    import ml_dtypes

    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np_dtype)
    rng = np.random.default_rng(14)
    w1, w2 = _rand(rng, 8, 16).astype(np_dtype), _rand(rng, 16, 4).astype(np_dtype)
    tensors = []
    for name, array in (("w1", w1), ("w2", w2)):
        tensors.append(helper.make_tensor(name, elem, array.shape, array.tobytes(), raw=True))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    model = _model(nodes, [_info("x", [2, 8], elem)], [_info("y", [2, 4], elem)], tensors)
    group = _group("hidden", 16, [Member("w1", 1, OUT), Member("w2", 0, IN)])
    kept = np.array([1, 2, 3, 8, 15])
    shrunk = shrink(model, [group], {"hidden": kept})
    check_shrunk(shrunk)
    got = _stored(shrunk, "w1")
    assert got.dtype == np_dtype
    assert got.tobytes() == np.ascontiguousarray(w1[:, kept]).tobytes()
    assert _stored(shrunk, "w2").tobytes() == w2[kept].tobytes()


def test_values_in_typed_fields_are_read_and_written():
    rng = np.random.default_rng(15)
    model, group = _mlp(rng)
    for tensor in model.graph.initializer:  # float_data instead of raw_data
        array = numpy_helper.to_array(tensor)
        tensor.CopyFrom(helper.make_tensor(tensor.name, TensorProto.FLOAT, array.shape,
                                           array.reshape(-1).tolist()))
        assert not tensor.HasField("raw_data")
    _check_case(model, [group], {"hidden": _keep(rng, 16, 9)})


def test_external_data_needs_the_folder_and_is_written_inline(tmp_path):
    rng = np.random.default_rng(16)
    model, group = _mlp(rng, hidden=64)
    path = tmp_path / "m.onnx"
    saved = onnx.ModelProto()
    saved.CopyFrom(model)  # (saving with external data changes the proto it saves)
    onnx.save_model(saved, str(path), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    lazy = onnx.load(str(path), load_external_data=False)
    keep = {"hidden": _keep(rng, 64, 20)}
    with pytest.raises(ValueError, match="external data"):
        shrink(lazy, [group], keep)
    shrunk = shrink(lazy, [group], keep, base_dir=tmp_path)
    check_shrunk(shrunk)
    expected = shrink(model, [group], keep)
    for name in ("w1", "b1", "w2"):
        np.testing.assert_array_equal(_stored(shrunk, name), _stored(expected, name))
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_array_equal(_run(shrunk, feeds)[0], _run(expected, feeds)[0])


# --- errors ---------------------------------------------------------------------------------

def _mlp_with(member: Member) -> tuple[onnx.ModelProto, ChannelGroup]:
    model, group = _mlp(np.random.default_rng(17))
    return model, _group("hidden", 16, [*group.members, member])


@pytest.mark.parametrize("member, words", [
    (Member("nowhere", 0, IN), "no initializer or Constant node stores tensor 'nowhere'"),
    (Member("w2", 2, IN), "axis out of range"),
    (Member("w2", -3, IN), "axis out of range"),
    (Member("w2", 1, IN), r"axis length 4 is less than offset 0 \+ 16"),
    (Member("b1", 0, PER, offset=1), "axis length 16 is less than offset 1"),
    (Member("w1", 1, OUT, block=2), "axis length 16 is less"),
])
def test_members_that_do_not_fit_are_value_errors(member, words):
    model, group = _mlp_with(member)
    with pytest.raises(ValueError, match=words) as info:
        shrink(model, [group], {"hidden": np.arange(4)})
    assert "group 'hidden'" in str(info.value) and repr(member.tensor) in str(info.value)


@pytest.mark.parametrize("kept, words", [
    (np.array([], np.int64), "no channel kept"),
    (np.array([3, 1]), "sorted and unique"),
    (np.array([1, 1, 2]), "sorted and unique"),
    (np.array([0, 16]), r"must lie in \[0, 16\)"),
    (np.array([-1, 2]), r"must lie in \[0, 16\)"),
    (np.array([0.0, 1.0]), "integer"),
    (np.array([0, 1, 2]), "not a multiple of 2"),
])
def test_bad_keep_sets_are_value_errors(kept, words):
    model, group = _mlp(np.random.default_rng(18))
    group = _group("hidden", 16, group.members, multiple_of=2)
    with pytest.raises(ValueError, match=words):
        shrink(model, [group], {"hidden": kept})


def test_unknown_group_overlapping_sections_and_missing_edits_are_value_errors():
    rng = np.random.default_rng(19)
    model, group = _mlp(rng)
    with pytest.raises(ValueError, match="not given"):
        shrink(model, [group], {"other": np.arange(2)})
    half = _group("half", 8, [Member("w1", 1, OUT, offset=4)])
    with pytest.raises(ValueError, match="overlap"):
        shrink(model, [group, half], {"hidden": np.arange(4), "half": np.arange(2)})
    missing_node = _group("hidden", 16, group.members,
                          attributes=(AttributeEdit("nowhere", "group"),))
    with pytest.raises(ValueError, match="0 nodes have that name"):
        shrink(model, [missing_node], {"hidden": np.arange(4)})
    bad_shape = _group("hidden", 16, group.members, shapes=(ShapeEdit("w1", 0),))
    with pytest.raises(ValueError, match="not a 1-D int64/int32 tensor"):
        shrink(model, [bad_shape], {"hidden": np.arange(4)})


def test_check_shrunk_names_an_incomplete_group():
    rng = np.random.default_rng(20)
    model, group = _mlp(rng)
    no_consumer = _group("hidden", 16, group.members[:2])  # w2 forgotten
    broken = shrink(model, [no_consumer], {"hidden": np.arange(4)})
    with pytest.raises(SurgeryError, match="shape inference"):
        check_shrunk(broken)


# --- groups found by the analysis -----------------------------------------------------------

def _find_groups():
    try:
        analysis = importlib.import_module("onnxprune.structured.analysis")
    except ImportError:
        pytest.skip("onnxprune.structured.analysis is not written yet")
    find = getattr(analysis, "find_groups", None)
    if find is None:
        pytest.skip("onnxprune.structured.analysis has no find_groups yet")
    return find


def _groups_from(result) -> list[ChannelGroup]:
    """The groups of whatever find_groups returns: groups alone, (groups, declined), or an
    object with `groups`."""
    if hasattr(result, "groups"):
        result = result.groups
    elif isinstance(result, tuple) and result and isinstance(result[0], (list, tuple)):
        result = result[0]
    return [g for g in result if isinstance(g, ChannelGroup)]


def _random_keep(groups: Sequence[ChannelGroup], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    keep = {}
    for group in groups:
        if not group.output_preserving:
            continue
        units = group.channels // group.multiple_of
        count = int(rng.integers(1, units + 1)) * group.multiple_of
        if count == group.channels and units > 1:
            count -= group.multiple_of
        keep[group.name] = _keep(rng, group.channels, count)
    return keep


def _check_found_groups(path, feeds: Mapping[str, np.ndarray] | None = None,
                        seeds: Sequence[int] = (0, 1)) -> None:
    """find_groups, then for each seed random keep sets on every output-preserving group:
    the shrunk model passes the checks, loses exactly the removed channels' parameters and
    computes what the zeroed model computes (which differs from the original's outputs)."""
    find_groups = _find_groups()
    model = onnx.load(str(path))
    before = model.SerializeToString()
    groups = _groups_from(find_groups(model))
    if feeds is None:
        from conftest import example_feeds

        feeds = example_feeds(path)
    for seed in seeds:
        keep = _random_keep(groups, np.random.default_rng(seed))
        if not keep:
            pytest.skip(f"{path.name}: the analysis finds no output-preserving group")
        shrunk = shrink(model, groups, keep, base_dir=path.parent)
        assert model.SerializeToString() == before
        check_shrunk(shrunk)
        assert _parameters(model) - _parameters(shrunk) == _expected_removed(model, groups, keep)
        reference = zeroed(model, groups, keep, base_dir=path.parent)
        got, want = _run(shrunk, feeds), _run(reference, feeds)
        for g, w in zip(got, want, strict=True):
            if np.issubdtype(np.asarray(w).dtype, np.floating):
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
            else:
                np.testing.assert_array_equal(g, w)
        original = _run(model, feeds)
        assert any(not np.array_equal(o, w) for o, w in zip(original, want, strict=True))


@pytest.mark.parametrize("name", ["mlp.onnx", "cnn.onnx", "transformer.onnx", "digits.onnx"])
def test_found_groups_on_demo_models(models_dir, name):
    _check_found_groups(models_dir / name)


@pytest.mark.parametrize("name", ["ppocr_rec", "ppocr_cls", "nudenet_320n", "mtcnn_onet",
                                  "gender_v1", "silero_vad", "ppocr_det", "mtcnn_rnet",
                                  "orientation",
                                  pytest.param("picodet_layout", marks=pytest.mark.slow)])
def test_found_groups_on_real_models(name):
    from conftest import REAL_MODELS, real_model

    path = real_model(name)
    _check_found_groups(path, REAL_MODELS[name].make_feeds(np.random.default_rng(0)))


# --- Split and Slice sections, found by the analysis ----------------------------------------

def _check_found_on(model: onnx.ModelProto, seeds: Sequence[int] = (0, 1, 2), **check
                    ) -> list[onnx.ModelProto]:
    """find_groups on a hand-built model, then shrink vs zeroed with random keep sets
    (`check`: more arguments of `_check_case`)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]  # the checker wants the outputs' shapes
    model.graph.output.extend(inferred.graph.output)
    groups = _groups_from(_find_groups()(model))
    assert groups
    return [_check_case(model, groups, _random_keep(groups, np.random.default_rng(seed)),
                        **check)
            for seed in seeds]


@pytest.mark.parametrize("form", ["input", "attribute", "shared"])
def test_c2f_split_sections(form):
    from test_structured_analysis import c2f

    model = c2f(split_attr=form == "attribute", shared_sizes=form == "shared")
    for shrunk in _check_found_on(model):
        splits = [n for n in shrunk.graph.node if n.op_type == "Split"]
        if form == "shared":  # each Split reads sizes of its own
            assert len({n.input[1] for n in splits}) == 2


def test_slices_of_the_channels_and_equal_parts():
    from test_structured_analysis import fused_gate_up, sliced

    _check_found_on(fused_gate_up())
    for start, end in [(0, 4), (4, 2**63 - 1), (-6, 2**63 - 1)]:
        _check_found_on(sliced(start, end))


def test_split_attribute_entry_is_rewritten_and_a_shared_shape_copied():
    rng = np.random.default_rng(3)
    model, group = _mlp(rng)
    sizes = _init("sizes", np.array([16, 0], np.int64))
    model.graph.initializer.append(sizes)
    model.graph.node.append(helper.make_node("Identity", ["sizes"], ["s1"], name="first"))
    model.graph.node.append(helper.make_node("Identity", ["sizes"], ["s2"], name="second"))
    model.graph.output.extend([_info("s1", [2], TensorProto.INT64),
                               _info("s2", [2], TensorProto.INT64)])
    model.graph.node.append(helper.make_node("Split", ["h2"], ["p", "q"], name="split",
                                             axis=1, split=[10, 6]))
    edited = _group("hidden", 16, group.members,
                    attributes=(AttributeEdit("split", "split", 1, 0),),
                    shapes=(ShapeEdit("sizes", 0, 1, "second"),))
    shrunk = shrink(model, [edited], {"hidden": np.arange(5)})
    split = next(n for n in shrunk.graph.node if n.name == "split")
    assert list(helper.get_attribute_value(split.attribute[1])) == [5, 6]
    second = next(n for n in shrunk.graph.node if n.name == "second")
    assert second.input[0] != "sizes"
    assert list(_stored(shrunk, second.input[0])) == [5, 0]
    assert list(_stored(shrunk, "sizes")) == [16, 0]


@pytest.mark.parametrize("flatten", [True, False])
def test_flattened_channels_as_blocks(flatten):
    from test_structured_analysis import conv_flatten_gemm

    _check_found_on(conv_flatten_gemm(flatten))


def test_grouped_conv_found_groups():
    from test_structured_analysis import grouped_conv

    _check_found_on(grouped_conv())


# --- attention heads, found by the analysis -------------------------------------------------

@pytest.mark.parametrize("kv_heads,group,rope_on", [(4, 1, True), (4, 1, False), (2, 3, True),
                                                    (3, 2, False)])
def test_attention_heads_found_groups(kv_heads, group, rope_on):
    """Multi-head and grouped-query attention (RoPE on D or not): random head keep sets,
    shrink == zeroed; the shape constants that count heads say the kept count."""
    from test_structured_analysis import attention

    model = attention(kv_heads=kv_heads, group=group, rope_on=rope_on)
    for shrunk in _check_found_on(model):
        wk = _stored(shrunk, "Wk")
        kept = wk.shape[1] // 4
        assert _stored(shrunk, "Wq").shape[1] == kept * group * 4
        merges = [n for n in shrunk.graph.node if n.output[0] == "c2"]
        assert _stored(shrunk, merges[0].input[1])[-1] == kept * group * 4
        splits = [n for n in shrunk.graph.node if n.output[0] in ("q2", "k2", "v2")]
        assert all(_stored(shrunk, n.input[1])[2] == kept for n in splits)


SMOLLM2 = Path("/tmp/onnxprune-lm/smollm2-135m.onnx")


def _first_layers(model: onnx.ModelProto, layers: int) -> onnx.ModelProto:
    """The decoder up to the residual stream after layer `layers` - 1 (its graph output)."""
    weight = f"model.layers.{layers - 1}.mlp.down_proj.weight"
    nodes = list(model.graph.node)
    down = next(k for k, n in enumerate(nodes) if weight in n.input)
    end = next(k for k in range(down + 1, len(nodes))
               if nodes[k].op_type == "Add" and nodes[down].output[0] in nodes[k].input)
    kept = nodes[:end + 1]
    read = {name for n in kept for name in n.input}
    graph = helper.make_graph(kept, "first_layers", list(model.graph.input),
                              [_info(kept[-1].output[0], None)],
                              [t for t in model.graph.initializer if t.name in read])
    first = helper.make_model(graph, opset_imports=list(model.opset_import))
    first.ir_version = model.ir_version
    return first


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 not exported (tools/export_lm.py)")
def test_smollm2_heads_and_ffn_found_groups():
    """SmolLM2-135M's first three layers (grouped-query attention, 3 KV heads of 3 query
    heads, RoPE; SwiGLU FFN), 8 tokens: random keep sets on every heads and FFN group."""
    model = _first_layers(onnx.load(str(SMOLLM2)), 3)
    tokens = np.random.default_rng(0).integers(0, 49152, (1, 8)).astype(np.int64)
    shrunk = _check_found_on(model, seeds=(0, 1), feeds_list=[{"input_ids": tokens}],
                             rtol=1e-4, atol=1e-4)
    assert _stored(shrunk[0], "model.layers.0.self_attn.k_proj.weight").shape[1] < 192


@pytest.mark.parametrize("kv_heads,group,microsoft", [(2, 2, False), (3, 1, False),
                                                      (4, 1, True)])
def test_fused_attention_heads_found_groups(kv_heads, group, microsoft):
    """ai.onnx Attention (q_num_heads = kept KV heads x group, kv_num_heads) and
    com.microsoft MultiHeadAttention (num_heads): shrink == zeroed."""
    from test_structured_analysis import fused_attention

    model = fused_attention(kv_heads, group, microsoft=microsoft)
    model.graph.output[0].CopyFrom(_info("y", [1, 5, 8]))  # onnx cannot infer contrib ops
    for shrunk in _check_found_on(model):
        kept = _stored(shrunk, "Wk").shape[1] // 3
        attention = next(n for n in shrunk.graph.node if n.name == "attn")
        values = {a.name: a.i for a in attention.attribute}
        assert values == ({"num_heads": kept} if microsoft else
                          {"q_num_heads": kept * group, "kv_num_heads": kept})
