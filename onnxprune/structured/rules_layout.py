"""Rules for ops that move the channel axis or cut it: Transpose, Reshape/Flatten/Squeeze/
Unsqueeze (shape constants that spell the channel count become shape edits), Concat on the
channel axis (each input a section at its offset), and Shape/Size reads of the count."""

from __future__ import annotations

import onnx

from ..graph import attribute
from .groups import DeclineCause, ShapeEdit
from .propagation import Flow, Walk
from .rules_attention import find_split, split_heads
from .rules_pointwise import meet, operand
from .shapes import Dim, product


def transpose(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    perm = attribute(node, "perm", None)
    rank = len(perm) if perm else walk.rank(flow, node.input[0])
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE,
                  f"Transpose {walk.labels[index]}: rank unknown")
        return
    perm = list(perm) if perm else list(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):  # an invalid model: nothing can be proven
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                 f"Transpose {walk.labels[index]}: perm {perm} is not a permutation")
        return
    channel = perm.index(flow.axis + rank)
    walk.flows[node.output[0]] = flow.moved(channel - rank, rank)



def reshape(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    """Reshape, Flatten, Squeeze, Unsqueeze: fine where the channel axis stays one axis
    of its own (the dims before it multiply to the same); a Reshape target that spells
    the channel count becomes a shape edit."""
    op, label = node.op_type, walk.labels[index]
    before = walk.shapes.get(node.input[0])
    after = walk.shapes.get(node.output[0])
    if (before is None or after is None) and op in ("Squeeze", "Unsqueeze"):
        moved = squeeze(walk, node, flow)
        if moved is not None:
            walk.flows[node.output[0]] = moved
            return
    if before is None or after is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: shapes unknown")
        return
    channel = flow.axis + len(before)
    if not 0 <= channel < len(before):
        walk.pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label}: channel axis lost")
        return
    lead = product(before[:channel])
    target, block = None, 1
    for position, dim in enumerate(after):
        if lead is None or product(after[:position]) != lead or not isinstance(dim, int):
            continue
        if dim == flow.channels:
            target = position
            break
        block = _merged_block(before[channel + 1:], dim, flow.channels)
        if block > 1:  # the channel axis merged with (some of) the axes after it
            target = position
            break
    if target is None and flow.block == 1:
        split = find_split(before, after, channel, flow.channels)
        if split is not None:  # into heads: the first of the new axes holds the channels
            split_heads(walk, index, node, flow, after, *split)
            return
    if target is None or flow.block > 1:
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                 f"{op} {label} merges or splits the channel axis")
        return
    if op == "Reshape":
        shape_name = node.input[1]
        values = walk.values(shape_name)
        if values is None:
            walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"Reshape {label}: target computed")
            return
        values = values.reshape(-1)
        if len(values) == len(after) and int(values[target]) == flow.channels * block:
            if len(flow.sections) > 1:
                walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                         f"Reshape {label} of concatenated channels")
            reader = label if walk.uses(shape_name) > 1 else None
            for space, _ in flow.sections:
                walk.space(space).shapes[(shape_name, target, reader)] = ShapeEdit(
                    shape_name, target, block, reader)
        elif len(values) == len(after) and int(values[target]) == 0 and target != channel:
            walk.pin(flow, DeclineCause.AXIS_MIXED, f"Reshape {label} copies a dim")
            return
    walk.flows[node.output[0]] = Flow(flow.sections, flow.channels, target - len(after),
                                      len(after), block)


def _merged_block(trailing: tuple[Dim, ...], merged: int, channels: int) -> int:
    """How many positions a channel takes where the channel axis and the first axes of
    `trailing` are merged into one axis of `merged` (1 where they are not)."""
    block = 1
    for dim in trailing:
        if not isinstance(dim, int):
            return 1
        block *= dim
        if channels * block == merged:
            return block
        if channels * block > merged:
            return 1
    return 1


def squeeze(walk: Walk, node: onnx.NodeProto, flow: Flow) -> Flow | None:
    """Squeeze/Unsqueeze with known axes on a flow of known rank (no shapes needed)."""
    rank = walk.rank(flow, node.input[0])
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        values = walk.values(node.input[1])
        axes = None if values is None else [int(v) for v in values.reshape(-1)]
    if rank is None or not axes:
        return None
    channel = flow.axis + rank
    if node.op_type == "Squeeze":
        removed = {a % rank for a in axes}
        if channel in removed:
            return None
        new_rank = rank - len(removed)
        new_channel = channel - sum(1 for a in removed if a < channel)
    else:
        new_rank = rank + len(axes)
        inserted = sorted(a % new_rank for a in axes)
        new_channel = channel
        for position in inserted:
            if position <= new_channel:
                new_channel += 1
    return flow.moved(new_channel - new_rank, new_rank)



def concat(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    label = walk.labels[index]
    inputs = [name for name in node.input if name]
    flows = [walk.flows[name] for name in inputs if name in walk.flows]
    first = flows[0]
    rank = walk.rank(first, node.output[0])
    if rank is None:
        for flow in flows:
            walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"Concat {label}: rank unknown")
        return
    axis = attribute(node, "axis", 0) % rank
    channel = first.axis + rank
    if any(flow.axis != first.axis for flow in flows):
        for flow in flows:
            walk.pin(flow, DeclineCause.AXIS_MIXED,
                      f"Concat {label} of channels on different axes")
        return
    if axis != channel:  # stacked along another axis: same channels in every input
        merged = first
        for other in flows[1:]:
            merged = meet(walk, merged, other, False, f"Concat {label}")
        for name in inputs:
            if name not in walk.flows:
                operand(walk, merged, name, f"Concat {label}")
        walk.flows[node.output[0]] = merged.moved(merged.axis, rank)
        return
    sections: list[tuple[int, int]] = []
    offset = 0
    for name in inputs:
        part = walk.flows.get(name)
        if part is None:
            size = walk.dim_at(name, first.axis)
            if not isinstance(size, int):
                for known in flows:
                    walk.pin(known, DeclineCause.DYNAMIC_SHAPE,
                              f"Concat {label}: size of {name} unknown")
                return
            space = walk.new_space(size)
            cause, detail = ((DeclineCause.NOT_PER_CHANNEL, f"Concat {label} of {name}")
                             if name in walk.dataflow.static else walk.origin(name))
            walk.spaces[space].pins.append((cause, detail))
            part = Flow(((space, 0),), size, first.axis, rank)
        sections.extend((space, offset + inner) for space, inner in part.sections)
        offset += part.channels
    walk.flows[node.output[0]] = Flow(tuple(sections), offset, first.axis, rank)



def shape_read(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    """Shape/Size read the channel count; fine only where every reader of the shape
    takes other entries (a Gather of constant indices, or start/end leaving it out)."""
    op, label = node.op_type, walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    if op == "Shape" and rank is not None:
        channel = flow.axis + rank
        start = attribute(node, "start", 0) % rank if rank else 0
        end = attribute(node, "end", None)
        end = rank if end is None else (end % rank if end < 0 else min(end, rank))
        if not start <= channel < end:
            return
        readers = walk.index.main.consumers.get(node.output[0], [])
        if readers and all(gather_skips(walk, use.node, channel - start) for use in readers):
            return
    walk.pin(flow, DeclineCause.SHAPE_READ, f"{op} {label} reads the channel count")



def gather_skips(walk: Walk, node: onnx.NodeProto, position: int) -> bool:
    if node.op_type != "Gather" or len(node.input) < 2:
        return False
    values = walk.values(node.input[1])
    return values is not None and position not in [int(v) for v in values.reshape(-1)]
