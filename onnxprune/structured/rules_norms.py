"""Rules for normalizations and reductions: over the channel axis they pin the channels
unless the user allows it (LayerNorm, RMSNorm, GroupNorm, a ReduceMean of squares); over
other axes the channels pass."""

from __future__ import annotations

import math

import onnx

from ..graph import attribute
from .groups import DeclineCause, MemberRole
from .op_tables import LAYER_NORM_OPS, NORM_REDUCE_OPS, SKIP_NORM_OPS
from .propagation import Flow, Walk
from .rules_pointwise import meet, operand, unknown


def reduce(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    op, label = node.op_type, walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: rank unknown")
        return
    axes = attribute(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        values = walk.values(node.input[1])
        if values is None:
            walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: axes computed")
            return
        axes = [int(a) for a in values.reshape(-1)]
    if not axes:
        axes = [] if attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
    axes = sorted({int(a) % rank for a in axes})
    keepdims = attribute(node, "keepdims", 1)
    channel = flow.axis + rank
    if channel in axes:
        if op in NORM_REDUCE_OPS:
            norm_over(walk, flow, f"{op} {label} over the channel axis",
                            hidden=channel == rank - 1, allowed=bool(keepdims))
        else:
            walk.pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label} reduces the channels")
        return  # the output holds no channels (a statistic broadcast back later)
    if keepdims:
        walk.flows[node.output[0]] = flow.moved(flow.axis, rank)
    else:
        new_rank = rank - len(axes)
        new_channel = channel - sum(1 for a in axes if a < channel)
        walk.flows[node.output[0]] = flow.moved(new_channel - new_rank, new_rank)



def norm_over(walk: Walk, flow: Flow, detail: str, hidden: bool, allowed: bool = True) -> None:
    """A normalization over the channel axis: pinned unless allowed by the user."""
    for space, _ in flow.sections:
        target = walk.space(space)
        target.hidden = target.hidden or hidden
        if walk.allow_norm and allowed:
            target.preserving = False
        else:
            target.pins.append((DeclineCause.NORMALIZATION, detail))



def softmax(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    op, label = node.op_type, walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    new_default = walk.opset >= 13
    axis = attribute(node, "axis", -1 if new_default else 1)
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: rank unknown")
    else:
        channel, axis = flow.axis + rank, axis % rank
        if (channel == axis) if new_default else (channel >= axis):
            walk.pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label} over the channels")
    walk.flows[node.output[0]] = flow



def norm(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    op, label = node.op_type, walk.labels[index]
    skip = op in SKIP_NORM_OPS
    readers = node.input[:2] if skip else node.input[:1]
    flows = [walk.flows[name] for name in readers if name in walk.flows]
    if not flows:
        unknown(walk, index, node)
        return
    flow = flows[0]
    for other in flows[1:]:
        flow = meet(walk, flow, other, True, f"{op} {label}")
    if skip:
        for name in readers:
            if name not in walk.flows:
                operand(walk, flow, name, f"{op} {label}")
    rank = walk.rank(flow, node.input[0])
    if op == "GroupNormalization":
        params, first = list(node.input[1:3]), 1
    elif skip:
        params, first = list(node.input[2:5]), -1
    else:
        params = list(node.input[1:3])
        first = attribute(node, "axis", -1)
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: rank unknown")
        pass_norm(walk, node, flow, skip)
        return
    channel, first = flow.axis + rank, first % rank
    if op == "GroupNormalization":
        covers = channel == 1
    else:
        covers = channel >= first
    if not covers:
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                  f"{op} {label} normalizes other axes than the channels'")
        pass_norm(walk, node, flow, skip)
        return
    norm_over(walk, flow, f"{op} {label}", hidden=op in LAYER_NORM_OPS)
    if walk.allow_norm:
        if op == "GroupNormalization":
            groups = attribute(node, "num_groups", 1)
            for space, _ in flow.sections:
                target = walk.space(space)
                target.multiple_of = math.lcm(target.multiple_of, groups)
            if len(flow.sections) > 1:
                walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                          f"{op} {label} over concatenated channels")
        for name in params:
            if not name:
                continue
            tensor = walk.stored.get(name)
            if tensor is None:
                walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: {name}")
                continue
            dims = list(tensor.dims)
            axis = len(dims) - (rank - channel) if op != "GroupNormalization" else 0
            if 0 <= axis < len(dims) and dims[axis] == flow.channels:
                walk.add_member(flow, name, axis, MemberRole.PER_CHANNEL)
            elif op == "GroupNormalization":
                walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                          f"{op} {label}: {name} per group, not per channel")
            else:
                walk.pin(flow, DeclineCause.NOT_PER_CHANNEL, f"{op} {label}: {name}")
    pass_norm(walk, node, flow, skip)



def pass_norm(walk: Walk, node: onnx.NodeProto, flow: Flow, skip: bool) -> None:
    walk.flows[node.output[0]] = flow
    if skip and len(node.output) > 3 and node.output[3]:
        walk.flows[node.output[3]] = flow  # the sum input + skip (+ bias)
