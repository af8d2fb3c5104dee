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
"""

from __future__ import annotations

import onnx

from .groups import AttributeEdit, DeclineCause, ShapeEdit
from .propagation import Flow, Walk
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


# The heads attributes of attention ops on 3-D q, k, v ([B, S, heads·D]): the query heads'
# attribute and the KV heads' (None: the same as the query heads'), and the inputs that may
# be given besides q, k, v (masks and biases broadcast over the heads, checked by shape).
FUSED_ATTENTION = {
    ("", "Attention"): ("q_num_heads", "kv_num_heads", (3,)),
    ("com.microsoft", "MultiHeadAttention"): ("num_heads", None, (4, 5)),
}


def fused_attention(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    """ai.onnx Attention (opset 23) and com.microsoft MultiHeadAttention on 3-D q, k, v:
    the projections' columns are split into heads by the op itself. A channel is a KV head
    with its G query heads (G·D columns of q, D of k and v, G·Dv of the output); the heads
    attributes become attribute edits. Past/present key values, a packed or 4-D layout and
    a mask or bias per head are not followed."""
    label = walk.labels[index]
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    q_attr, kv_attr, optional = FUSED_ATTENTION[(domain, node.op_type)]
    reads = [walk.flows.get(name) for name in node.input[:3]]
    everything = [walk.flows[name] for name in walk.dataflow.reads[index] if name in walk.flows]
    why = _fused_layout(walk, node, reads, optional)
    heads = _int_attribute(node, q_attr)
    kv_heads = _int_attribute(node, kv_attr) if kv_attr else heads
    if why is None and (not heads or not kv_heads or heads % kv_heads):
        why = f"heads attributes {q_attr}={heads}, {kv_attr}={kv_heads}"
    if why is not None:
        for flow in everything:
            walk.pin(flow, DeclineCause.AXIS_MIXED, f"{node.op_type} {label}: {why}")
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
    space.attributes[(label, q_attr, None)] = AttributeEdit(label, q_attr, 1, None, group)
    if kv_attr:
        space.attributes[(label, kv_attr, None)] = AttributeEdit(label, kv_attr)
    walk.flows[node.output[0]] = Flow(q.sections, kv_heads, -1, 3,
                                      group * (v.channels // kv_heads))


def _fused_layout(walk: Walk, node: onnx.NodeProto, reads: list[Flow | None],
                  optional: tuple[int, ...]) -> str | None:
    """Why the inputs and outputs of a fused attention op are not followed, or None."""
    if any(flow is None for flow in reads):
        return "q, k and v are not all projections"
    if any(flow.axis != -1 or flow.block > 1 or len(flow.sections) != 1
           or walk.rank(flow, name) != 3 for flow, name in zip(reads, node.input, strict=False)
           if flow is not None):
        return "q, k and v are not [B, S, heads·D] projections"
    roots = {walk.root(flow.sections[0][0]) for flow in reads if flow is not None}
    if len(roots) != 3:
        return "q, k and v share their columns"
    for slot, name in enumerate(node.input):
        if slot < 3 or not name:
            continue
        if slot not in optional or name in walk.flows or walk.dim_at(name, -3) != 1:
            return f"input {slot} ({name}) is per head or not followed"
    if any(name for name in node.output[1:]):
        return "present key values or scores are outputs"
    return None


def _int_attribute(node: onnx.NodeProto, name: str) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return 0
