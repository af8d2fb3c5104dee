"""Rules for the ops that make and read channels: MatMul, Gemm, Conv and ConvTranspose with a
stored weight (possibly seen through Transposes). A producer opens a channel space on its
output axis with its bias; the same node is a consumer of its input's channels, whose
weight's input axis becomes a member."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx

from ..graph import attribute, is_onnx_domain
from .groups import AttributeEdit, DeclineCause, Declined, MemberRole
from .propagation import Flow, Walk
from .rules_pointwise import meet
from .rules_sections import cut


def layer(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    op, label = node.op_type, walk.labels[index]
    data = walk.flows.get(node.input[0])
    weight_name = node.input[1]
    weight = walk.stored.get(weight_name)
    output = node.output[0]
    if data is not None and data.block > 1 and op not in ("MatMul", "Gemm"):
        walk.pin(data, DeclineCause.AXIS_MIXED,
                 f"{op} {label} reads channels of {data.block} positions each")
        data = None
    if weight_name in walk.flows:
        walk.pin(walk.flows[weight_name], DeclineCause.AXIS_MIXED,
                  f"{op} {label} reads the channels as its weight")
    axes: list[int] = []
    if weight is None:
        resolved = through_transposes(walk, weight_name)
        if resolved is not None:
            weight_name, axes = resolved
            weight = walk.stored[weight_name]
    if weight is None:
        if data is not None:
            why = (DeclineCause.NOT_A_CONSTANT if weight_name in walk.dataflow.static
                   else DeclineCause.AXIS_MIXED)
            walk.pin(data, why, f"{op} {label} multiplies by a computed value")
        if weight_name in walk.dataflow.static:
            producer = walk.dataflow.producer.get(weight_name)
            quantized = producer is not None and \
                walk.dataflow.nodes[producer].op_type == "DequantizeLinear"
            walk.not_candidates.append((index, Declined(
                output, DeclineCause.NOT_A_CONSTANT,
                f"the weight of {op} {label} is quantized (DequantizeLinear): remove channels "
                "from the float model, then quantize" if quantized else
                f"the weight of {op} {label} is computed, not stored")))
        return
    stored_dims = list(weight.dims)
    axes = axes or list(range(len(stored_dims)))
    dims = [stored_dims[axis] for axis in axes]
    fewest = 2 if op in ("MatMul", "Gemm") else 3  # a Conv weight has its kernel axes too
    if len(dims) < fewest:  # a model onnxruntime would refuse (or a vector MatMul)
        if data is not None:
            walk.pin(data, DeclineCause.AXIS_MIXED,
                     f"{op} {label}: weight of rank {len(dims)} not followed")
        walk.not_candidates.append((index, Declined(
            output, DeclineCause.AXIS_MIXED,
            f"{op} {label}: weight of rank {len(dims)} not followed")))
        return
    if op == "MatMul":
        matmul(walk, index, node, data, weight_name, dims, axes)
    elif op == "Gemm":
        gemm(walk, index, node, data, weight_name, dims, axes)
    else:
        conv(walk, index, node, data, weight_name, dims, axes)



def through_transposes(walk: Walk, name: str) -> tuple[str, list[int]] | None:
    """A weight that is a stored tensor seen through Transposes (each value on the way
    read once): the stored tensor, and for each axis of `name` the stored axis."""
    axes: list[int] | None = None
    for _ in range(8):
        producer = walk.dataflow.producer.get(name)
        if producer is None or walk.uses(name) != 1:
            return None
        node = walk.dataflow.nodes[producer]
        if node.op_type != "Transpose" or not is_onnx_domain(node):
            return None
        source = node.input[0]
        rank = len(walk.shapes[source]) if source in walk.shapes else None
        perm = attribute(node, "perm", None)
        if perm is None:
            if rank is None:
                return None
            perm = list(reversed(range(rank)))
        perm = list(perm)
        axes = perm if axes is None else [perm[axis] for axis in axes]
        name = source
        if name in walk.stored:
            return (name, axes) if walk.uses(name) == 1 else None
    return None



def open_space(walk: Walk, index: int, channels: int, output: str, axis: int, rank: int | None,
          members: Sequence[tuple[str, int, MemberRole]], macs: int) -> Flow:
    space = walk.new_space(channels, index)
    flow = Flow(((space, 0),), channels, axis, rank)
    for tensor, member_axis, role in members:
        walk.add_member(flow, tensor, member_axis, role)
    walk.spaces[space].macs += macs
    walk.flows[output] = flow
    return flow



def consume(walk: Walk, flow: Flow, node: onnx.NodeProto, tensor: str, axis: int,
             macs: int) -> None:
    walk.add_member(flow, tensor, axis, MemberRole.INPUT)
    for space, _ in flow.sections:
        target = walk.space(space)
        target.consumers.append(node.op_type)
        target.macs += macs



def bias_members(walk: Walk, name: str | None, channels: int) -> list[tuple[str, int, MemberRole]]:
    """A bias input as a member (along its last axis) where it is per channel."""
    if not name or name not in walk.stored:
        return []
    dims = list(walk.stored[name].dims)
    if dims and dims[-1] == channels and channels > 1:
        return [(name, len(dims) - 1, MemberRole.PER_CHANNEL)]
    return []



def matmul(walk: Walk, index: int, node: onnx.NodeProto, data: Flow | None, weight: str,
            dims: list[int], axes: list[int]) -> None:
    label, output = walk.labels[index], node.output[0]
    if len(dims) != 2:
        walk.pin(data, DeclineCause.AXIS_MIXED, f"MatMul {label}: batched weight")
        walk.not_candidates.append((index, Declined(
            output, DeclineCause.AXIS_MIXED,
            f"MatMul {label}: weight of rank {len(dims)} (batched) not followed yet")))
        return
    macs = math.prod(dims) * walk.macs_factor(output, (-1,))
    if data is not None:
        if data.axis == -1:
            consume(walk, data, node, weight, axes[0], macs)
        else:
            walk.pin(data, DeclineCause.AXIS_MIXED,
                      f"MatMul {label} contracts another axis than the channels")
    rank = (len(walk.shapes[output]) if output in walk.shapes
            else len(walk.shapes[node.input[0]]) if node.input[0] in walk.shapes
            else data.rank if data is not None else None)
    open_space(walk, index, dims[1], output, -1, rank, [(weight, axes[1], MemberRole.OUTPUT)], macs)



def gemm(walk: Walk, index: int, node: onnx.NodeProto, data: Flow | None, weight: str,
          dims: list[int], axes: list[int]) -> None:
    label, output = walk.labels[index], node.output[0]
    trans_a = attribute(node, "transA", 0)
    trans_b = attribute(node, "transB", 0)
    channels = dims[0] if trans_b else dims[1]
    macs = math.prod(dims) * walk.macs_factor(output, (-1,))
    if data is not None:
        if data.axis == (-2 if trans_a else -1):
            consume(walk, data, node, weight, axes[1 if trans_b else 0], macs)
        else:
            walk.pin(data, DeclineCause.AXIS_MIXED,
                      f"Gemm {label} contracts another axis than the channels")
    bias = node.input[2] if len(node.input) > 2 else None
    members = [(weight, axes[0 if trans_b else 1], MemberRole.OUTPUT)]
    members += bias_members(walk, bias, channels)
    if bias and bias not in walk.stored and bias in walk.flows:
        walk.pin(walk.flows[bias], DeclineCause.UNKNOWN_OP,
                  f"Gemm {label} adds the channels as its bias")
    open_space(walk, index, channels, output, -1, 2, members, macs)



def conv(walk: Walk, index: int, node: onnx.NodeProto, data: Flow | None, weight: str,
          dims: list[int], axes: list[int]) -> None:
    op, label, output = node.op_type, walk.labels[index], node.output[0]
    group = attribute(node, "group", 1)
    rank = len(dims)
    axis = 1 - rank
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    transpose = op == "ConvTranspose"
    macs = math.prod(dims) * (walk.macs_factor(node.input[0] if transpose else output,
                                                (0, 1)))
    if data is not None and data.axis != axis:
        walk.pin(data, DeclineCause.AXIS_MIXED,
                  f"{op} {label} reads another axis than the channels")
        data = None
    out_channels = dims[1] * group if transpose else dims[0]
    if group == 1:
        if data is not None:
            consume(walk, data, node, weight, axes[0 if transpose else 1], macs)
        members = [(weight, axes[1 if transpose else 0], MemberRole.OUTPUT)]
        members += [(bias, 0, MemberRole.PER_CHANNEL)] if bias in walk.stored else []
        open_space(walk, index, out_channels, output, axis, rank, members, macs)
        return
    if not transpose and dims[1] == 1 and dims[0] == group:
        # depthwise: channel c in, channel c out, through W[c] and B[c]
        if data is None:
            flow = open_space(walk, index, dims[0], output, axis, rank, [], 0)
            cause, detail = walk.origin(node.input[0])
            walk.pin(flow, cause, detail)
        else:
            flow = data.moved(axis, rank)
            walk.flows[output] = flow
        walk.add_member(flow, weight, axes[0], MemberRole.PER_CHANNEL)
        if bias in walk.stored:
            walk.add_member(flow, bias, 0, MemberRole.PER_CHANNEL)
        if len(flow.sections) > 1:  # `group` counts the channels of every section
            walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                     f"{op} {label}: depthwise over channels of several sections")
        for space, _ in flow.sections:
            target = walk.space(space)
            target.attributes[(label, "group", None)] = AttributeEdit(label, "group", 1)
            target.macs += macs
        return
    grouped(walk, index, node, data, weight, dims, axes, macs)


def grouped(walk: Walk, index: int, node: onnx.NodeProto, data: Flow | None, weight: str,
            dims: list[int], axes: list[int], macs: int) -> None:
    """A Conv of `group` > 1 groups, not depthwise: every group reads its section of the
    input through the same weight columns and makes its section of the output, so the
    sections keep one set (the same channels in every group; `group` is unchanged). The
    input's sections are joined into one keep set; the output is one space of O/group
    channels repeated in `group` sections."""
    label, output = walk.labels[index], node.output[0]
    group, rank = attribute(node, "group", 1), len(dims)
    axis = 1 - rank
    detail = f"{node.op_type} {label} has {group} groups"
    if node.op_type != "Conv" or dims[0] % group:
        walk.pin(data, DeclineCause.GROUPS_DISAGREE, detail)
        flow = open_space(walk, index, dims[0], output, axis, rank, [], macs)
        walk.pin(flow, DeclineCause.GROUPS_DISAGREE, detail)
        return
    if data is not None:
        if data.channels != dims[1] * group:
            walk.pin(data, DeclineCause.GROUPS_DISAGREE, detail)
        else:
            size = dims[1]
            parts = cut(walk, node.input[0], [(k * size, (k + 1) * size)
                                              for k in range(group)], rank)
            merged = parts[0]
            for part in parts[1:]:
                merged = meet(walk, merged, part, False, detail)
            consume(walk, merged, node, weight, axes[1], macs)
    per_group = dims[0] // group
    space = walk.new_space(per_group, index)
    flow = Flow(tuple((space, k * per_group) for k in range(group)), dims[0], axis, rank)
    walk.add_member(flow, weight, axes[0], MemberRole.OUTPUT)
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias in walk.stored:
        walk.add_member(flow, bias, 0, MemberRole.PER_CHANNEL)
    walk.spaces[space].macs += macs
    walk.flows[output] = flow
