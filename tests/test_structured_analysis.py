"""structured.analysis.find_groups: coupled channel groups on tiny models written here, each
decline rule by its cause, and consistency of the groups on the demo and real models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import real_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.io import load_model
from onnxprune.structured import (
    AttributeEdit,
    ChannelGroup,
    DeclineCause,
    Member,
    MemberRole,
    ShapeEdit,
    StructureKind,
)
from onnxprune.structured.analysis import find_groups

MODELS = Path(__file__).resolve().parent.parent / "models"
FLOAT = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def weight(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def model(nodes, inputs, outputs, initializers, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(name, FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return proto


def node(op, inputs, outputs, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=outputs[0] + "_node", **attrs)


def mlp(hidden_ops=(), extra_nodes=(), extra_inits=(), outputs=("y",)):
    """x[1,8] @ W1[8,16] + b1 -> Relu -> (hidden_ops) -> @ W2[16,4] -> y"""
    nodes = [node("MatMul", ["x", "W1"], ["h0"]), node("Add", ["h0", "b1"], ["h1"]),
             node("Relu", ["h1"], ["h2"]), *hidden_ops,
             node("MatMul", ["h9" if hidden_ops else "h2", "W2"], ["y"]), *extra_nodes]
    inits = [weight("W1", 8, 16), weight("b1", 16), weight("W2", 16, 4), *extra_inits]
    return model(nodes, [("x", [1, 8])], outputs, inits)


def one_group(proto, **options) -> ChannelGroup:
    groups, _ = find_groups(proto, **options)
    assert len(groups) == 1, groups
    return groups[0]


def causes(proto, **options) -> dict[str, DeclineCause]:
    return {d.value: d.cause for d in find_groups(proto, **options)[1]}


def test_mlp_is_one_ffn_group_with_its_bias():
    group = one_group(mlp())
    assert group.name == "h0"
    assert group.kind is StructureKind.FFN
    assert group.channels == 16
    assert group.members == (Member("W1", 1, MemberRole.OUTPUT),
                             Member("b1", 0, MemberRole.PER_CHANNEL),
                             Member("W2", 0, MemberRole.INPUT))
    assert group.params == 8 * 16 + 16 + 16 * 4
    assert group.macs == 8 * 16 + 16 * 4
    assert group.output_preserving
    assert causes(mlp()) == {"y": DeclineCause.GRAPH_OUTPUT}


def test_conv_batchnorm_relu_conv_group_holds_the_batchnorm():
    bn = [weight(n, 6) for n in ("s", "bias", "mean")]
    bn.append(numpy_helper.from_array(np.ones(6, np.float32), "var"))
    nodes = [node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             node("BatchNormalization", ["c1", "s", "bias", "mean", "var"], ["n1"]),
             node("Relu", ["n1"], ["r1"]),
             node("Conv", ["r1", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 8, 8])], ["y"],
                  [weight("W1", 6, 3, 3, 3), weight("B1", 6), *bn, weight("W2", 5, 6, 1, 1)])
    group = one_group(proto)
    assert group.kind is StructureKind.CHANNELS
    assert set(group.members) == {
        Member("W1", 0, MemberRole.OUTPUT), Member("B1", 0, MemberRole.PER_CHANNEL),
        Member("s", 0, MemberRole.PER_CHANNEL), Member("bias", 0, MemberRole.PER_CHANNEL),
        Member("mean", 0, MemberRole.PER_CHANNEL), Member("var", 0, MemberRole.PER_CHANNEL),
        Member("W2", 1, MemberRole.INPUT)}
    assert group.macs == (6 * 3 * 9 + 5 * 6) * 64


def test_gemm_with_trans_b_uses_the_rows_of_its_weight():
    nodes = [node("Gemm", ["x", "W1", "C1"], ["h"], transB=1), node("Relu", ["h"], ["r"]),
             node("Gemm", ["r", "W2"], ["y"], transB=1)]
    proto = model(nodes, [("x", [1, 8])], ["y"],
                  [weight("W1", 16, 8), weight("C1", 16), weight("W2", 4, 16)])
    group = one_group(proto)
    assert group.members == (Member("W1", 0, MemberRole.OUTPUT),
                             Member("C1", 0, MemberRole.PER_CHANNEL),
                             Member("W2", 1, MemberRole.INPUT))


def test_a_transposed_stored_weight_is_a_member_on_its_stored_axis():
    nodes = [node("Transpose", ["Wt"], ["W1"], perm=[1, 0]), node("MatMul", ["x", "W1"], ["h"]),
             node("Relu", ["h"], ["r"]), node("MatMul", ["r", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 8])], ["y"], [weight("Wt", 16, 8), weight("W2", 16, 4)])
    assert one_group(proto).members[0] == Member("Wt", 0, MemberRole.OUTPUT)


def test_depthwise_conv_passes_the_channels_with_its_weight_and_group():
    nodes = [node("Conv", ["x", "W1"], ["c1"]),
             node("Conv", ["c1", "Wd", "Bd"], ["c2"], group=6, pads=[1, 1, 1, 1]),
             node("Relu", ["c2"], ["r"]),
             node("Conv", ["r", "W3"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 8, 8])], ["y"],
                  [weight("W1", 6, 3, 1, 1), weight("Wd", 6, 1, 3, 3), weight("Bd", 6),
                   weight("W3", 4, 6, 1, 1)])
    group = one_group(proto)
    assert set(group.members) == {
        Member("W1", 0, MemberRole.OUTPUT), Member("Wd", 0, MemberRole.PER_CHANNEL),
        Member("Bd", 0, MemberRole.PER_CHANNEL), Member("W3", 1, MemberRole.INPUT)}
    assert [(a.node, a.attribute) for a in group.attributes] == [("c2_node", "group")]


def test_swiglu_gate_and_up_are_one_group():
    nodes = [node("MatMul", ["x", "Wg"], ["g"]), node("MatMul", ["x", "Wu"], ["u"]),
             node("Sigmoid", ["g"], ["sg"]), node("Mul", ["g", "sg"], ["silu"]),
             node("Mul", ["silu", "u"], ["h"]), node("MatMul", ["h", "Wd"], ["y"])]
    proto = model(nodes, [("x", [1, 5, 8])], ["y"],
                  [weight("Wg", 8, 16), weight("Wu", 8, 16), weight("Wd", 16, 8)])
    group = one_group(proto)
    assert group.kind is StructureKind.FFN
    assert {m for m in group.members if m.role is MemberRole.OUTPUT} == {
        Member("Wg", 1, MemberRole.OUTPUT), Member("Wu", 1, MemberRole.OUTPUT)}
    assert Member("Wd", 0, MemberRole.INPUT) in group.members
    assert group.macs == 3 * 8 * 16 * 5


def test_residual_add_of_two_producers_unions_them():
    nodes = [node("Conv", ["x", "Wa"], ["a"]), node("Conv", ["x", "Wb"], ["b"]),
             node("Add", ["a", "b"], ["s"]), node("Relu", ["s"], ["r"]),
             node("Conv", ["r", "Wc"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("Wa", 6, 3, 1, 1), weight("Wb", 6, 3, 1, 1), weight("Wc", 2, 6, 1, 1)])
    group = one_group(proto)
    assert group.name == "a" and group.kind is StructureKind.CHANNELS
    assert {m.tensor for m in group.members} == {"Wa", "Wb", "Wc"}


def test_squeeze_excitation_joins_the_gate_to_the_channels():
    nodes = [node("Conv", ["x", "W1"], ["c"]), node("GlobalAveragePool", ["c"], ["p"]),
             node("Conv", ["p", "Ws1"], ["s1"]), node("Relu", ["s1"], ["s2"]),
             node("Conv", ["s2", "Ws2"], ["s3"]), node("Sigmoid", ["s3"], ["s4"]),
             node("Mul", ["c", "s4"], ["m"]), node("Conv", ["m", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("W1", 8, 3, 1, 1), weight("Ws1", 2, 8, 1, 1),
                   weight("Ws2", 8, 2, 1, 1), weight("W2", 4, 8, 1, 1)])
    groups, _ = find_groups(proto)
    assert [g.name for g in groups] == ["c", "s1"]
    assert {m.tensor for m in groups[0].members} == {"W1", "Ws1", "Ws2", "W2"}


def test_concat_on_the_channel_axis_gives_each_branch_its_offset():
    nodes = [node("Conv", ["x", "Wa"], ["a"]), node("Conv", ["x", "Wb"], ["b"]),
             node("Concat", ["a", "b"], ["c"], axis=1), node("Conv", ["c", "Wc"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("Wa", 6, 3, 1, 1), weight("Wb", 4, 3, 1, 1),
                   weight("Wc", 2, 10, 1, 1)])
    groups, _ = find_groups(proto)
    assert [(g.name, g.channels) for g in groups] == [("a", 6), ("b", 4)]
    assert Member("Wc", 1, MemberRole.INPUT, 0) in groups[0].members
    assert Member("Wc", 1, MemberRole.INPUT, 6) in groups[1].members


def test_flatten_after_global_pool_keeps_the_channels():
    nodes = [node("Conv", ["x", "W1"], ["c"]), node("GlobalAveragePool", ["c"], ["p"]),
             node("Flatten", ["p"], ["f"]), node("Gemm", ["f", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("W1", 8, 3, 1, 1), weight("W2", 8, 5)])
    assert {m.tensor for m in one_group(proto).members} == {"W1", "W2"}


def test_paddle_style_reshaped_bias_is_a_member_with_a_shape_edit():
    shape = numpy_helper.from_array(np.array([1, 6, 1, 1], np.int64), "shape")
    nodes = [node("Conv", ["x", "W1"], ["c"]), node("Reshape", ["b", "shape"], ["b4"]),
             node("Add", ["c", "b4"], ["a"]), node("Conv", ["a", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("W1", 6, 3, 1, 1), weight("b", 6), shape, weight("W2", 2, 6, 1, 1)])
    group = one_group(proto)
    assert Member("b", 0, MemberRole.PER_CHANNEL) in group.members
    assert [(s.tensor, s.index) for s in group.shapes] == [("shape", 1)]


# ---- Split and Slice on the channel axis ---------------------------------------------------


def ints(name: str, *values: int) -> TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def c2f(split_attr: bool = False, shared_sizes: bool = False):
    """YOLOv8's C2f: Conv W1 (2c) -> Split [c, c] -> a, b; b -> Conv Wm -> Add(b, m) ->
    Concat(a, b, add) -> Conv W3. With `shared_sizes`, a second Split reads the same sizes."""
    c = 4
    split = (node("Split", ["h"], ["a", "b"], axis=1, split=[c, c]) if split_attr
             else node("Split", ["h", "sizes"], ["a", "b"], axis=1))
    nodes = [node("Conv", ["x", "W1"], ["h"]), split,
             node("Conv", ["b", "Wm"], ["m"]), node("Add", ["b", "m"], ["r"]),
             node("Concat", ["a", "b", "r"], ["cat"], axis=1), node("Conv", ["cat", "W3"], ["y"])]
    inits = [weight("W1", 2 * c, 3, 1, 1), weight("Wm", c, c, 1, 1),
             weight("W3", 5, 3 * c, 1, 1)]
    if not split_attr:
        inits.append(ints("sizes", c, c))
    if shared_sizes:
        nodes += [node("Conv", ["x", "V1"], ["v"]), node("Split", ["v", "sizes"], ["va", "vb"],
                                                          axis=1),
                  node("Concat", ["va", "vb"], ["vc"], axis=1), node("Conv", ["vc", "V2"], ["z"])]
        inits += [weight("V1", 2 * c, 3, 1, 1), weight("V2", 5, 2 * c, 1, 1)]
    outputs = ["y", "z"] if shared_sizes else ["y"]
    return model(nodes, [("x", [1, 3, 4, 4])], outputs, inits, opset=11 if split_attr else 17)


def test_c2f_split_gives_each_section_its_own_group_with_its_size_edited():
    groups, declined = find_groups(c2f())
    assert [(d.value, d.cause) for d in declined] == [("y", DeclineCause.GRAPH_OUTPUT)]
    first, second = groups
    assert first.name == "h[0:4]" and first.channels == 4
    assert set(first.members) == {Member("W1", 0, MemberRole.OUTPUT, 0),
                                  Member("W3", 1, MemberRole.INPUT, 0)}
    assert first.shapes == (ShapeEdit("sizes", 0),)
    assert second.name == "h[4:8]"
    # the second section meets the bottleneck in the residual Add: one keep set, read by the
    # last Conv twice (as b and as b + m)
    assert set(second.members) == {
        Member("W1", 0, MemberRole.OUTPUT, 4), Member("Wm", 0, MemberRole.OUTPUT),
        Member("Wm", 1, MemberRole.INPUT), Member("W3", 1, MemberRole.INPUT, 4),
        Member("W3", 1, MemberRole.INPUT, 8)}
    assert second.shapes == (ShapeEdit("sizes", 1),)


def test_split_sizes_as_an_attribute_are_attribute_edits():
    groups, _ = find_groups(c2f(split_attr=True))
    assert [g.attributes for g in groups] == [(AttributeEdit("a_node", "split", 1, 0),),
                                              (AttributeEdit("a_node", "split", 1, 1),)]


def test_split_sizes_read_by_two_splits_are_edited_per_reader():
    groups, _ = find_groups(c2f(shared_sizes=True))
    edits = {g.name: g.shapes for g in groups}
    assert edits["h[0:4]"] == (ShapeEdit("sizes", 0, 1, "a_node"),)
    assert edits["v[4:8]"] == (ShapeEdit("sizes", 1, 1, "va_node"),)


def fused_gate_up():
    """x @ W1[8, 12] -> Split into two equal parts (no sizes) -> SiLU(gate) * up -> @ W2."""
    nodes = [node("MatMul", ["x", "W1"], ["h"]),
             node("Split", ["h"], ["g", "u"], axis=-1, num_outputs=2),
             node("Sigmoid", ["g"], ["sg"]), node("Mul", ["g", "sg"], ["silu"]),
             node("Mul", ["silu", "u"], ["gu"]), node("MatMul", ["gu", "W2"], ["y"])]
    return model(nodes, [("x", [2, 8])], ["y"], [weight("W1", 8, 12), weight("W2", 6, 8)],
                 opset=18)


def test_split_into_equal_parts_without_sizes_keeps_one_set():
    group = one_group(fused_gate_up())
    assert group.channels == 6 and group.name == "h[0:6]"
    assert {(m.tensor, m.offset) for m in group.members} == {("W1", 0), ("W1", 6), ("W2", 0)}
    assert group.shapes == () and group.attributes == ()


def test_split_along_another_axis_passes_the_channels():
    nodes = [node("MatMul", ["x", "W1"], ["h"]),
             node("Split", ["h", "rows"], ["p", "q"], axis=0),
             node("Concat", ["p", "q"], ["c"], axis=0), node("MatMul", ["c", "W2"], ["y"])]
    proto = model(nodes, [("x", [4, 8])], ["y"],
                  [weight("W1", 8, 6), weight("W2", 6, 3), ints("rows", 1, 3)])
    assert {m.tensor for m in one_group(proto).members} == {"W1", "W2"}


def sliced(start: int, end: int):
    """x @ W1[8, 10] sliced on the channel axis [start:end] (and the rest dropped), @ W2."""
    nodes = [node("MatMul", ["x", "W1"], ["h"]),
             node("Slice", ["h", "starts", "ends", "axes"], ["s"]),
             node("MatMul", ["s", "W2"], ["y"])]
    width = (end % 10 if end < 0 else min(end, 10)) - start % 10
    return model(nodes, [("x", [2, 8])], ["y"],
                 [weight("W1", 8, 10), weight("W2", width, 3), ints("starts", start),
                  ints("ends", end), ints("axes", -1)])


def test_slice_of_a_prefix_edits_its_end():
    groups, declined = find_groups(sliced(0, 4))
    assert [(g.name, g.channels) for g in groups] == [("h[0:4]", 4)]
    assert groups[0].shapes == (ShapeEdit("ends", 0),)
    # the channels the Slice drops are read by no one
    assert [(d.value, d.cause) for d in declined] == [("h[4:10]", DeclineCause.UNKNOWN_OP),
                                                      ("y", DeclineCause.GRAPH_OUTPUT)]


def test_slice_of_a_suffix_edits_its_start_through_the_channels_before():
    groups, declined = find_groups(sliced(4, 2**63 - 1))
    assert [(g.name, g.shapes) for g in groups] == [("h[4:10]", ())]
    assert declined[0].value == "h[0:4]" and declined[0].cause is DeclineCause.UNKNOWN_OP
    # from the end: the start counts the kept channels of the suffix itself
    group = one_group(sliced(-6, 2**63 - 1))
    assert group.name == "h[4:10]" and group.shapes == (ShapeEdit("starts", 0, -1),)


def test_slice_of_a_middle_range_is_declined():
    # its end counts the channels before it and in it: two groups, no one count
    assert causes(sliced(2, 6))["h[2:6]"] is DeclineCause.GROUPS_DISAGREE
    assert causes(sliced(-6, -2))["h[4:8]"] is DeclineCause.GROUPS_DISAGREE


def test_slice_with_a_step_on_the_channels_is_declined():
    nodes = [node("MatMul", ["x", "W1"], ["h"]),
             node("Slice", ["h", "starts", "ends", "axes", "steps"], ["s"]),
             node("MatMul", ["s", "W2"], ["y"])]
    proto = model(nodes, [("x", [2, 8])], ["y"],
                  [weight("W1", 8, 10), weight("W2", 5, 3), ints("starts", 0),
                   ints("ends", 10), ints("axes", 1), ints("steps", 2)])
    assert causes(proto)["h"] is DeclineCause.AXIS_MIXED


def test_computed_split_sizes_are_not_a_constant():
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Neg", ["neg"], ["sizes"]),
             node("Split", ["h", "sizes"], ["a", "b"], axis=1),
             node("Concat", ["a", "b"], ["c"], axis=1), node("MatMul", ["c", "W2"], ["y"])]
    proto = model(nodes, [("x", [2, 8])], ["y"],
                  [weight("W1", 8, 6), weight("W2", 6, 3), ints("neg", -3, -3)])
    assert causes(proto)["h"] is DeclineCause.NOT_A_CONSTANT


def conv_flatten_gemm(flatten: bool = True):
    """Conv W1 (6 channels of 2x2) -> Flatten (or Reshape to [1, 24]) -> Gemm W2[24, 5]."""
    merge = (node("Flatten", ["c"], ["f"]) if flatten
             else node("Reshape", ["c", "shape"], ["f"]))
    nodes = [node("Conv", ["x", "W1"], ["c"]), merge, node("Gemm", ["f", "W2"], ["y"])]
    inits = [weight("W1", 6, 3, 3, 3), weight("W2", 24, 5)]
    if not flatten:
        inits.append(ints("shape", 1, 24))
    return model(nodes, [("x", [1, 3, 4, 4])], ["y"], inits)


def test_flatten_of_channels_and_space_makes_each_channel_a_block():
    group = one_group(conv_flatten_gemm())
    assert set(group.members) == {Member("W1", 0, MemberRole.OUTPUT),
                                  Member("W2", 0, MemberRole.INPUT, 0, 4)}
    assert group.params == 6 * 27 + 24 * 5
    reshaped = one_group(conv_flatten_gemm(flatten=False))
    assert reshaped.shapes == (ShapeEdit("shape", 1, 4),)


def test_blocked_channels_are_not_followed_through_other_ops():
    nodes = [node("Conv", ["x", "W1"], ["c"]), node("Flatten", ["c"], ["f"]),
             node("Softmax", ["f"], ["s"]), node("Gemm", ["s", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("W1", 6, 3, 3, 3), weight("W2", 24, 5)])
    assert causes(proto)["c"] is DeclineCause.AXIS_MIXED


def rope(x: str, out: str, head_dim: int) -> list[onnx.NodeProto]:
    """Rotary embedding on the last axis (D): x * cos + rotate_half(x) * sin."""
    return [node("Split", [x, "rope_split"], [f"{x}_lo", f"{x}_hi"], axis=-1),
            node("Neg", [f"{x}_hi"], [f"{x}_neg"]),
            node("Concat", [f"{x}_neg", f"{x}_lo"], [f"{x}_rot"], axis=-1),
            node("Mul", [x, "cos"], [f"{x}_cos"]), node("Mul", [f"{x}_rot", "sin"], [f"{x}_sin"]),
            node("Add", [f"{x}_cos", f"{x}_sin"], [out])]


def attention(kv_heads: int = 4, group: int = 1, head_dim: int = 4, hidden: int = 16,
              seq: int = 5, rope_on: bool = True, bias: bool = True):
    """Decomposed attention as exporters write it: q/k/v MatMul (+ bias) -> Reshape into
    heads -> Transpose -> RoPE on D -> Q @ Kᵀ / scale + mask -> Softmax -> @ V -> Transpose
    -> Reshape -> o_proj. With `group` 1, multi-head attention in [B, H, S, D]; above 1,
    grouped-query attention as SmolLM2's export writes it: q [B, KV, G, S, D], k and v
    [B, KV, 1, S, D] broadcast over the G query heads of each KV head (one shape constant
    for k and v). Values: q0 ... y."""
    heads = kv_heads * group
    nodes = [node("MatMul", ["x", "Wq"], ["q0"]), node("MatMul", ["x", "Wk"], ["k0"]),
             node("MatMul", ["x", "Wv"], ["v0"])]
    if bias:
        nodes += [node("Add", ["q0", "bq"], ["q1"]), node("Add", ["k0", "bk"], ["k1"]),
                  node("Add", ["v0", "bv"], ["v1"])]
    p = "1" if bias else "0"
    if group == 1:
        split = ints("split_heads", 0, 0, heads, head_dim)
        shapes = [split, ints("merge_heads", 0, 0, heads * head_dim)]
        nodes += [node("Reshape", [f"{x}{p}", "split_heads"], [f"{x}2"]) for x in "qkv"]
        nodes += [node("Transpose", [f"{x}2"], [f"{x}3"], perm=[0, 2, 1, 3]) for x in "qkv"]
        last, back = [0, 1, 3, 2], [0, 2, 1, 3]
    else:
        shapes = [ints("shape_q", 1, 0, kv_heads, group, head_dim),
                  ints("shape_kv", 1, 0, kv_heads, 1, head_dim),
                  ints("merge_heads", 1, 0, heads * head_dim)]
        nodes += [node("Reshape", [f"q{p}", "shape_q"], ["q2"]),
                  node("Reshape", [f"k{p}", "shape_kv"], ["k2"]),
                  node("Reshape", [f"v{p}", "shape_kv"], ["v2"])]
        nodes += [node("Transpose", [f"{x}2"], [f"{x}3"], perm=[0, 2, 3, 1, 4]) for x in "qkv"]
        last, back = [0, 1, 2, 4, 3], [0, 3, 1, 2, 4]
    if rope_on:
        nodes += rope("q3", "q4", head_dim) + rope("k3", "k4", head_dim)
    else:
        nodes += [node("Identity", ["q3"], ["q4"]), node("Identity", ["k3"], ["k4"])]
    nodes += [node("Transpose", ["k4"], ["kt"], perm=last),
              node("MatMul", ["q4", "kt"], ["s0"]), node("Div", ["s0", "scale"], ["s1"]),
              node("Add", ["s1", "mask"], ["s2"]), node("Softmax", ["s2"], ["p"], axis=-1),
              node("MatMul", ["p", "v3"], ["c0"]), node("Transpose", ["c0"], ["c1"], perm=back),
              node("Reshape", ["c1", "merge_heads"], ["c2"]), node("MatMul", ["c2", "Wo"], ["y"])]
    inits = [weight("Wq", hidden, heads * head_dim), weight("Wk", hidden, kv_heads * head_dim),
             weight("Wv", hidden, kv_heads * head_dim), weight("Wo", heads * head_dim, hidden),
             weight("cos", seq, head_dim), weight("sin", seq, head_dim),
             ints("rope_split", head_dim // 2, head_dim // 2),
             numpy_helper.from_array(np.array(2.0, np.float32), "scale"),
             numpy_helper.from_array(np.triu(np.full((seq, seq), -1e4, np.float32), 1),
                                     "mask"), *shapes]
    if bias:
        inits += [weight("bq", heads * head_dim), weight("bk", kv_heads * head_dim),
                  weight("bv", kv_heads * head_dim)]
    return model(nodes, [("x", [1, seq, hidden])], ["y"], inits)


def test_multi_head_attention_is_one_heads_group():
    """A head is D columns of q, k, v (and their biases) and D rows of o_proj; the Reshape
    into heads (one constant read by three Reshapes: an edit per reader) and back count
    heads."""
    group = one_group(attention())
    assert group.kind is StructureKind.HEADS and group.channels == 4
    out, per, inp = MemberRole.OUTPUT, MemberRole.PER_CHANNEL, MemberRole.INPUT
    assert set(group.members) == {*(Member(f"W{x}", 1, out, 0, 4) for x in "qkv"),
                                  *(Member(f"b{x}", 0, per, 0, 4) for x in "qkv"),
                                  Member("Wo", 0, inp, 0, 4)}
    assert set(group.shapes) == {*(ShapeEdit("split_heads", 2, 1, f"{x}2_node") for x in "qkv"),
                                 ShapeEdit("merge_heads", 2, 4)}
    assert group.params == 4 * 4 * (3 * 16 + 3 + 16)


def test_grouped_query_attention_group_is_a_kv_head_with_its_query_heads():
    """SmolLM2's layout, 2 KV heads of 3 query heads: a channel is one KV head (D columns of
    k and v) with its query heads (3·D consecutive columns of q, 3·D rows of o_proj)."""
    group = one_group(attention(kv_heads=2, group=3, head_dim=4, hidden=12, bias=False))
    assert group.kind is StructureKind.HEADS and group.channels == 2
    out, inp = MemberRole.OUTPUT, MemberRole.INPUT
    assert set(group.members) == {Member("Wq", 1, out, 0, 12), Member("Wk", 1, out, 0, 4),
                                  Member("Wv", 1, out, 0, 4), Member("Wo", 0, inp, 0, 12)}
    assert set(group.shapes) == {ShapeEdit("shape_q", 2, 1), ShapeEdit("merge_heads", 2, 12),
                                 ShapeEdit("shape_kv", 2, 1, "k2_node"),
                                 ShapeEdit("shape_kv", 2, 1, "v2_node")}


def test_heads_on_the_contracted_axis_of_a_matmul_are_mixed():
    """Q @ Kᵀ without a Reshape into heads contracts the channels: both pinned."""
    nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["x", "Wk"], ["k"]),
             node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["s"]),
             node("MatMul", ["s", "x"], ["c"]), node("MatMul", ["c", "Wo"], ["y"])]
    proto = model(nodes, [("x", [1, 5, 8])], ["y"],
                  [weight("Wq", 8, 8), weight("Wk", 8, 8), weight("Wo", 8, 8)])
    found = causes(proto)
    assert found["q"] is DeclineCause.AXIS_MIXED and found["k"] is DeclineCause.AXIS_MIXED


def test_a_head_split_with_a_computed_target_is_not_a_constant():
    computed = attention()
    shape = next(n for n in computed.graph.node if n.output[0] == "q2")
    computed.graph.node.insert(0, node("Identity", ["split_heads"], ["computed_split"]))
    shape.input[1] = "computed_split"
    computed.graph.value_info.append(helper.make_tensor_value_info("q2", FLOAT, [1, 5, 4, 4]))
    assert causes(computed)["q0"] is DeclineCause.NOT_A_CONSTANT


def test_a_head_split_of_concatenated_channels_is_declined():
    nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["x", "Wk"], ["k"]),
             node("Concat", ["q", "k"], ["qk"], axis=-1), node("Reshape", ["qk", "split"], ["h"]),
             node("Reshape", ["h", "merge"], ["m"]), node("MatMul", ["m", "Wo"], ["y"])]
    proto = model(nodes, [("x", [1, 5, 8])], ["y"],
                  [weight("Wq", 8, 8), weight("Wk", 8, 8), weight("Wo", 16, 8),
                   ints("split", 0, 0, 4, 4), ints("merge", 0, 0, 16)])
    assert causes(proto)["q"] is DeclineCause.GROUPS_DISAGREE


def test_heads_met_by_a_graph_input_on_their_axis_pin_them():
    """A batched MatMul whose other operand has the head axis but carries no flow."""
    nodes = [node("MatMul", ["x", "Wv"], ["v0"]), node("Reshape", ["v0", "split"], ["v1"]),
             node("Transpose", ["v1"], ["v2"], perm=[0, 2, 1, 3]),
             node("MatMul", ["p", "v2"], ["c0"]),
             node("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
             node("Reshape", ["c1", "merge"], ["c2"]), node("MatMul", ["c2", "Wo"], ["y"])]
    proto = model(nodes, [("x", [1, 5, 8]), ("p", [1, 2, 5, 5])], ["y"],
                  [weight("Wv", 8, 8), weight("Wo", 8, 8), ints("split", 0, 0, 2, 4),
                   ints("merge", 0, 0, 8)])
    assert causes(proto)["v0"] is DeclineCause.GRAPH_INPUT


def fused_attention(kv_heads: int = 2, group: int = 2, head_dim: int = 3, hidden: int = 8,
                    microsoft: bool = False):
    """q/k/v MatMuls -> ai.onnx Attention (opset 23; q_num_heads, kv_num_heads) or
    com.microsoft MultiHeadAttention (num_heads) on [B, S, heads·D] -> o_proj."""
    heads = kv_heads * group
    if microsoft:
        attention_node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["a"],
                                          name="attn", domain="com.microsoft",
                                          num_heads=heads)
    else:
        attention_node = helper.make_node("Attention", ["q", "k", "v"], ["a"], name="attn",
                                          q_num_heads=heads, kv_num_heads=kv_heads)
    nodes = [node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["x", "Wk"], ["k"]),
             node("MatMul", ["x", "Wv"], ["v"]), attention_node,
             node("MatMul", ["a", "Wo"], ["y"])]
    inits = [weight("Wq", hidden, heads * head_dim), weight("Wk", hidden, kv_heads * head_dim),
             weight("Wv", hidden, kv_heads * head_dim), weight("Wo", heads * head_dim, hidden)]
    proto = model(nodes, [("x", [1, 5, hidden])], ["y"], inits, opset=17 if microsoft else 23)
    if microsoft:
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


@pytest.mark.parametrize("microsoft", [False, True])
def test_fused_attention_heads_are_attribute_edits(microsoft):
    """A channel is a KV head with its query heads; q_num_heads counts `group` per channel."""
    kv_heads, group_size = (4, 1) if microsoft else (2, 2)
    group = one_group(fused_attention(kv_heads, group_size, microsoft=microsoft))
    assert group.kind is StructureKind.HEADS and group.channels == kv_heads
    out, inp = MemberRole.OUTPUT, MemberRole.INPUT
    assert set(group.members) == {Member("Wq", 1, out, 0, 3 * group_size),
                                  Member("Wk", 1, out, 0, 3), Member("Wv", 1, out, 0, 3),
                                  Member("Wo", 0, inp, 0, 3 * group_size)}
    expected = ((AttributeEdit("attn", "num_heads"),) if microsoft else
                (AttributeEdit("attn", "kv_num_heads"),
                 AttributeEdit("attn", "q_num_heads", 1, None, 2)))
    assert group.attributes == expected


def test_fused_attention_with_present_key_values_is_declined():
    proto = fused_attention()
    attention_node = next(n for n in proto.graph.node if n.name == "attn")
    attention_node.output.extend(["present_k", "present_v"])
    assert causes(proto)["q"] is DeclineCause.AXIS_MIXED


# ---- one test per decline rule -----------------------------------------------------------


def test_graph_output_pins_the_channels():
    assert causes(mlp(outputs=("y", "h2")))["h0"] is DeclineCause.GRAPH_OUTPUT


def test_graph_input_meeting_the_channels_pins_them():
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("Add", ["h", "z"], ["s"]),
             node("MatMul", ["s", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 8]), ("z", [1, 16])], ["y"],
                  [weight("W1", 8, 16), weight("W2", 16, 4)])
    assert causes(proto)["h"] is DeclineCause.GRAPH_INPUT


def test_shared_weight_pins_the_channels():
    extra = [node("MatMul", ["x", "W1"], ["t"])]
    assert causes(mlp(extra_nodes=extra, outputs=("y", "t")))["h0"] is \
        DeclineCause.SHARED_WEIGHT


def test_a_value_read_inside_an_if_body_pins_the_channels():
    body = helper.make_graph([node("Identity", ["h2"], ["inner"])], "then", [],
                             [helper.make_tensor_value_info("inner", FLOAT, None)])
    other = helper.make_graph([node("Identity", ["x"], ["inner2"])], "else", [],
                              [helper.make_tensor_value_info("inner2", FLOAT, None)])
    extra = [node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL,
                                                                       [], [True])),
             node("If", ["cond"], ["branch"], then_branch=body, else_branch=other)]
    found = causes(mlp(extra_nodes=extra, outputs=("y", "branch")))
    assert found["h0"] is DeclineCause.SUBGRAPH_CAPTURE


def _norm_model(with_residual: bool):
    nodes = [node("MatMul", ["x", "W1"], ["h"])]
    if with_residual:
        nodes += [node("MatMul", ["x", "W0"], ["h0"]), node("Add", ["h", "h0"], ["hs"])]
    nodes += [node("LayerNormalization", ["hs" if with_residual else "h", "g", "beta"], ["n"],
                   axis=-1),
              node("MatMul", ["n", "W2"], ["y"])]
    return model(nodes, [("x", [1, 5, 8])], ["y"],
                  [weight("W1", 8, 16), weight("W0", 8, 16), weight("g", 16),
                   weight("beta", 16), weight("W2", 16, 4)])


def test_normalization_over_the_channels_is_declined_unless_allowed():
    assert causes(_norm_model(False))["h"] is DeclineCause.NORMALIZATION
    group = one_group(_norm_model(False), allow_norm=True)
    assert not group.output_preserving
    assert {Member("g", 0, MemberRole.PER_CHANNEL),
            Member("beta", 0, MemberRole.PER_CHANNEL)} <= set(group.members)


def test_residual_stream_is_declined_unless_hidden_size_allowed():
    assert causes(_norm_model(True))["h"] is DeclineCause.RESIDUAL_STREAM
    assert causes(_norm_model(True), allow_norm=True)["h"] is DeclineCause.RESIDUAL_STREAM
    assert causes(_norm_model(True), allow_hidden=True)["h"] is DeclineCause.NORMALIZATION
    group = one_group(_norm_model(True), allow_norm=True, allow_hidden=True)
    assert {m.tensor for m in group.members if m.role is MemberRole.OUTPUT} == {"W1", "W0"}
    assert group.kind is StructureKind.CHANNELS


def test_group_norm_sets_multiple_of_when_allowed():
    nodes = [node("Conv", ["x", "W1"], ["c"]),
             node("GroupNormalization", ["c", "s", "b"], ["n"], num_groups=2),
             node("Conv", ["n", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("W1", 8, 3, 1, 1), weight("s", 8), weight("b", 8),
                   weight("W2", 2, 8, 1, 1)], opset=21)
    assert causes(proto)["c"] is DeclineCause.NORMALIZATION
    assert one_group(proto, allow_norm=True).multiple_of == 2


def test_unknown_op_pins_the_channels():
    extra = [helper.make_node("Mystery", ["h2"], ["h9"], domain="example.custom")]
    proto = mlp(hidden_ops=extra)
    assert causes(proto)["h0"] is DeclineCause.UNKNOWN_OP


def test_an_op_that_mixes_the_channel_axis_pins_them():
    shape = numpy_helper.from_array(np.array([1, 4, 4], np.int64), "shape")
    extra = [node("Reshape", ["h2", "shape"], ["h3"]),
             node("Reshape", ["h3", "back"], ["h9"])]
    back = numpy_helper.from_array(np.array([1, 16], np.int64), "back")
    found = find_groups(mlp(hidden_ops=extra, extra_inits=[shape, back]))[1]
    assert found[0].value == "h0" and found[0].cause is DeclineCause.AXIS_MIXED


def test_a_computed_constant_operand_is_not_per_channel():
    extra = [node("Neg", ["k"], ["negk"]), node("Mul", ["h2", "negk"], ["h9"])]
    proto = mlp(hidden_ops=extra, extra_inits=[weight("k", 16)])
    assert causes(proto)["h0"] is DeclineCause.NOT_PER_CHANNEL


def test_a_computed_weight_is_not_a_constant():
    nodes = [node("Neg", ["W"], ["Wn"]), node("MatMul", ["x", "Wn"], ["y"])]
    proto = model(nodes, [("x", [1, 8])], ["y"], [weight("W", 8, 4)])
    assert causes(proto)["y"] is DeclineCause.NOT_A_CONSTANT


def grouped_conv():
    """Conv W1 (8) -> Conv Wg (8 -> 8, group 2) -> Conv W3."""
    nodes = [node("Conv", ["x", "W1"], ["c"]), node("Conv", ["c", "Wg", "Bg"], ["g"], group=2),
             node("Conv", ["g", "W3"], ["y"])]
    return model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                 [weight("W1", 8, 3, 1, 1), weight("Wg", 8, 4, 1, 1), weight("Bg", 8),
                  weight("W3", 2, 8, 1, 1)])


def test_grouped_conv_keeps_one_set_in_every_group():
    groups, _ = find_groups(grouped_conv())
    into, out = groups
    # the input's two sections read the same weight columns: one keep set of 4
    assert into.name == "c[0:4]" and into.channels == 4
    assert set(into.members) == {Member("W1", 0, MemberRole.OUTPUT, 0),
                                 Member("W1", 0, MemberRole.OUTPUT, 4),
                                 Member("Wg", 1, MemberRole.INPUT)}
    # the output: 4 channels per group, the same in both
    assert out.name == "g" and out.channels == 4 and out.attributes == ()
    assert {(m.tensor, m.offset) for m in out.members} == {
        ("Wg", 0), ("Wg", 4), ("Bg", 0), ("Bg", 4), ("W3", 0), ("W3", 4)}


def test_grouped_conv_of_unequal_groups_is_declined():
    nodes = [node("Conv", ["x", "W1"], ["c"]), node("Conv", ["c", "Wg"], ["g"], group=2),
             node("Conv", ["g", "W3"], ["y"])]
    # the input is cut differently from the groups: a Concat of 3 + 5 channels
    nodes[0:1] = [node("Conv", ["x", "Wa"], ["a"]), node("Conv", ["x", "Wb"], ["b"]),
                  node("Concat", ["a", "b"], ["c"], axis=1)]
    proto = model(nodes, [("x", [1, 3, 4, 4])], ["y"],
                  [weight("Wa", 3, 3, 1, 1), weight("Wb", 5, 3, 1, 1),
                   weight("Wg", 8, 4, 1, 1), weight("W3", 2, 8, 1, 1)])
    found = causes(proto)
    assert found["a"] is DeclineCause.GROUPS_DISAGREE


def test_a_shape_read_of_the_channels_pins_them():
    extra = [node("Shape", ["h2"], ["s"]), node("Relu", ["h2"], ["h9"])]
    assert causes(mlp(hidden_ops=extra, outputs=("y", "s")))["h0"] is DeclineCause.SHAPE_READ


def test_one_channel_is_too_few():
    nodes = [node("MatMul", ["x", "W1"], ["h"]), node("MatMul", ["h", "W2"], ["y"])]
    proto = model(nodes, [("x", [1, 8])], ["y"], [weight("W1", 8, 1), weight("W2", 1, 4)])
    assert causes(proto)["h"] is DeclineCause.TOO_FEW_CHANNELS


# ---- consistency on demo and real models ---------------------------------------------------


def check_consistent(proto: onnx.ModelProto, groups, declined) -> None:
    """Every member is a stored tensor whose axis holds the group's channels; no (tensor,
    axis) pair is in two groups; every group has a producer and a consumer; names unique."""
    stored = {t.name: list(t.dims) for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for attr in n.attribute:
                if attr.name == "value":
                    stored[n.output[0]] = list(attr.t.dims)
    owners: dict[tuple[str, int, int], str] = {}
    for group in groups:
        roles = {m.role for m in group.members}
        assert MemberRole.OUTPUT in roles and MemberRole.INPUT in roles, group.name
        assert group.channels >= 2
        for m in group.members:
            assert m.tensor in stored, (group.name, m.tensor)
            assert stored[m.tensor][m.axis] >= m.offset + group.channels * m.block, \
                (group.name, m)
            # a tensor axis holds one group, or several side by side (Concat sections)
            assert owners.setdefault((m.tensor, m.axis, m.offset), group.name) == group.name
    names = [g.name for g in groups] + [d.value for d in declined]
    assert len(names) == len(set(names))


def _analyse(path: Path):
    proto = load_model(path, lazy=True).proto
    groups, declined = find_groups(proto)
    check_consistent(proto, groups, declined)
    return groups, declined


@pytest.mark.parametrize("name,least", [("mlp", 2), ("cnn", 1), ("transformer", 1),
                                         ("digits", 2)])
def test_demo_models(name, least):
    groups, declined = _analyse(MODELS / f"{name}.onnx")
    assert len(groups) >= least
    print(name, len(groups), "groups", len(declined), "declined")


def test_transformer_attention_heads_are_a_group():
    groups, declined = _analyse(MODELS / "transformer.onnx")
    heads = [g for g in groups if g.kind is StructureKind.HEADS]
    assert len(heads) == 1 and heads[0].channels == 4
    assert {m.block for m in heads[0].members} == {32}
    assert {d.cause for d in declined} == {DeclineCause.RESIDUAL_STREAM,
                                           DeclineCause.GRAPH_OUTPUT}


SMOLLM2 = Path("/tmp/onnxprune-lm/smollm2-135m.onnx")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason="SmolLM2 not exported (tools/export_lm.py)")
def test_smollm2_grouped_query_heads():
    """30 layers of 3 KV heads with 3 query heads each (head_dim 64): one heads group and
    one FFN group per layer; only the residual stream and the tied lm_head are declined."""
    groups, declined = _analyse(SMOLLM2)
    heads = [g for g in groups if g.kind is StructureKind.HEADS]
    assert len(heads) == 30 and len(groups) == 60
    assert all(g.channels == 3 for g in heads)
    blocks = {m.tensor.rsplit(".", 2)[-2]: m.block for m in heads[0].members}
    assert blocks == {"q_proj": 192, "k_proj": 64, "v_proj": 64, "o_proj": 192}
    assert len(heads[0].shapes) == 4  # shape_q, shape_kv (k and v), the merge
    assert {d.cause for d in declined} == {DeclineCause.RESIDUAL_STREAM,
                                           DeclineCause.SHARED_WEIGHT}


@pytest.mark.parametrize("name,least", [("ppocr_cls", 20), ("ppocr_rec", 15),
                                         ("nudenet_320n", 30), ("mtcnn_onet", 2),
                                         ("gender_v1", 2), ("silero_vad", 0)])
def test_real_models(name, least):
    groups, declined = _analyse(real_model(name))
    assert len(groups) >= least
    assert all(d.cause in DeclineCause for d in declined)
    print(name, len(groups), "groups", len(declined), "declined")


def test_yolov8_c2f_splits_are_followed():
    groups, declined = _analyse(real_model("nudenet_320n"))
    # every C2f block: both sections of its first Conv are groups
    assert sum(1 for g in groups if g.name.endswith("]") and "/cv1/conv/" in g.name) == 16
    # what stays declined is the detection head's output convs (box bins, class scores)
    # and the DFL's one-channel conv
    assert all("/model.22/" in d.value for d in declined)


def test_order_is_deterministic():
    path = MODELS / "cnn.onnx"
    assert find_groups(load_model(path, lazy=True).proto) == \
        find_groups(load_model(path, lazy=True).proto)


# ---- inspect --structured ------------------------------------------------------------------


def test_inspect_structured_json(capsys):
    from onnxprune.cli import main

    assert main(["inspect", str(MODELS / "mlp.onnx"), "--structured", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["name"] for g in report["groups"]] == ["/fc1/MatMul_output_0",
                                                     "/fc2/Gemm_output_0"]
    first = report["groups"][0]
    assert first["kind"] == "ffn" and first["channels"] == 512
    assert first["members"][0] == {"tensor": "fc1.weight", "axis": 1, "role": "output",
                                   "offset": 0, "block": 1}
    assert [(d["value"], d["cause"]) for d in report["declined"]] == [("logits",
                                                                      "graph_output")]


def test_inspect_structured_table(capsys):
    from onnxprune.cli import main

    assert main(["inspect", str(MODELS / "cnn.onnx"), "--structured"]) == 0
    out = capsys.readouterr().out
    assert "/conv4/Conv_output_0" in out and "fc.weight_kn" in out
    assert "groups disagree" in out and "graph output" in out
