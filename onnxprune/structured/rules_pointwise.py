"""Rules for ops that keep each channel to itself: unary activations, element-wise ops with
constants or with other activations (where two flows meet, one keep set), per-channel
parameters (BatchNormalization, QuantizeLinear), pooling, and Pad/Resize that leave the
channel axis alone. `unknown` pins whatever no rule follows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx

from ..graph import attribute, is_onnx_domain
from .groups import DeclineCause, MemberRole, ShapeEdit
from .op_tables import ADDING_OPS, ATTENTION_OPS
from .propagation import Flow, Walk


def unknown(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    op, label = node.op_type, walk.labels[index]
    mixing = op in ATTENTION_OPS or op in ("Split", "Slice", "Gather", "Expand", "Tile",
                                           "DepthToSpace", "SpaceToDepth")
    cause = DeclineCause.AXIS_MIXED if mixing else DeclineCause.UNKNOWN_OP
    detail = (f"{op} {label} is not followed yet" if mixing
              else f"no rule for {node.domain + '::' if node.domain else ''}{op} {label}")
    for name in walk.dataflow.reads[index]:
        walk.pin(walk.flows.get(name), cause, detail)



def unary(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    if node.op_type in ("FastGelu", "BiasGelu") and len(node.input) > 1 and node.input[1]:
        bias = node.input[1]
        if bias in walk.stored and flow.axis == -1:
            walk.add_member(flow, bias, len(walk.stored[bias].dims) - 1,
                             MemberRole.PER_CHANNEL)
        else:
            walk.pin(flow, DeclineCause.NOT_PER_CHANNEL,
                      f"{node.op_type} {walk.labels[index]}: bias not stored per channel")
    for slot, name in enumerate(node.input[1:], start=1):
        if name in walk.flows:  # Clip bounds, CastLike's type source: scalars or types
            walk.pin(walk.flows[name], DeclineCause.AXIS_MIXED,
                      f"{node.op_type} {walk.labels[index]} reads the channels at input "
                      f"{slot}")
    walk.flows[node.output[0]] = flow



def elementwise(walk: Walk, index: int, node: onnx.NodeProto) -> None:
    op, label = node.op_type, walk.labels[index]
    flows = [walk.flows[name] for name in node.input if name in walk.flows]
    merged = flows[0]
    for other in flows[1:]:
        merged = meet(walk, merged, other, op in ADDING_OPS, f"{op} {label}")
    for name in node.input:
        if not name or name in walk.flows:
            continue
        operand(walk, merged, name, f"{op} {label}")
    rank = None
    output_shape = walk.shapes.get(node.output[0])
    if output_shape is not None:
        rank = len(output_shape)
    walk.flows[node.output[0]] = merged.moved(merged.axis, rank)



def meet(walk: Walk, a: Flow, b: Flow, residual: bool, where: str) -> Flow:
    """Two flows meeting element-wise: one keep set."""
    if b.channels == 1 or a.channels == 1:  # one side broadcasts along the channels
        small, large = (a, b) if a.channels == 1 else (b, a)
        walk.pin(small, DeclineCause.TOO_FEW_CHANNELS, f"one channel broadcast at {where}")
        return large
    if a.axis != b.axis or a.block != b.block:
        walk.pin(a, DeclineCause.AXIS_MIXED, f"{where} meets channels on another axis")
        walk.pin(b, DeclineCause.AXIS_MIXED, f"{where} meets channels on another axis")
        return a
    layout_a = [(offset, walk.space(space).channels) for space, offset in a.sections]
    layout_b = [(offset, walk.space(space).channels) for space, offset in b.sections]
    if layout_a != layout_b:
        walk.pin(a, DeclineCause.GROUPS_DISAGREE, f"{where} meets differently cut channels")
        walk.pin(b, DeclineCause.GROUPS_DISAGREE, f"{where} meets differently cut channels")
        return a
    for (space_a, _), (space_b, _) in zip(a.sections, b.sections, strict=True):
        walk.union(space_a, space_b, residual)
    return a



def operand(walk: Walk, flow: Flow, name: str, where: str) -> None:
    """A non-activation operand of an element-wise op on `flow`'s channels: a member
    where it is a stored per-channel tensor; fine where it broadcasts along them."""
    dim = walk.dim_at(name, flow.axis)
    if dim == 1:
        return
    tensor = walk.stored.get(name)
    if tensor is not None:
        dims = list(tensor.dims)
        if dim == flow.channels * flow.block:
            walk.add_member(flow, name, len(dims) + flow.axis, MemberRole.PER_CHANNEL)
        else:
            walk.pin(flow, DeclineCause.NOT_PER_CHANNEL,
                      f"{where}: constant {name} of shape {dims}")
        return
    if name in walk.dataflow.static:
        reshaped = (reshaped_constant(walk, name, flow.channels)
                    if dim == flow.channels and flow.block == 1 else None)
        if reshaped is None:
            walk.pin(flow, DeclineCause.NOT_PER_CHANNEL,
                      f"{where}: {name} is computed from constants, not stored")
            return
        source, edit = reshaped
        walk.add_member(flow, source, 0, MemberRole.PER_CHANNEL)
        if edit is not None:
            if len(flow.sections) > 1:
                walk.pin(flow, DeclineCause.GROUPS_DISAGREE,
                          f"{where}: reshaped constant over concatenated channels")
            for space, _ in flow.sections:
                walk.space(space).shapes[(edit.tensor, edit.index, edit.node)] = edit
        return
    cause, detail = walk.origin(name)
    walk.pin(flow, cause, f"{where} {detail}")



def reshaped_constant(walk: Walk, name: str, channels: int
                       ) -> tuple[str, ShapeEdit | None] | None:
    """A stored vector of `channels` values brought to the activation's rank by a
    Reshape or Unsqueeze read once (PaddlePaddle exports biases so): the vector, and the
    entry of the Reshape target that spells the channel count, if one does."""
    producer = walk.dataflow.producer.get(name)
    if producer is None or walk.uses(name) != 1:
        return None
    node = walk.dataflow.nodes[producer]
    if node.op_type not in ("Reshape", "Unsqueeze") or not is_onnx_domain(node):
        return None
    source = node.input[0]
    tensor = walk.stored.get(source)
    if tensor is None or list(tensor.dims) != [channels] or walk.uses(source) != 1:
        return None
    if node.op_type == "Unsqueeze":
        return source, None
    values = walk.values(node.input[1])
    if values is None:
        return None
    target = [int(v) for v in values.reshape(-1)]
    spelled = [i for i, v in enumerate(target) if v == channels]
    if len(spelled) == 1 and all(v == 1 for i, v in enumerate(target) if i != spelled[0]):
        if walk.uses(node.input[1]) != 1:
            return None
        return source, ShapeEdit(node.input[1], spelled[0])
    if target.count(-1) == 1 and all(v in (1, -1) for v in target):
        return source, None
    return None



def at_axis_one(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow,
                 params: Sequence[str]) -> None:
    """An op on NC... layouts that keeps each channel to itself; `params` are its
    per-channel tensors."""
    op, label = node.op_type, walk.labels[index]
    if walk.abs_axis(flow, node.input[0]) != 1:
        walk.pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label}: channels not on axis 1")
    for name in params:
        if not name:
            continue
        if name in walk.stored and list(walk.stored[name].dims) == [flow.channels]:
            walk.add_member(flow, name, 0, MemberRole.PER_CHANNEL)
        elif name in walk.flows:
            walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: {name} computed")
        else:
            walk.pin(flow, DeclineCause.NOT_PER_CHANNEL,
                      f"{op} {label}: {name} not a stored per-channel tensor")
    walk.flows[node.output[0]] = flow



def quantize(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    op, label = node.op_type, walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    axis = attribute(node, "axis", 1)
    if attribute(node, "block_size", 0):
        walk.pin(flow, DeclineCause.NOT_PER_CHANNEL, f"{op} {label} is blocked")
    for name in node.input[1:3]:
        if not name:
            continue
        tensor = walk.stored.get(name)
        if tensor is None:
            walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: {name} computed")
        elif math.prod(tensor.dims) == 1:
            continue
        elif (rank is not None and (axis % rank) == flow.axis + rank
              and list(tensor.dims) == [flow.channels]):
            walk.add_member(flow, name, 0, MemberRole.PER_CHANNEL)
        else:
            walk.pin(flow, DeclineCause.NOT_PER_CHANNEL,
                      f"{op} {label}: {name} is per another axis")
    walk.flows[node.output[0]] = flow



def spatial(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    """Pad, Resize, Upsample: fine where they leave the channel axis alone."""
    op, label = node.op_type, walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    channel = None if rank is None else flow.axis + rank
    ok = False
    if rank is not None and channel is not None:
        if op == "Pad":
            pads = (walk.values(node.input[1]) if len(node.input) > 1 and node.input[1]
                    else np.asarray(attribute(node, "pads", [])))
            axes_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
            axes = (list(range(rank)) if axes_name is None
                    else walk.values(axes_name))
            if pads is not None and axes is not None:
                axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
                pads = np.asarray(pads).reshape(-1)
                ok = (len(pads) == 2 * len(axes)
                      and all(pads[i] == 0 and pads[i + len(axes)] == 0
                              for i, a in enumerate(axes) if a == channel))
        else:
            ok = resize_keeps(walk, node, flow, rank, channel)
    if not ok:
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                  f"{op} {label} may change the channel axis (or its values are unknown)")
    walk.flows[node.output[0]] = flow



def resize_keeps(walk: Walk, node: onnx.NodeProto, flow: Flow, rank: int, channel: int) -> bool:
    inputs = list(node.input) + ["", "", "", ""]
    if node.op_type == "Upsample":
        scales = (walk.values(inputs[1]) if inputs[1]
                  else np.asarray(attribute(node, "scales", [])))
        sizes = None
    else:
        scales = walk.values(inputs[2]) if inputs[2] else None
        sizes = walk.values(inputs[3]) if inputs[3] else None
        if node.op_type == "Resize" and walk.opset < 11:
            scales = walk.values(inputs[1])
    axes = attribute(node, "axes", None)
    positions = list(range(rank)) if axes is None else [int(a) % rank for a in axes]
    if channel not in positions:
        return True
    where = positions.index(channel)
    if scales is not None and scales.size == len(positions):
        return float(scales.reshape(-1)[where]) == 1.0
    if sizes is not None and sizes.size == len(positions):
        return int(sizes.reshape(-1)[where]) == flow.channels
    return False
