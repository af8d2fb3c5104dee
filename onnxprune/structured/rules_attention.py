"""Rules for decomposed attention: a Reshape that splits the channels into heads, and a
MatMul of two activations that meet their heads on a batch axis.

Exporters write multi-head attention as q/k/v projections, a Reshape of `H·D` columns into
`[H, D]` (or, under grouped-query attention, `[KV, G, D]`: `G` query heads per KV head),
Transposes, the scores `Q·Kᵀ` and the context `P·V` as MatMuls batched over the head axis,
and a Reshape back to `H·D` before the output projection. A head is one channel of `D`
(or `G·D`) consecutive columns: the split re-blocks the projection's channel space
(`Walk.reblock`) so that one channel is one head, and the head axis is the channel axis
from there on. A batched MatMul keeps each head to itself, so the heads of its two
operands are one keep set (Q with K, the probabilities with V). Under grouped-query
attention K and V carry `KV` heads on an axis where Q has its `KV` groups (K's `G` axis is 1
and broadcasts): a channel is a KV head with all its query heads.

Hugging Face's `repeat_kv` writes the other GQA layout: K and V are repeated to `H = KV·G`
heads (Unsqueeze, Expand, Reshape) and meet a query of `H` heads. The repeat makes a space
of `KV·G` channels that meets the query heads like any K or V (`expand`); when the walk ends
it is re-blocked into `KV` channels of `G` query heads each and joined to the KV heads it
repeats (`finish_repeats`), so that the ops between stay on channels of one position.

Fused attention ops split the projections into heads themselves (`fused_attention`: ai.onnx
Attention, com.microsoft MultiHeadAttention and GroupQueryAttention on separate q, k, v);
com.microsoft Attention also holds the projection, one packed weight cut into q, k and v
sections (`packed_attention`). Their heads attributes become attribute edits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from ..graph import is_onnx_domain
from .groups import AttributeEdit, DeclineCause, Declined, Member, MemberRole, ShapeEdit
from .propagation import Flow, Walk
from .rules_layers import consume
from .rules_pointwise import meet
from .shapes import Dim, product


def find_split(before: tuple[Dim, ...], after: tuple[Dim, ...], channel: int,
               channels: int) -> tuple[int, int] | None:
    """Where a Reshape from `before` to `after` splits the channel axis (`channel` of
    `before`, `channels` long) into several axes: (first axis in `after`, how many)."""
    lead = product(before[:channel])
    if lead is None:
        return None
    for position in range(len(after)):
        if product(after[:position]) != lead:
            continue
        size = 1
        for count in range(1, len(after) - position + 1):
            dim = after[position + count - 1]
            if not isinstance(dim, int):
                return None
            size *= dim
            if size == channels:
                first = after[position]
                return (position, count) if count > 1 and isinstance(first, int) and (
                    first > 1) else None
            if size > channels:
                return None
    return None


def split_heads(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow,
                after: tuple[Dim, ...], position: int, count: int) -> None:
    """A Reshape that splits the channel axis into `after[position:position + count]`: the
    first of those axes is the new channel axis, each channel the block of the others (a
    head); the target's entry that spells the head count becomes a shape edit."""
    label = walk.labels[index]
    heads = after[position]
    assert isinstance(heads, int)
    factor = flow.channels // heads
    edit: tuple[str, str | None] | None = None
    if node.op_type != "Reshape" or flow.block > 1:
        walk.pin(flow, DeclineCause.AXIS_MIXED, f"{node.op_type} {label} splits the channel "
                 "axis")
        return
    shape_name = node.input[1]
    values = walk.values(shape_name)
    if values is None:
        walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"Reshape {label}: target computed")
        return
    target = [int(v) for v in values.reshape(-1)]
    if len(target) != len(after) or 0 in target[position:position + count] or (
            target[position] not in (heads, -1)):
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                 f"Reshape {label}: target {target} does not spell the split channels")
        return
    if target[position] == heads:
        edit = (shape_name, label if walk.uses(shape_name) > 1 else None)
    why = walk.reblock(flow.sections[0][0], factor) if len(flow.sections) == 1 else (
        "the channels are concatenated with others")
    if why is not None:
        walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                 f"Reshape {label} splits the channels into {heads} heads: {why}")
        return
    space = walk.space(flow.sections[0][0])
    if edit is not None:
        space.shapes[(edit[0], position, edit[1])] = ShapeEdit(edit[0], position, 1, edit[1])
    walk.flows[node.output[0]] = Flow(flow.sections, heads, position - len(after),
                                      len(after))


