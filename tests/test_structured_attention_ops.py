"""Attention heads of the fused com.microsoft ops and of Hugging Face's `repeat_kv`.

Three forms, each on a small model written here (random weights, fixed seed): the groups
`find_groups` finds (kind, channel count, members, edits), then random keep sets for which
`shrink` passes the checks and computes in onnxruntime (CPU) what `zeroed` computes, and
one test per reason a form is declined.

- com.microsoft GroupQueryAttention on q, k, v projections: a channel is a KV head with
  its G query heads; `num_heads` and `kv_num_heads` are rewritten; a stored past key/value
  (empty, as in a prefill) and attention sinks are members.
- com.microsoft Attention with its packed weight [hidden, Q+K+V] and bias: a channel is
  one head, a block of each of the three sections.
- Decomposed grouped-query attention with K and V repeated (Unsqueeze -> Expand ->
  Reshape to [B, KV·G, S, D]) before Q·Kᵀ and P·V.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_structured_analysis import causes, ints, model, node, one_group, rope, weight
from test_structured_surgery import _check_found_on, _info, _stored

from onnxprune.structured import (
    AttributeEdit,
    DeclineCause,
    Member,
    MemberRole,
    ShapeEdit,
    StructureKind,
)

OUT, IN, PER = MemberRole.OUTPUT, MemberRole.INPUT, MemberRole.PER_CHANNEL
SEQ = 5


def _array(name: str, values, dtype) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def _attributes(proto: onnx.ModelProto, name: str) -> dict[str, object]:
    found = next(n for n in proto.graph.node if n.name == name)
    return {a.name: helper.get_attribute_value(a) for a in found.attribute}


def _with_microsoft(proto: onnx.ModelProto, output_shape: list[int]) -> onnx.ModelProto:
    """Add the com.microsoft opset and the output's shape (onnx cannot infer contrib ops)."""
    proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    proto.graph.output[0].CopyFrom(_info("y", output_shape))
    return proto


# --- com.microsoft GroupQueryAttention ---------------------------------------------------

