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

from .groups import DeclineCause, ShapeEdit
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