def batched_matmul(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    """MatMul of two activations: channels on a batch axis (not one of the last two) pass,
    and where both operands carry them they are one keep set (attention heads); channels on
    a matrix axis are contracted or mixed, and pinned."""
    label, output = walk.labels[index], node.output[0]
    flows: list[Flow] = []
    for slot, name in enumerate(node.input[:2]):
        flow = walk.flows.get(name)
        if flow is None:
            continue
        if flow.axis > -3 or flow.block > 1:
            walk.pin(flow, DeclineCause.AXIS_MIXED,
                     f"MatMul {label} multiplies the channels of input {slot} by a computed "
                     "value")
            continue
        flows.append(flow)
    if not flows:
        return
    merged = flows[0]
    if len(flows) == 2:
        merged = meet(walk, flows[0], flows[1], False, f"MatMul {label}")
    else:
        other = node.input[1] if node.input[0] in walk.flows else node.input[0]
        if walk.dim_at(other, merged.axis) != 1:
            cause, detail = walk.origin(other)
            walk.pin(merged, cause, f"MatMul {label} {detail}")
    contracted = walk.dim_at(node.input[1], -2)
    macs = walk.macs_factor(output, ()) * (contracted if isinstance(contracted, int) else 0)
    for space, _ in merged.sections:
        target = walk.space(space)
        target.heads = True
        target.macs += macs * target.channels // merged.channels
    walk.flows[output] = merged.moved(merged.axis, walk.rank(merged, output))



@dataclass(frozen=True)
class FusedHeads:
    """How a fused attention op on 3-D q, k, v ([B, S, heads·D]) counts its heads, and what
    its other inputs (by slot) hold. An input in no list is not followed."""

    q_heads: str  # the attribute that counts the query heads
    kv_heads: str | None  # ... the KV heads (None: the query heads' attribute counts both)
    broadcast: tuple[int, ...] = ()  # masks and biases: followed where they broadcast over heads
    free: tuple[int, ...] = ()  # hold no heads by the op's definition (lengths, caches, positions)
    past: tuple[int, ...] = ()  # past key and value [B, KV, P, D]: stored ones are members
    sinks: tuple[int, ...] = ()  # one value per query head [H] (attention sinks): members
    unread_outputs: bool = False  # outputs after the first (present key/value) are fine unread


FUSED_ATTENTION = {
    ("", "Attention"): FusedHeads("q_num_heads", "kv_num_heads", broadcast=(3,)),
    ("com.microsoft", "MultiHeadAttention"): FusedHeads("num_heads", None, broadcast=(4, 5)),
    # query, key, value, past key/value, seqlens_k, total_sequence_length, cos/sin caches,
    # position_ids, attention_bias, head_sink, k/v scales, q/k norm weights, query_seqlens
    ("com.microsoft", "GroupQueryAttention"): FusedHeads(
        "num_heads", "kv_num_heads", broadcast=(10,), free=(5, 6, 7, 8, 9, 16), past=(3, 4),
        sinks=(11,), unread_outputs=True),
}


def fused_attention(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    """ai.onnx Attention (opset 23), com.microsoft MultiHeadAttention and
    GroupQueryAttention on 3-D q, k, v: the projections' columns are split into heads by the
    op itself. A channel is a KV head with its G query heads (G·D columns of q, D of k and
    v, G·Dv of the output); the heads attributes become attribute edits, a stored past key
    or value ([B, KV, P, D], empty in a prefill) and attention sinks ([H]) members. A packed
    QKV input, past key values from graph inputs, outputs that are read besides the first,
    and masks, biases or scales per head are not followed."""
    label = walk.labels[index]
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    spec = FUSED_ATTENTION[(domain, node.op_type)]
    reads = [walk.flows.get(name) if name else None for name in node.input[:3]]
    everything = [walk.flows[name] for name in walk.dataflow.reads[index] if name in walk.flows]
    found = _fused_layout(walk, node, spec, reads)
    heads = _int_attribute(node, spec.q_heads)
    kv_heads = _int_attribute(node, spec.kv_heads) if spec.kv_heads else heads
    if found is None and (not heads or not kv_heads or heads % kv_heads):
        found = (DeclineCause.AXIS_MIXED,
                 f"heads attributes {spec.q_heads}={heads}, {spec.kv_heads}={kv_heads}")
    if found is None:
        found = _fused_extras(walk, node, spec, heads, kv_heads)
    if found is not None:
        cause, why = found
        for flow in everything:
            walk.pin(flow, cause, f"{node.op_type} {label}: {why}")
        return
    q, k, v = (flow for flow in reads if flow is not None)
    group = heads // kv_heads
    units = [(q, q.channels // kv_heads), (k, k.channels // kv_heads),
             (v, v.channels // kv_heads)]
    for flow, factor in units:
        reason: str | None
        if flow.channels % kv_heads or (flow is q and (flow.channels // heads) * heads
                                        != flow.channels):
            reason = f"{flow.channels} columns are not whole heads"
        else:
            reason = walk.reblock(flow.sections[0][0], factor)
        if reason is not None:
            for each in everything:
                walk.pin(each, DeclineCause.GROUPS_DISAGREE,
                         f"{node.op_type} {label} splits the columns into heads: {reason}")
            return
    first = q.sections[0][0]
    for flow, _ in units[1:]:
        walk.union(first, flow.sections[0][0], False)
    space = walk.space(first)
    space.heads = True
    space.attributes[(label, spec.q_heads, None)] = AttributeEdit(label, spec.q_heads, 1, None,
                                                                  group)
    if spec.kv_heads:
        space.attributes[(label, spec.kv_heads, None)] = AttributeEdit(label, spec.kv_heads)
    for name in _given(node, spec.past):
        walk.add_member(Flow(((first, 0),), kv_heads, -3, 4), name, 1, MemberRole.PER_CHANNEL)
    for name in _given(node, spec.sinks):
        walk.add_member(Flow(((first, 0),), kv_heads, -1, 1, group), name, 0,
                        MemberRole.PER_CHANNEL)
    walk.flows[node.output[0]] = Flow(q.sections, kv_heads, -1, 3,
                                      group * (v.channels // kv_heads))


def _given(node: onnx.NodeProto, slots: tuple[int, ...]) -> list[str]:
    """The names of the inputs of `node` at `slots` that are given."""
    return [node.input[slot] for slot in slots if slot < len(node.input) and node.input[slot]]


def _fused_layout(walk: Walk, node: onnx.NodeProto, spec: FusedHeads,
                  reads: list[Flow | None]) -> tuple[DeclineCause, str] | None:
    """Why the q, k, v inputs and the outputs of a fused attention op are not followed (the
    cause and a detail), or None."""
    if len(node.input) < 3 or not node.input[1] or not node.input[2]:
        return DeclineCause.AXIS_MIXED, "packed QKV (no key and value inputs) is not followed"
    if any(flow is None for flow in reads):
        return DeclineCause.AXIS_MIXED, "q, k and v are not all projections"
    if any(flow.axis != -1 or flow.block > 1 or len(flow.sections) != 1
           or walk.rank(flow, name) != 3 for flow, name in zip(reads, node.input, strict=False)
           if flow is not None):
        return DeclineCause.AXIS_MIXED, "q, k and v are not [B, S, heads·D] projections"
    roots = {walk.root(flow.sections[0][0]) for flow in reads if flow is not None}
    if len(roots) != 3:
        return DeclineCause.AXIS_MIXED, "q, k and v share their columns"
    for slot, name in enumerate(node.output):
        if slot == 0 or not name:
            continue
        if not spec.unread_outputs:
            return DeclineCause.AXIS_MIXED, "present key values or scores are outputs"
        if name in walk.index.main.escaping:
            return (DeclineCause.GRAPH_OUTPUT, f"output {slot} ({name}) is a graph output "
                    "(a KV cache keeps the heads the model returns)")
        if walk.index.main.consumers.get(name):
            return DeclineCause.AXIS_MIXED, f"output {slot} ({name}) is read by another node"
    return None


def _fused_extras(walk: Walk, node: onnx.NodeProto, spec: FusedHeads, heads: int,
                  kv_heads: int) -> tuple[DeclineCause, str] | None:
    """Why an input of a fused attention op besides q, k, v is not followed, or None."""
    for slot, name in enumerate(node.input):
        if slot < 3 or not name:
            continue
        if name in walk.flows:
            return DeclineCause.AXIS_MIXED, f"input {slot} ({name}) reads other channels"
        if slot in spec.free:
            continue
        if slot in spec.broadcast:
            if walk.dim_at(name, -3) != 1:
                return (DeclineCause.NOT_PER_CHANNEL,
                        f"input {slot} ({name}) holds values per head")
            continue
        if slot in spec.past or slot in spec.sinks:
            expected = ((None, kv_heads, None, None) if slot in spec.past else (heads,))
            why = _stored_as(walk, name, expected)
            if why is not None:
                return why[0], f"input {slot} ({name}) {why[1]}"
            continue
        return DeclineCause.AXIS_MIXED, f"input {slot} ({name}) is not followed"
    return None


def _stored_as(walk: Walk, name: str, expected: tuple[int | None, ...]
               ) -> tuple[DeclineCause, str] | None:
    """Why value `name` is not a stored tensor of shape `expected` (None: any size)."""
    tensor = walk.stored.get(name)
    if tensor is None:
        if name in walk.dataflow.graph_inputs:
            return (DeclineCause.GRAPH_INPUT, "is a graph input (a KV cache or per-head "
                    "values the model is given keep their heads)")
        return DeclineCause.NOT_A_CONSTANT, "is computed, not stored"
    dims = list(tensor.dims)
    if len(dims) != len(expected) or any(want is not None and dim != want
                                         for dim, want in zip(dims, expected, strict=True)):
        return DeclineCause.NOT_PER_CHANNEL, f"has shape {dims}, not {list(expected)}"
    return None


def _int_attribute(node: onnx.NodeProto, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return 0


def packed_attention(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    """com.microsoft Attention: the input [B, S, hidden] times the stored packed weight
    (input 1, [hidden, Q+K+V], with its bias [Q+K+V] as input 2), cut by the op into q, k
    and v sections of `num_heads` heads each (`qkv_hidden_sizes`, or three equal parts).
    The node reads the input's channels through the weight's rows, and makes heads: a
    channel is one head, D positions in each of the q and k sections and Dv in the v
    section of the weight's columns and the bias, and Dv columns of the output; `num_heads`
    and the entries of `qkv_hidden_sizes` are attribute edits. Past and present key values
    (read), a mask or bias per head and a computed weight are declined."""
    label, output = walk.labels[index], node.output[0]
    data = walk.flows.get(node.input[0])
    if data is not None and (data.axis != -1 or data.block > 1):
        walk.pin(data, DeclineCause.AXIS_MIXED,
                 f"Attention {label} reads another axis than the channels")
        data = None
    for name in node.input[1:]:
        if name in walk.flows:
            walk.pin(walk.flows[name], DeclineCause.AXIS_MIXED,
                     f"Attention {label} reads the channels as its weight, bias or mask")
    weight = walk.stored.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        cause = DeclineCause.NOT_A_CONSTANT if weight is None else DeclineCause.SHAPE_MISMATCH
        detail = (f"the weight of Attention {label} is computed, not stored" if weight is None
                  else f"Attention {label}: weight of shape {list(weight.dims)}")
        walk.pin(data, cause, detail)
        walk.not_candidates.append((index, Declined(output, cause, detail)))
        return
    dims = [int(dim) for dim in weight.dims]
    macs = math.prod(dims) * walk.macs_factor(node.input[0], (-1,))
    if data is not None:
        consume(walk, data, node, node.input[1], 0, macs)
    heads = _int_attribute(node, "num_heads")
    sizes = _ints_attribute(node, "qkv_hidden_sizes")
    found = _packed_layout(walk, node, dims, heads, sizes)
    if found is not None:
        walk.not_candidates.append((index, Declined(output, found[0],
                                                    f"Attention {label}: {found[1]}")))
        return
    q_size, k_size, v_size = sizes or [dims[1] // 3] * 3
    head, v_head = q_size // heads, v_size // heads
    space_id = walk.new_space(heads, index)
    space = walk.spaces[space_id]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    for offset, block in ((0, head), (q_size, head), (q_size + k_size, v_head)):
        _add_section(walk, space_id, node.input[1], 1, MemberRole.OUTPUT, offset, block)
        if bias is not None:
            _add_section(walk, space_id, bias, 0, MemberRole.PER_CHANNEL, offset, block)
    space.heads = True
    space.macs += macs
    space.attributes[(label, "num_heads", None)] = AttributeEdit(label, "num_heads")
    if sizes:
        for entry, block in enumerate((head, head, v_head)):
            space.attributes[(label, "qkv_hidden_sizes", entry)] = AttributeEdit(
                label, "qkv_hidden_sizes", 1, entry, block)
    walk.flows[output] = Flow(((space_id, 0),), heads, -1, 3, v_head)


# Slots of com.microsoft Attention's past ([2, B, H, P, D]) and attention_bias ([B, H or 1,
# S, T]); mask_index (3, int32) and past_sequence_length (6) never hold heads.
_PACKED_PAST, _PACKED_BIAS = 4, 5


def _packed_layout(walk: Walk, node: onnx.NodeProto, dims: list[int], heads: int,
                   sizes: list[int]) -> tuple[DeclineCause, str] | None:
    """Why the heads of a com.microsoft Attention are not followed, or None."""
    if sizes and len(sizes) != 3:
        return DeclineCause.SHAPE_MISMATCH, f"qkv_hidden_sizes {sizes}"
    q_size, k_size, v_size = sizes or [dims[1] // 3] * 3
    if (heads < 1 or q_size != k_size or q_size + k_size + v_size != dims[1]
            or q_size % heads or v_size % heads):
        return (DeclineCause.SHAPE_MISMATCH, f"{dims[1]} weight columns are not q, k and v "
                f"sections of {heads} heads (qkv_hidden_sizes {sizes or 'absent'})")
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        tensor = walk.stored.get(bias)
        if tensor is None:
            return DeclineCause.NOT_A_CONSTANT, f"bias {bias} is computed, not stored"
        if list(tensor.dims) != [dims[1]]:
            return DeclineCause.SHAPE_MISMATCH, f"bias of shape {list(tensor.dims)}"
    inputs = list(node.input) + [""] * 7
    if inputs[_PACKED_PAST]:
        cause = (DeclineCause.GRAPH_INPUT if inputs[_PACKED_PAST] in walk.dataflow.graph_inputs
                 else DeclineCause.AXIS_MIXED)
        return cause, f"past key values ({inputs[_PACKED_PAST]}) are not followed"
    if inputs[_PACKED_BIAS] and walk.dim_at(inputs[_PACKED_BIAS], -3) != 1:
        return (DeclineCause.NOT_PER_CHANNEL,
                f"attention bias {inputs[_PACKED_BIAS]} holds values per head")
    for slot, name in enumerate(node.output):
        if slot and name and (name in walk.index.main.escaping
                              or walk.index.main.consumers.get(name)):
            return DeclineCause.AXIS_MIXED, f"present key values ({name}) are read"
    return None


def _add_section(walk: Walk, space_id: int, tensor: str, axis: int, role: MemberRole,
                 offset: int, block: int) -> None:
    """Tensor `tensor` holds the channels of space `space_id` at `offset` positions of
    `axis`, `block` positions each (a section of a packed weight)."""
    space = walk.space(space_id)
    space.members.setdefault((tensor, axis, offset), Member(tensor, axis, role, offset, block))
    if walk.uses(tensor) > 1:
        space.pins.append((DeclineCause.SHARED_WEIGHT, f"{tensor} is also read by another node"))


def _ints_attribute(node: onnx.NodeProto, name: str) -> list[int]:
    for attr in node.attribute:
        if attr.name == name:
            return [int(value) for value in attr.ints]
    return []


def expand(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    """Expand with a constant shape: the channels pass where it broadcasts other axes (an
    entry that spells the channel count is a shape edit). Where it repeats each channel G
    times on the axis after the channels and a Reshape merges the two axes (Hugging Face's
    `repeat_kv` of grouped-query attention: K or V [B, KV, 1, S, D] -> [B, KV, G, S, D] ->
    [B, KV·G, S, D]), the output carries KV·G channels of a new space, which can meet the
    query heads; `finish_repeats` joins it to the KV heads when the walk ends."""
    label, output = walk.labels[index], node.output[0]
    values = walk.values(node.input[1]) if len(node.input) > 1 else None
    rank = walk.rank(flow, node.input[0])
    if values is None:
        walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"Expand {label}: shape computed")
        return
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"Expand {label}: rank unknown")
        return
    target = [int(v) for v in values.reshape(-1)]
    entry = len(target) + flow.axis  # broadcasting aligns the shapes at their ends
    if entry >= 0 and target[entry] not in (1, flow.channels):
        walk.pin(flow, DeclineCause.AXIS_MIXED, f"Expand {label} broadcasts the channel axis")
        return
    if entry >= 0 and target[entry] != 1 and flow.channels > 1:
        if len(flow.sections) > 1:
            walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                     f"Expand {label}: shape spells the count of concatenated channels")
        reader = label if walk.uses(node.input[1]) > 1 else None
        for space, _ in flow.sections:
            walk.space(space).shapes[(node.input[1], entry, reader)] = ShapeEdit(
                node.input[1], entry, 1, reader)
    new_rank = max(rank, len(target))
    repeats = _repeats(walk, node, flow)
    if repeats is None:
        walk.flows[output] = flow.moved(flow.axis, new_rank)
        return
    repeated = walk.new_space(flow.channels * repeats)
    walk.flows[output] = Flow(((repeated, 0),), flow.channels * repeats, flow.axis, new_rank)


def _repeats(walk: Walk, node: onnx.NodeProto, flow: Flow) -> int | None:
    """G where Expand `node` repeats each channel of `flow` G > 1 times on the axis after
    the channels and its one reader is a Reshape that merges the two axes (the rest alike)."""
    before, after = walk.shapes.get(node.input[0]), walk.shapes.get(node.output[0])
    if (before is None or after is None or len(before) != len(after) or flow.axis > -2
            or flow.block > 1 or len(flow.sections) != 1):
        return None
    channel = flow.axis + len(after)
    repeats = after[channel + 1]
    if before[channel + 1] != 1 or not isinstance(repeats, int) or repeats < 2:
        return None
    readers = walk.index.main.consumers.get(node.output[0], [])
    if walk.uses(node.output[0]) != 1 or len(readers) != 1:
        return None
    reader = readers[0].node
    merged = walk.shapes.get(reader.output[0]) if reader.output else None
    if reader.op_type != "Reshape" or not is_onnx_domain(reader) or merged is None:
        return None
    expected = [*after[:channel], flow.channels * repeats, *after[channel + 2:]]
    if list(merged) != expected or any(dim is None for dim in expected):
        return None
    return repeats


def finish_repeats(walk: Walk) -> None:
    """After the walk: the KV·G channels of each K or V repeat (`expand`), which have met the
    query heads in Q·Kᵀ and P·V, become KV channels of G query heads each (`Walk.reblock`)
    and one keep set with the KV heads they repeat. Where that cannot be, both are pinned."""
    found: dict[int, list[tuple[int, int, int]]] = {}  # by the repeat's space
    for index, node in enumerate(walk.dataflow.nodes):
        if node.op_type != "Expand" or not is_onnx_domain(node):
            continue
        source, repeated = walk.flows.get(node.input[0]), walk.flows.get(node.output[0])
        if source is None or repeated is None or repeated.channels == source.channels:
            continue
        if len(source.sections) != 1 or len(repeated.sections) != 1:
            walk.pin(source, DeclineCause.GROUPS_DISAGREE,
                     f"Expand {walk.labels[index]}: repeated heads were divided")
            walk.pin(repeated, DeclineCause.GROUPS_DISAGREE,
                     f"Expand {walk.labels[index]}: repeated heads were divided")
            continue
        found.setdefault(walk.root(repeated.sections[0][0]), []).append(
            (index, source.sections[0][0], repeated.channels // source.channels))
    for root, repeats in found.items():
        factors = {factor for _, _, factor in repeats}
        why = (f"repeats of {sorted(factors)} meet" if len(factors) > 1
               else walk.reblock(root, factors.pop()))
        if why is None and any(walk.space(kv).channels != walk.space(root).channels
                               for _, kv, _ in repeats):
            why = "the query heads are not whole groups of the repeated KV heads"
        if why is None:
            for _, kv, _ in repeats:
                walk.union(root, kv, False)
            continue
        for index, kv, factor in repeats:
            detail = (f"Expand {walk.labels[index]} repeats each KV head {factor} times: "
                      f"{why}")
            walk.space(kv).pins.append((DeclineCause.GROUPS_DISAGREE, detail))
            walk.space(root).pins.append((DeclineCause.GROUPS_DISAGREE, detail))