def gqa(kv_heads: int = 2, group: int = 2, head_dim: int = 8, hidden: int = 16,
        past: str = "absent", rotary: bool = False, sink: bool = False,
        present: str = "none", attention_bias: str = "none", packed: bool = False,
        extra: dict[int, str] | None = None) -> onnx.ModelProto:
    """x -> q/k/v MatMuls -> GroupQueryAttention (prefill: seqlens_k = S-1, total = S) ->
    o_proj. `past`: absent, empty (stored [1, KV, 0, D]), input (graph inputs), computed,
    wrong (stored with H heads). `present`: none, unread, output (graph outputs), read.
    `attention_bias`: none, broadcast ([1, 1, S, S]), per_head ([1, H, S, S]). `packed`:
    one QKV projection as the query, no key and value. `extra`: more inputs by slot."""
    heads = kv_heads * group
    inputs = ["q", "k", "v"] if not packed else ["qkv", "", ""]
    inputs += ["", "", "seqlens_k", "total_length"]
    inits = [weight("Wo", heads * head_dim, hidden),
             _array("seqlens_k", [SEQ - 1], np.int32), _array("total_length", SEQ, np.int32)]
    graph_inputs = [("x", [1, SEQ, hidden])]
    nodes = []
    if packed:
        inits.append(weight("Wqkv", hidden, (heads + 2 * kv_heads) * head_dim))
        nodes.append(node("MatMul", ["x", "Wqkv"], ["qkv"]))
    else:
        inits += [weight("Wq", hidden, heads * head_dim), weight("Wk", hidden, kv_heads * head_dim),
                  weight("Wv", hidden, kv_heads * head_dim)]
        nodes += [node("MatMul", ["x", f"W{x}"], [x]) for x in "qkv"]
    if past in ("empty", "wrong"):
        count = kv_heads if past == "empty" else heads
        inits += [_array(f"past_{x}", np.zeros((1, count, 0, head_dim)), np.float32)
                  for x in "kv"]
        inputs[3:5] = ["past_k", "past_v"]
    elif past == "input":
        graph_inputs += [(f"past_{x}", [1, kv_heads, 0, head_dim]) for x in "kv"]
        inputs[3:5] = ["past_k", "past_v"]
    elif past == "computed":
        inits += [_array(f"zero_{x}", np.zeros((1, kv_heads, 0, head_dim)), np.float32)
                  for x in "kv"]
        nodes += [node("Identity", [f"zero_{x}"], [f"past_{x}"]) for x in "kv"]
        inputs[3:5] = ["past_k", "past_v"]
    slots: dict[int, str] = dict(extra or {})
    attrs: dict[str, int] = {}
    if rotary:
        inits += [weight("cos_cache", 16, head_dim // 2), weight("sin_cache", 16, head_dim // 2)]
        slots.update({7: "cos_cache", 8: "sin_cache"})
        attrs["do_rotary"] = 1
    if attention_bias != "none":
        per_head = heads if attention_bias == "per_head" else 1
        inits.append(weight("attention_bias", 1, per_head, SEQ, SEQ))
        slots[10] = "attention_bias"
    if sink:
        inits.append(weight("head_sink", heads))
        slots[11] = "head_sink"
    for slot, name in sorted(slots.items()):
        inputs += [""] * (slot + 1 - len(inputs))
        inputs[slot] = name
    outputs = ["a"] if present == "none" else ["a", "present_k", "present_v"]
    nodes += [helper.make_node("GroupQueryAttention", inputs, outputs, name="attn",
                               domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                               **attrs),
              node("MatMul", ["a", "Wo"], ["y"])]
    graph_outputs = ["y"]
    if present == "output":
        graph_outputs += ["present_k", "present_v"]
    elif present == "read":
        nodes.append(node("ReduceSum", ["present_k"], ["present_sum"], keepdims=0))
        graph_outputs.append("present_sum")
    proto = model(nodes, graph_inputs, graph_outputs, inits)
    return _with_microsoft(proto, [1, SEQ, hidden])


def test_gqa_group_is_a_kv_head_with_its_query_heads():
    """2 KV heads of 3 query heads, 8 columns each: G·D columns of q, D of k and v, G·D rows
    of o_proj; num_heads counts G per kept channel, kv_num_heads one; the empty past key
    and value and the attention sinks are members."""
    group = one_group(gqa(kv_heads=2, group=3, past="empty", sink=True))
    assert group.kind is StructureKind.HEADS and group.channels == 2
    assert set(group.members) == {
        Member("Wq", 1, OUT, 0, 24), Member("Wk", 1, OUT, 0, 8), Member("Wv", 1, OUT, 0, 8),
        Member("past_k", 1, PER, 0, 1), Member("past_v", 1, PER, 0, 1),
        Member("head_sink", 0, PER, 0, 3), Member("Wo", 0, IN, 0, 24)}
    assert set(group.attributes) == {AttributeEdit("attn", "num_heads", 1, None, 3),
                                     AttributeEdit("attn", "kv_num_heads")}


@pytest.mark.parametrize("kv_heads,group,options", [
    (2, 2, {}),
    (3, 2, {"past": "empty", "present": "unread"}),
    (4, 1, {"sink": True}),
    (2, 3, {"rotary": True, "head_dim": 16, "attention_bias": "broadcast"}),
])
def test_gqa_shrink_equals_zeroed(kv_heads, group, options):
    """Random KV-head keep sets: the shrunk model passes the checker and computes what the
    zeroed model computes; the heads attributes say the kept counts."""
    head_dim = options.get("head_dim", 8)
    proto = gqa(kv_heads, group, **options)
    for shrunk in _check_found_on(proto):
        kept = _stored(shrunk, "Wk").shape[1] // head_dim
        assert kept < kv_heads
        assert _stored(shrunk, "Wq").shape[1] == kept * group * head_dim
        assert _attributes(shrunk, "attn") | {"do_rotary": 0} == {
            "num_heads": kept * group, "kv_num_heads": kept, "do_rotary": 0}
        if options.get("past") == "empty":
            assert _stored(shrunk, "past_k").shape == (1, kept, 0, head_dim)
        if options.get("sink"):
            assert _stored(shrunk, "head_sink").shape == (kept * group,)


@pytest.mark.parametrize("options,cause", [
    ({"packed": True}, DeclineCause.AXIS_MIXED),
    ({"past": "input"}, DeclineCause.GRAPH_INPUT),
    ({"past": "computed"}, DeclineCause.NOT_A_CONSTANT),
    ({"past": "wrong"}, DeclineCause.NOT_PER_CHANNEL),
    ({"present": "output"}, DeclineCause.GRAPH_OUTPUT),
    ({"present": "read"}, DeclineCause.AXIS_MIXED),
    ({"attention_bias": "per_head"}, DeclineCause.NOT_PER_CHANNEL),
    ({"extra": {14: "Wq_norm"}}, DeclineCause.AXIS_MIXED),
])
def test_gqa_declines(options, cause):
    """A packed QKV input, a KV cache from graph inputs or into graph outputs, a computed or
    misshapen past, present key values read, a mask per head and an input no rule follows
    (a q norm weight) decline the heads, with their cause."""
    proto = gqa(**options)
    if "extra" in options:
        proto.graph.initializer.append(weight("Wq_norm", 8))
    found = causes(proto)
    assert found["qkv" if options.get("packed") else "q"] is cause
    if not options.get("packed"):
        assert found["k"] is cause and found["v"] is cause


def test_gqa_bad_heads_attributes_are_declined():
    proto = gqa(kv_heads=2, group=2)
    attention = next(n for n in proto.graph.node if n.name == "attn")
    for attr in attention.attribute:
        if attr.name == "kv_num_heads":
            attr.i = 3  # 4 query heads are not groups of 3 KV heads
    assert causes(proto)["q"] is DeclineCause.AXIS_MIXED


# --- com.microsoft Attention (packed weight) -----------------------------------------------

def packed(heads: int = 3, head: int = 4, v_head: int | None = None, hidden: int = 8,
           bias: bool = True, upstream: bool = False, sizes_attribute: bool = False,
           mask: bool = False, unidirectional: bool = False, past: bool = False,
           attention_bias: str = "none", present: str = "none",
           weight_computed: bool = False) -> onnx.ModelProto:
    """x (-> MatMul W0 -> Relu, where `upstream`) -> com.microsoft Attention (weight W
    [hidden, Q+K+V], bias b) -> o_proj. `v_head` other than `head` needs
    `qkv_hidden_sizes` (`sizes_attribute`)."""
    v_head = v_head or head
    sizes = [heads * head, heads * head, heads * v_head]
    inits = [weight("W", hidden, sum(sizes)), weight("Wo", heads * v_head, hidden)]
    nodes = []
    graph_inputs = [("x", [1, SEQ, hidden])]
    source = "x"
    if upstream:
        inits.append(weight("W0", hidden, hidden))
        nodes += [node("MatMul", ["x", "W0"], ["h0"]), node("Relu", ["h0"], ["h1"])]
        source = "h1"
    weight_name = "W"
    if weight_computed:
        nodes.append(node("Identity", ["W"], ["W_computed"]))
        weight_name = "W_computed"
    inputs = [source, weight_name, "b" if bias else ""]
    if bias:
        inits.append(weight("b", sum(sizes)))
    if mask:
        inits.append(_array("mask_index", [[1] * (SEQ - 1) + [0]], np.int32))
        inputs.append("mask_index")
    if past:
        graph_inputs.append(("past", [2, 1, heads, 0, head]))
        inputs += [""] * (4 - len(inputs)) + ["past"]
    if attention_bias != "none":
        inits.append(weight("attention_bias", 1, heads if attention_bias == "per_head" else 1,
                            SEQ, SEQ))
        inputs += [""] * (5 - len(inputs)) + ["attention_bias"]
    attrs: dict[str, object] = {"num_heads": heads}
    if sizes_attribute:
        attrs["qkv_hidden_sizes"] = sizes
    if unidirectional:
        attrs["unidirectional"] = 1
    outputs = ["a"] if present == "none" else ["a", "present"]
    nodes += [helper.make_node("Attention", inputs, outputs, name="attn", domain="com.microsoft",
                               **attrs),
              node("MatMul", ["a", "Wo"], ["y"])]
    graph_outputs = ["y"] + (["present"] if present == "output" else [])
    proto = model(nodes, graph_inputs, graph_outputs, inits)
    return _with_microsoft(proto, [1, SEQ, hidden])


def test_packed_attention_group_cuts_the_three_sections():
    """3 heads, q and k of 4 columns each, v of 2: a channel is 4 positions of the q and k
    sections and 2 of the v section, in the weight's columns and the bias; o_proj reads 2
    rows per head; num_heads and each entry of qkv_hidden_sizes are attribute edits. The
    rows of W read the upstream layer's channels (a group of its own)."""
    groups = [g for g in _groups(packed(v_head=2, sizes_attribute=True, upstream=True))]
    heads = next(g for g in groups if g.kind is StructureKind.HEADS)
    assert heads.channels == 3 and heads.name == "a"
    assert set(heads.members) == {
        Member("W", 1, OUT, 0, 4), Member("W", 1, OUT, 12, 4), Member("W", 1, OUT, 24, 2),
        Member("b", 0, PER, 0, 4), Member("b", 0, PER, 12, 4), Member("b", 0, PER, 24, 2),
        Member("Wo", 0, IN, 0, 2)}
    assert set(heads.attributes) == {
        AttributeEdit("attn", "num_heads"), AttributeEdit("attn", "qkv_hidden_sizes", 1, 0, 4),
        AttributeEdit("attn", "qkv_hidden_sizes", 1, 1, 4),
        AttributeEdit("attn", "qkv_hidden_sizes", 1, 2, 2)}
    hidden = next(g for g in groups if g.name == "h0")
    assert Member("W", 0, IN, 0, 1) in hidden.members


def _groups(proto: onnx.ModelProto):
    from onnxprune.structured.analysis import find_groups

    return find_groups(proto)[0]


@pytest.mark.parametrize("options", [
    {},
    {"v_head": 2, "sizes_attribute": True},
    {"upstream": True, "bias": False, "unidirectional": True},
    {"heads": 4, "mask": True, "attention_bias": "broadcast"},
])
def test_packed_attention_shrink_equals_zeroed(options):
    """Random head keep sets: shrink == zeroed in onnxruntime; num_heads and
    qkv_hidden_sizes say the kept heads."""
    heads, head = options.get("heads", 3), 4
    v_head = options.get("v_head", head)
    for shrunk in _check_found_on(packed(**options)):
        kept = _stored(shrunk, "Wo").shape[0] // v_head
        assert _stored(shrunk, "W").shape[1] == kept * (2 * head + v_head)
        values = _attributes(shrunk, "attn")
        assert values["num_heads"] == kept
        if options.get("sizes_attribute"):
            assert values["qkv_hidden_sizes"] == [kept * head, kept * head, kept * v_head]
        if options.get("upstream"):
            assert _stored(shrunk, "W").shape[0] == _stored(shrunk, "W0").shape[1]
    assert heads > 1


@pytest.mark.parametrize("options,cause", [
    ({"past": True}, DeclineCause.GRAPH_INPUT),
    ({"attention_bias": "per_head"}, DeclineCause.NOT_PER_CHANNEL),
    ({"present": "output"}, DeclineCause.AXIS_MIXED),
    ({"weight_computed": True}, DeclineCause.NOT_A_CONSTANT),
])
def test_packed_attention_declines(options, cause):
    """Past key values from a graph input, a bias per head, present key values read and a
    computed weight: the heads are declined, with their cause."""
    assert causes(packed(**options))["a"] is cause


def test_packed_attention_sizes_that_do_not_fit_are_a_shape_mismatch():
    proto = packed()
    attention = next(n for n in proto.graph.node if n.name == "attn")
    attention.attribute.append(helper.make_attribute("qkv_hidden_sizes", [12, 8, 16]))
    assert causes(proto)["a"] is DeclineCause.SHAPE_MISMATCH


# --- Hugging Face repeat_kv ----------------------------------------------------------------

def repeat_kv(kv_heads: int = 2, group: int = 3, head_dim: int = 4, hidden: int = 12,
              rope_on: bool = True, expand_shape: str = "full", merge: bool = True,
              concat_repeated: bool = False) -> onnx.ModelProto:
    """Decomposed grouped-query attention as torch exports Hugging Face's Llama: q [B, S, H,
    D] -> [B, H, S, D]; k and v [B, S, KV, D] -> [B, KV, S, D] (RoPE on k) -> Unsqueeze(2)
    -> Expand to [B, KV, G, S, D] -> Reshape to [B, KV·G, S, D] (`repeat_kv`) -> Q·Kᵀ,
    softmax, P·V -> [B, S, H·D] -> o_proj. `expand_shape`: "full" spells every dim (one
    constant for k and v, KV at entry 1), "broadcast" is [1, 1, G, 1, 1]. Without `merge`
    the query is [B, KV, G, S, D] and the repeated [B, KV, G, S, D] k and v meet it as they
    are. `concat_repeated`: the repeated k is also concatenated with itself on the head
    axis (a graph output)."""
    heads = kv_heads * group
    nodes = [node("MatMul", ["x", f"W{x}"], [f"{x}0"]) for x in "qkv"]
    nodes += [node("Reshape", ["k0", "split_kv"], ["k1"]),
              node("Reshape", ["v0", "split_kv"], ["v1"])]
    nodes += [node("Transpose", [f"{x}1"], [f"{x}2"], perm=[0, 2, 1, 3]) for x in "kv"]
    if rope_on:
        nodes += rope("k2", "k3", head_dim)
    else:
        nodes.append(node("Identity", ["k2"], ["k3"]))
    nodes.append(node("Identity", ["v2"], ["v3"]))
    shape = ([1, kv_heads, group, SEQ, head_dim] if expand_shape == "full"
             else [1, 1, group, 1, 1])
    for x in "kv":
        nodes += [node("Unsqueeze", [f"{x}3", "axis_two"], [f"{x}4"]),
                  node("Expand", [f"{x}4", "repeat"], [f"{x}5"])]
    inits = [weight("Wq", hidden, heads * head_dim), weight("Wk", hidden, kv_heads * head_dim),
             weight("Wv", hidden, kv_heads * head_dim), weight("Wo", heads * head_dim, hidden),
             weight("cos", SEQ, head_dim), weight("sin", SEQ, head_dim),
             ints("rope_split", head_dim // 2, head_dim // 2), ints("axis_two", 2),
             ints("repeat", *shape), ints("split_kv", 1, 0, kv_heads, head_dim),
             ints("merge", 1, 0, heads * head_dim),
             numpy_helper.from_array(np.array(2.0, np.float32), "scale"),
             numpy_helper.from_array(np.triu(np.full((SEQ, SEQ), -1e4, np.float32), 1),
                                     "mask")]
    if merge:
        inits += [ints("split_q", 1, 0, heads, head_dim), ints("merged", 1, heads, SEQ, head_dim)]
        nodes += [node("Reshape", ["q0", "split_q"], ["q1"]),
                  node("Transpose", ["q1"], ["q2"], perm=[0, 2, 1, 3])]
        nodes += [node("Reshape", [f"{x}5", "merged"], [f"{x}6"]) for x in "kv"]
        last, back = [0, 1, 3, 2], [0, 2, 1, 3]
    else:
        inits.append(ints("split_q", 1, 0, kv_heads, group, head_dim))
        nodes += [node("Reshape", ["q0", "split_q"], ["q1"]),
                  node("Transpose", ["q1"], ["q2"], perm=[0, 2, 3, 1, 4])]
        nodes += [node("Identity", [f"{x}5"], [f"{x}6"]) for x in "kv"]
        last, back = [0, 1, 2, 4, 3], [0, 3, 1, 2, 4]
    nodes += [node("Transpose", ["k6"], ["kt"], perm=last),
              node("MatMul", ["q2", "kt"], ["s0"]), node("Div", ["s0", "scale"], ["s1"]),
              node("Add", ["s1", "mask"], ["s2"]), node("Softmax", ["s2"], ["p"], axis=-1),
              node("MatMul", ["p", "v6"], ["c0"]), node("Transpose", ["c0"], ["c1"], perm=back),
              node("Reshape", ["c1", "merge"], ["c2"]), node("MatMul", ["c2", "Wo"], ["y"])]
    outputs = ["y"]
    if concat_repeated:
        nodes.append(node("Concat", ["k6", "k6"], ["kk"], axis=1))
        outputs.append("kk")
    return model(nodes, [("x", [1, SEQ, hidden])], outputs, inits)


def test_repeat_kv_group_is_a_kv_head_with_its_query_heads():
    """2 KV heads repeated 3 times: q and o_proj in blocks of 3·4, k and v of 4; the query
    split and the repeat's Reshape count 3 per kept KV head, the k/v split and the Expand
    shape (one constant, an edit per reader) one, the merge back 12."""
    group = one_group(repeat_kv(rope_on=False))
    assert group.kind is StructureKind.HEADS and group.channels == 2
    assert set(group.members) == {Member("Wq", 1, OUT, 0, 12), Member("Wk", 1, OUT, 0, 4),
                                  Member("Wv", 1, OUT, 0, 4), Member("Wo", 0, IN, 0, 12)}
    assert set(group.shapes) == {
        ShapeEdit("split_q", 2, 3), ShapeEdit("merge", 2, 12),
        ShapeEdit("split_kv", 2, 1, "k1_node"), ShapeEdit("split_kv", 2, 1, "v1_node"),
        ShapeEdit("repeat", 1, 1, "k5_node"), ShapeEdit("repeat", 1, 1, "v5_node"),
        ShapeEdit("merged", 1, 3, "k6_node"), ShapeEdit("merged", 1, 3, "v6_node")}


@pytest.mark.parametrize("kv_heads,group,rope_on,expand_shape", [
    (2, 3, True, "full"), (3, 2, False, "broadcast"), (4, 1, True, "full"),
    (3, 2, True, "full")])
def test_repeat_kv_shrink_equals_zeroed(kv_heads, group, rope_on, expand_shape):
    """Random KV-head keep sets: shrink == zeroed in onnxruntime; the Expand shape and the
    repeat's Reshape target say the kept heads."""
    proto = repeat_kv(kv_heads, group, hidden=12, rope_on=rope_on, expand_shape=expand_shape)
    for shrunk in _check_found_on(proto):
        kept = _stored(shrunk, "Wk").shape[1] // 4
        assert kept < kv_heads
        assert _stored(shrunk, "Wq").shape[1] == kept * group * 4
        readers = {n.output[0]: n.input[1] for n in shrunk.graph.node if len(n.input) > 1}
        assert _stored(shrunk, readers["q1"])[2] == kept * group
        assert _stored(shrunk, readers["c2"])[2] == kept * group * 4
        if group > 1:
            for x in "kv":
                assert _stored(shrunk, readers[f"{x}6"])[1] == kept * group
                assert _stored(shrunk, readers[f"{x}5"])[1] == (
                    kept if expand_shape == "full" else 1)


def test_expand_without_a_merge_passes_the_heads():
    """The repeated k and v left as [B, KV, G, S, D] meet a query of that layout: the
    channels pass the Expand (its KV entry an edit) and the heads are one group."""
    proto = repeat_kv(merge=False)
    group = one_group(proto)
    assert group.channels == 2 and ShapeEdit("repeat", 1, 1, "k5_node") in group.shapes
    _check_found_on(proto)


def test_a_repeat_whose_heads_are_concatenated_is_declined():
    """The repeated k also concatenated with itself on the head axis: the repeat cannot be
    joined back to the KV heads (the query heads are not whole groups there)."""
    found = causes(repeat_kv(concat_repeated=True))
    assert found["k0"] is DeclineCause.GROUPS_DISAGREE
    assert found["q0"] is DeclineCause.GROUPS_DISAGREE


def test_a_computed_expand_shape_is_not_a_constant():
    proto = repeat_kv()
    proto.graph.node.insert(0, node("Identity", ["repeat"], ["repeat_computed"]))
    for each in proto.graph.node:
        if each.op_type == "Expand":
            each.input[1] = "repeat_computed"
    assert causes(proto)["k0"] is DeclineCause.NOT_A_CONSTANT
