"""Coupled channel groups found on a model's main graph (`find_groups`).

One forward walk over `GraphIndex.dataflow` in topological order. A producer whose weight is
a stored tensor (MatMul B, Gemm B, Conv W, ConvTranspose W) opens a *channel space*: the
channels of its output activation. Each activation that carries channels has a `_Flow`: the
spaces it is made of (one, or several side by side after a Concat on the channel axis, each
at an offset) and where its channel axis is, counted from the end so that broadcasting keeps
it. Rules per op move flows from inputs to outputs, add the stored tensors on the way as
members of the spaces (biases, norm parameters, per-channel constants, the consumers' input
axes), and *pin* a space where no rule proves a rewrite safe. Where two flows meet in an
element-wise op their spaces are one keep set: union-find joins them.

At the end every space that has a producer becomes a `ChannelGroup`, or a `Declined` with
the most specific of its pins. Only tensor dims are read, and a few small constants (pads,
scales, axes, shape targets) that are stored inline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from ..graph import GraphIndex, attribute, is_onnx_domain, node_label
from ..io import uses_external_data
from .groups import (
    AttributeEdit,
    ChannelGroup,
    DeclineCause,
    Declined,
    Member,
    MemberRole,
    ShapeEdit,
    StructureKind,
)

log = logging.getLogger(__name__)

# Ops whose output 0 has the layout of input 0, element by element (other inputs, where an
# op has them, are scalars or attributes-as-inputs).
UNARY_OPS = frozenset({
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Celu", "Gelu", "Softplus", "Softsign", "Erf", "Mish", "ThresholdedRelu", "Shrink",
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
    "Not", "IsNaN", "IsInf", "Cast", "CastLike", "Clip", "Dropout", "Identity",
    "QuickGelu", "FastGelu", "BiasGelu",
})
# Element-wise ops of several inputs, with numpy broadcasting.
ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
})
# Element-wise ops where two activations meeting make a residual stream.
ADDING_OPS = frozenset({"Add", "Sub", "Sum"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                      "GlobalMaxPool", "GlobalLpPool"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
                        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                        "ReduceSumSquare"})
# Reductions over the channel axis that compute a norm's statistics.
NORM_REDUCE_OPS = frozenset({"ReduceMean", "ReduceL2", "ReduceSumSquare"})
# Normalizations over the last axes (LayerNorm family): where they cover the channel axis
# and two activations were added before, the channels are a transformer's hidden size.
LAYER_NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization",
                            "RMSNormalization", "SkipLayerNormalization",
                            "SkipSimplifiedLayerNormalization"})
SKIP_NORM_OPS = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
RESHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention",
                           "PackedAttention", "PackedMultiHeadAttention", "RotaryEmbedding",
                           "DecoderMaskedMultiHeadAttention", "SparseAttention"})
PRODUCER_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
# Constants read for their values (pads, scales, axes, shape targets) are at most this big.
SMALL_CONSTANT = 4096
# Pins from the most specific to the least: a declined candidate reports the first.
CAUSE_ORDER = (
    DeclineCause.RESIDUAL_STREAM, DeclineCause.NORMALIZATION, DeclineCause.SUBGRAPH_CAPTURE,
    DeclineCause.SHARED_WEIGHT, DeclineCause.GROUPS_DISAGREE, DeclineCause.NOT_PER_CHANNEL,
    DeclineCause.NOT_A_CONSTANT, DeclineCause.AXIS_MIXED, DeclineCause.SHAPE_READ,
    DeclineCause.UNKNOWN_OP, DeclineCause.DYNAMIC_SHAPE, DeclineCause.GRAPH_INPUT,
    DeclineCause.GRAPH_OUTPUT, DeclineCause.TOO_FEW_CHANNELS,
)

Dim = int | str | None  # a known size, a symbolic one, or unknown


@dataclass
class _Space:
    """One keep set under construction (a union-find node; data lives on the root)."""

    channels: int
    producers: list[int] = field(default_factory=list)  # dataflow indices
    members: dict[tuple[str, int, int], Member] = field(default_factory=dict)
    attributes: dict[tuple[str, str], AttributeEdit] = field(default_factory=dict)
    shapes: dict[tuple[str, int], ShapeEdit] = field(default_factory=dict)
    pins: list[tuple[DeclineCause, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # op types reading the channels
    multiple_of: int = 1
    preserving: bool = True
    residual: bool = False  # two spaces were added together
    hidden: bool = False  # the channels reach a LayerNorm-family norm
    macs: int = 0


@dataclass(frozen=True)
class _Flow:
    """The channels an activation carries: `sections` (space, offset) side by side along
    `axis` (negative: counted from the end), `channels` in all; `rank` when known."""

    sections: tuple[tuple[int, int], ...]
    channels: int
    axis: int
    rank: int | None = None

    def moved(self, axis: int, rank: int | None) -> _Flow:
        return _Flow(self.sections, self.channels, axis, rank)


def find_groups(model: onnx.ModelProto, *, allow_norm: bool = False,
                allow_hidden: bool = False) -> tuple[list[ChannelGroup], list[Declined]]:
    """The coupled channel groups of `model`'s main graph and the declined candidates.

    `allow_norm` lets a normalization over the channel axis be shrunk (its scale and bias
    become members; the group is then not output-preserving); `allow_hidden` lets a
    transformer's residual stream (its hidden size) be a group. Groups and declines are in
    the order of their first producer in the graph; each is named by that producer's output.
    Only tensor dims are read, so a lazily loaded model (`io.load_model(path, lazy=True)`)
    is analysed without reading its weights.
    """
    return _Analysis(model, allow_norm, allow_hidden).run()


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Static shapes of the main graph's values, by onnx shape inference on a copy whose
    large initializers keep their dims but not their data (empty where inference fails)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    light.graph.value_info.extend(model.graph.value_info)
    light.graph.node.extend(model.graph.node)
    for tensor in model.graph.initializer:
        if _small_inline(tensor):
            light.graph.initializer.append(tensor)
        else:
            stub = light.graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
    shapes: dict[str, tuple[Dim, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception as exc:  # onnx raises several types for models it cannot infer
        log.debug("shape inference failed (%s); using the shapes the model declares", exc)
        inferred = light
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _small_inline(tensor: TensorProto) -> bool:
    return not uses_external_data(tensor) and math.prod(tensor.dims) <= SMALL_CONSTANT


def _small_array(tensor: TensorProto | None) -> np.ndarray | None:
    """The values of a small tensor stored inline, or None."""
    if tensor is None or not _small_inline(tensor):
        return None
    try:
        return onnx.numpy_helper.to_array(tensor)
    except Exception:  # an odd or corrupt small tensor: treat its values as unknown
        return None


class _Analysis:
    def __init__(self, model: onnx.ModelProto, allow_norm: bool, allow_hidden: bool):
        self.model = model
        self.allow_norm = allow_norm
        self.allow_hidden = allow_hidden
        self.index = GraphIndex(model)
        self.dataflow = self.index.dataflow
        self.opset = next((entry.version for entry in model.opset_import
                           if entry.domain in ("", "ai.onnx")), 1)
        self.stored = {s.name: s.tensor for s in self.index.stored if s.scope.is_main}
        self.shapes = infer_shapes(model)
        for name, tensor in self.stored.items():
            self.shapes[name] = tuple(tensor.dims)
        positions = {id(node): position for position, node in enumerate(model.graph.node)}
        self.labels = [node_label(node, positions[id(node)]) for node in self.dataflow.nodes]
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.flows: dict[str, _Flow] = {}
        self.not_candidates: list[tuple[int, Declined]] = []  # producers declined at once

    # ---- union-find over spaces -------------------------------------------------------

    def _new_space(self, channels: int, producer: int | None = None) -> int:
        space = _Space(channels, [producer] if producer is not None else [])
        self.spaces.append(space)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def _root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def _space(self, space: int) -> _Space:
        return self.spaces[self._root(space)]

    def _union(self, a: int, b: int, residual: bool) -> None:
        a, b = self._root(a), self._root(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        keep, gone = self.spaces[a], self.spaces[b]
        self.parent[b] = a
        keep.producers.extend(gone.producers)
        keep.members.update(gone.members)
        keep.attributes.update(gone.attributes)
        keep.shapes.update(gone.shapes)
        keep.pins.extend(gone.pins)
        keep.consumers.extend(gone.consumers)
        keep.multiple_of = math.lcm(keep.multiple_of, gone.multiple_of)
        keep.preserving = keep.preserving and gone.preserving
        keep.residual = keep.residual or gone.residual or residual
        keep.hidden = keep.hidden or gone.hidden
        keep.macs += gone.macs

    # ---- helpers on flows -------------------------------------------------------------

    def _pin(self, flow: _Flow | None, cause: DeclineCause, detail: str) -> None:
        if flow is None:
            return
        for space, _ in flow.sections:
            self._space(space).pins.append((cause, detail))

    def _uses(self, name: str) -> int:
        """How many times a stored tensor is read (a graph output counts as a read)."""
        return len(self.index.main.consumers.get(name, ())) + (name in self.index.main.escaping)

    def _add_member(self, flow: _Flow, tensor: str, axis: int, role: MemberRole) -> None:
        """Add `tensor` (channel axis `axis`) to every space of `flow`, at its offsets."""
        shared = self._uses(tensor) > 1
        for space, offset in flow.sections:
            target = self._space(space)
            target.members.setdefault((tensor, axis, offset),
                                      Member(tensor, axis, role, offset))
            if shared:
                target.pins.append((DeclineCause.SHARED_WEIGHT,
                                    f"{tensor} is also read by another node"))

    def _rank(self, flow: _Flow, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else flow.rank

    def _abs_axis(self, flow: _Flow, name: str) -> int | None:
        rank = self._rank(flow, name)
        return None if rank is None else flow.axis + rank

    def _origin(self, name: str) -> tuple[DeclineCause, str]:
        """Why a value meeting some channels carries no flow of its own."""
        for _ in range(32):
            if name in self.dataflow.graph_inputs:
                return DeclineCause.GRAPH_INPUT, f"meets graph input {name}"
            producer = self.dataflow.producer.get(name)
            if producer is None:
                break
            node = self.dataflow.nodes[producer]
            if node.op_type in UNARY_OPS and node.input:
                name = node.input[0]
                continue
            cause = (DeclineCause.AXIS_MIXED if node.op_type in RESHAPE_OPS | {"Transpose",
                     "Concat", "Split", "Slice", "Gather"} | ATTENTION_OPS
                     else DeclineCause.UNKNOWN_OP)
            return cause, f"meets the output of {node.op_type} {self.labels[producer]}"
        return DeclineCause.UNKNOWN_OP, f"meets {name}, of unknown origin"

    def _dim_at(self, name: str, axis: int) -> Dim:
        """The size of value `name` at negative `axis` (1 where it has fewer axes)."""
        shape = self.shapes.get(name)
        if shape is None:
            return None
        return shape[axis] if len(shape) + axis >= 0 else 1

    def _macs_factor(self, name: str, skip_axes: Sequence[int]) -> int:
        """Product of the output's dims other than `skip_axes` (batch taken as 1); 0 where
        one is unknown."""
        shape = self.shapes.get(name)
        if shape is None:
            return 0
        factor = 1
        for position, dim in enumerate(shape):
            if position in skip_axes or position - len(shape) in skip_axes:
                continue
            if isinstance(dim, int) and dim > 0:
                factor *= dim
            elif position != 0:
                return 0
        return factor

    # ---- the walk ---------------------------------------------------------------------

    def run(self) -> tuple[list[ChannelGroup], list[Declined]]:
        for index, node in enumerate(self.dataflow.nodes):
            if index in self.dataflow.static_nodes:
                continue
            if is_onnx_domain(node) and node.op_type in PRODUCER_OPS:
                self._layer(index, node)
            elif any(name in self.flows for name in self.dataflow.reads[index]):
                self._propagate(index, node)
        self._pin_escapes()
        return self._results()

    def _pin_escapes(self) -> None:
        main = self.index.main
        for name, flow in self.flows.items():
            if name in main.escaping:
                self._pin(flow, DeclineCause.GRAPH_OUTPUT, f"{name} is a graph output")
            if any(not use.scope.is_main for use in main.consumers.get(name, ())):
                self._pin(flow, DeclineCause.SUBGRAPH_CAPTURE,
                          f"{name} is read inside an If/Loop/Scan body")

    # ---- producers and consumers ------------------------------------------------------

    def _layer(self, index: int, node: onnx.NodeProto) -> None:
        op, label = node.op_type, self.labels[index]
        data = self.flows.get(node.input[0])
        weight_name = node.input[1]
        weight = self.stored.get(weight_name)
        output = node.output[0]
        if weight_name in self.flows:
            self._pin(self.flows[weight_name], DeclineCause.AXIS_MIXED,
                      f"{op} {label} reads the channels as its weight")
        axes: list[int] = []
        if weight is None:
            resolved = self._through_transposes(weight_name)
            if resolved is not None:
                weight_name, axes = resolved
                weight = self.stored[weight_name]
        if weight is None:
            if data is not None:
                why = (DeclineCause.NOT_A_CONSTANT if weight_name in self.dataflow.static
                       else DeclineCause.AXIS_MIXED)
                self._pin(data, why, f"{op} {label} multiplies by a computed value")
            if weight_name in self.dataflow.static:
                self.not_candidates.append((index, Declined(
                    output, DeclineCause.NOT_A_CONSTANT,
                    f"the weight of {op} {label} is computed, not stored")))
            return
        stored_dims = list(weight.dims)
        axes = axes or list(range(len(stored_dims)))
        dims = [stored_dims[axis] for axis in axes]
        if op == "MatMul":
            self._matmul(index, node, data, weight_name, dims, axes)
        elif op == "Gemm":
            self._gemm(index, node, data, weight_name, dims, axes)
        else:
            self._conv(index, node, data, weight_name, dims, axes)

    def _through_transposes(self, name: str) -> tuple[str, list[int]] | None:
        """A weight that is a stored tensor seen through Transposes (each value on the way
        read once): the stored tensor, and for each axis of `name` the stored axis."""
        axes: list[int] | None = None
        for _ in range(8):
            producer = self.dataflow.producer.get(name)
            if producer is None or self._uses(name) != 1:
                return None
            node = self.dataflow.nodes[producer]
            if node.op_type != "Transpose" or not is_onnx_domain(node):
                return None
            source = node.input[0]
            rank = len(self.shapes[source]) if source in self.shapes else None
            perm = attribute(node, "perm", None)
            if perm is None:
                if rank is None:
                    return None
                perm = list(reversed(range(rank)))
            perm = list(perm)
            axes = perm if axes is None else [perm[axis] for axis in axes]
            name = source
            if name in self.stored:
                return (name, axes) if self._uses(name) == 1 else None
        return None

    def _open(self, index: int, channels: int, output: str, axis: int, rank: int | None,
              members: Sequence[tuple[str, int, MemberRole]], macs: int) -> _Flow:
        space = self._new_space(channels, index)
        flow = _Flow(((space, 0),), channels, axis, rank)
        for tensor, member_axis, role in members:
            self._add_member(flow, tensor, member_axis, role)
        self.spaces[space].macs += macs
        self.flows[output] = flow
        return flow

    def _consume(self, flow: _Flow, node: onnx.NodeProto, tensor: str, axis: int,
                 macs: int) -> None:
        self._add_member(flow, tensor, axis, MemberRole.INPUT)
        for space, _ in flow.sections:
            target = self._space(space)
            target.consumers.append(node.op_type)
            target.macs += macs

    def _bias(self, name: str | None, channels: int) -> list[tuple[str, int, MemberRole]]:
        """A bias input as a member (along its last axis) where it is per channel."""
        if not name or name not in self.stored:
            return []
        dims = list(self.stored[name].dims)
        if dims and dims[-1] == channels and channels > 1:
            return [(name, len(dims) - 1, MemberRole.PER_CHANNEL)]
        return []

    def _matmul(self, index: int, node: onnx.NodeProto, data: _Flow | None, weight: str,
                dims: list[int], axes: list[int]) -> None:
        label, output = self.labels[index], node.output[0]
        if len(dims) != 2:
            self._pin(data, DeclineCause.AXIS_MIXED, f"MatMul {label}: batched weight")
            self.not_candidates.append((index, Declined(
                output, DeclineCause.AXIS_MIXED,
                f"MatMul {label}: weight of rank {len(dims)} (batched) not followed yet")))
            return
        macs = math.prod(dims) * self._macs_factor(output, (-1,))
        if data is not None:
            if data.axis == -1:
                self._consume(data, node, weight, axes[0], macs)
            else:
                self._pin(data, DeclineCause.AXIS_MIXED,
                          f"MatMul {label} contracts another axis than the channels")
        rank = (len(self.shapes[output]) if output in self.shapes
                else len(self.shapes[node.input[0]]) if node.input[0] in self.shapes
                else data.rank if data is not None else None)
        self._open(index, dims[1], output, -1, rank, [(weight, axes[1], MemberRole.OUTPUT)], macs)

    def _gemm(self, index: int, node: onnx.NodeProto, data: _Flow | None, weight: str,
              dims: list[int], axes: list[int]) -> None:
        label, output = self.labels[index], node.output[0]
        trans_a = attribute(node, "transA", 0)
        trans_b = attribute(node, "transB", 0)
        channels = dims[0] if trans_b else dims[1]
        macs = math.prod(dims) * self._macs_factor(output, (-1,))
        if data is not None:
            if data.axis == (-2 if trans_a else -1):
                self._consume(data, node, weight, axes[1 if trans_b else 0], macs)
            else:
                self._pin(data, DeclineCause.AXIS_MIXED,
                          f"Gemm {label} contracts another axis than the channels")
        bias = node.input[2] if len(node.input) > 2 else None
        members = [(weight, axes[0 if trans_b else 1], MemberRole.OUTPUT)]
        members += self._bias(bias, channels)
        if bias and bias not in self.stored and bias in self.flows:
            self._pin(self.flows[bias], DeclineCause.UNKNOWN_OP,
                      f"Gemm {label} adds the channels as its bias")
        self._open(index, channels, output, -1, 2, members, macs)

    def _conv(self, index: int, node: onnx.NodeProto, data: _Flow | None, weight: str,
              dims: list[int], axes: list[int]) -> None:
        op, label, output = node.op_type, self.labels[index], node.output[0]
        group = attribute(node, "group", 1)
        rank = len(dims)
        axis = 1 - rank
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        transpose = op == "ConvTranspose"
        macs = math.prod(dims) * (self._macs_factor(node.input[0] if transpose else output,
                                                    (0, 1)))
        if data is not None and data.axis != axis:
            self._pin(data, DeclineCause.AXIS_MIXED,
                      f"{op} {label} reads another axis than the channels")
            data = None
        out_channels = dims[1] * group if transpose else dims[0]
        if group == 1:
            if data is not None:
                self._consume(data, node, weight, axes[0 if transpose else 1], macs)
            members = [(weight, axes[1 if transpose else 0], MemberRole.OUTPUT)]
            members += [(bias, 0, MemberRole.PER_CHANNEL)] if bias in self.stored else []
            self._open(index, out_channels, output, axis, rank, members, macs)
            return
        if not transpose and dims[1] == 1 and dims[0] == group:
            # depthwise: channel c in, channel c out, through W[c] and B[c]
            if data is None:
                flow = self._open(index, dims[0], output, axis, rank, [], 0)
                cause, detail = self._origin(node.input[0])
                self._pin(flow, cause, detail)
            else:
                flow = data.moved(axis, rank)
                self.flows[output] = flow
            self._add_member(flow, weight, axes[0], MemberRole.PER_CHANNEL)
            if bias in self.stored:
                self._add_member(flow, bias, 0, MemberRole.PER_CHANNEL)
            for space, _ in flow.sections:
                target = self._space(space)
                target.attributes[(label, "group")] = AttributeEdit(label, "group", 1)
                target.macs += macs
            return
        detail = f"{op} {label} has {group} groups"
        self._pin(data, DeclineCause.GROUPS_DISAGREE, detail)
        flow = self._open(index, out_channels, output, axis, rank, [], macs)
        self._pin(flow, DeclineCause.GROUPS_DISAGREE, detail)

    # ---- ops on the way ---------------------------------------------------------------

    def _propagate(self, index: int, node: onnx.NodeProto) -> None:
        op = node.op_type
        flow = self.flows.get(node.input[0]) if node.input else None
        standard = is_onnx_domain(node)
        microsoft = node.domain == "com.microsoft"
        if (standard or microsoft) and op in ELEMENTWISE_OPS:
            self._elementwise(index, node)
        elif (standard or microsoft) and op in UNARY_OPS and flow is not None:
            self._unary(index, node, flow)
        elif standard and op == "BatchNormalization" and flow is not None:
            self._channel_params(index, node, flow, node.input[1:5])
        elif standard and op == "InstanceNormalization" and flow is not None:
            # each channel is normalized on its own: it passes like BatchNormalization
            self._channel_params(index, node, flow, node.input[1:3])
        elif standard and op in ("QuantizeLinear", "DequantizeLinear") and flow is not None:
            self._quantize(index, node, flow)
        elif standard and op in POOL_OPS and flow is not None:
            self._at_axis_one(index, node, flow, [])
        elif standard and op in ("Pad", "Resize", "Upsample") and flow is not None:
            self._spatial(index, node, flow)
        elif standard and op in REDUCE_OPS and flow is not None:
            self._reduce(index, node, flow)
        elif standard and op in SOFTMAX_OPS and flow is not None:
            self._softmax(index, node, flow)
        elif op in LAYER_NORM_OPS or (standard and op == "GroupNormalization"):
            self._norm(index, node)
        elif standard and op == "Transpose" and flow is not None:
            self._transpose(index, node, flow)
        elif standard and op in RESHAPE_OPS and flow is not None:
            self._reshape(index, node, flow)
        elif standard and op == "Concat":
            self._concat(index, node)
        elif standard and op in ("Shape", "Size") and flow is not None:
            self._shape(index, node, flow)
        else:
            self._unknown(index, node)

    def _unknown(self, index: int, node: onnx.NodeProto) -> None:
        op, label = node.op_type, self.labels[index]
        mixing = op in ATTENTION_OPS or op in ("Split", "Slice", "Gather", "Expand", "Tile",
                                               "DepthToSpace", "SpaceToDepth")
        cause = DeclineCause.AXIS_MIXED if mixing else DeclineCause.UNKNOWN_OP
        detail = (f"{op} {label} is not followed yet" if mixing
                  else f"no rule for {node.domain + '::' if node.domain else ''}{op} {label}")
        for name in self.dataflow.reads[index]:
            self._pin(self.flows.get(name), cause, detail)

    def _unary(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        if node.op_type in ("FastGelu", "BiasGelu") and len(node.input) > 1 and node.input[1]:
            bias = node.input[1]
            if bias in self.stored and flow.axis == -1:
                self._add_member(flow, bias, len(self.stored[bias].dims) - 1,
                                 MemberRole.PER_CHANNEL)
            else:
                self._pin(flow, DeclineCause.NOT_PER_CHANNEL,
                          f"{node.op_type} {self.labels[index]}: bias not stored per channel")
        for slot, name in enumerate(node.input[1:], start=1):
            if name in self.flows:  # Clip bounds, CastLike's type source: scalars or types
                self._pin(self.flows[name], DeclineCause.AXIS_MIXED,
                          f"{node.op_type} {self.labels[index]} reads the channels at input "
                          f"{slot}")
        self.flows[node.output[0]] = flow

    def _elementwise(self, index: int, node: onnx.NodeProto) -> None:
        op, label = node.op_type, self.labels[index]
        flows = [self.flows[name] for name in node.input if name in self.flows]
        merged = flows[0]
        for other in flows[1:]:
            merged = self._meet(merged, other, op in ADDING_OPS, f"{op} {label}")
        for name in node.input:
            if not name or name in self.flows:
                continue
            self._operand(merged, name, f"{op} {label}")
        rank = None
        output_shape = self.shapes.get(node.output[0])
        if output_shape is not None:
            rank = len(output_shape)
        self.flows[node.output[0]] = merged.moved(merged.axis, rank)

    def _meet(self, a: _Flow, b: _Flow, residual: bool, where: str) -> _Flow:
        """Two flows meeting element-wise: one keep set."""
        if b.channels == 1 or a.channels == 1:  # one side broadcasts along the channels
            small, large = (a, b) if a.channels == 1 else (b, a)
            self._pin(small, DeclineCause.TOO_FEW_CHANNELS, f"one channel broadcast at {where}")
            return large
        if a.axis != b.axis:
            self._pin(a, DeclineCause.AXIS_MIXED, f"{where} meets channels on another axis")
            self._pin(b, DeclineCause.AXIS_MIXED, f"{where} meets channels on another axis")
            return a
        layout_a = [(offset, self._space(space).channels) for space, offset in a.sections]
        layout_b = [(offset, self._space(space).channels) for space, offset in b.sections]
        if layout_a != layout_b:
            self._pin(a, DeclineCause.GROUPS_DISAGREE, f"{where} meets differently cut channels")
            self._pin(b, DeclineCause.GROUPS_DISAGREE, f"{where} meets differently cut channels")
            return a
        for (space_a, _), (space_b, _) in zip(a.sections, b.sections, strict=True):
            self._union(space_a, space_b, residual)
        return a

    def _operand(self, flow: _Flow, name: str, where: str) -> None:
        """A non-activation operand of an element-wise op on `flow`'s channels: a member
        where it is a stored per-channel tensor; fine where it broadcasts along them."""
        dim = self._dim_at(name, flow.axis)
        if dim == 1:
            return
        tensor = self.stored.get(name)
        if tensor is not None:
            dims = list(tensor.dims)
            if dim == flow.channels:
                self._add_member(flow, name, len(dims) + flow.axis, MemberRole.PER_CHANNEL)
            else:
                self._pin(flow, DeclineCause.NOT_PER_CHANNEL,
                          f"{where}: constant {name} of shape {dims}")
            return
        if name in self.dataflow.static:
            reshaped = self._reshaped_constant(name, flow.channels) if dim == flow.channels \
                else None
            if reshaped is None:
                self._pin(flow, DeclineCause.NOT_PER_CHANNEL,
                          f"{where}: {name} is computed from constants, not stored")
                return
            source, edit = reshaped
            self._add_member(flow, source, 0, MemberRole.PER_CHANNEL)
            if edit is not None:
                if len(flow.sections) > 1:
                    self._pin(flow, DeclineCause.GROUPS_DISAGREE,
                              f"{where}: reshaped constant over concatenated channels")
                for space, _ in flow.sections:
                    self._space(space).shapes[(edit.tensor, edit.index)] = edit
            return
        cause, detail = self._origin(name)
        self._pin(flow, cause, f"{where} {detail}")

    def _reshaped_constant(self, name: str, channels: int
                           ) -> tuple[str, ShapeEdit | None] | None:
        """A stored vector of `channels` values brought to the activation's rank by a
        Reshape or Unsqueeze read once (PaddlePaddle exports biases so): the vector, and the
        entry of the Reshape target that spells the channel count, if one does."""
        producer = self.dataflow.producer.get(name)
        if producer is None or self._uses(name) != 1:
            return None
        node = self.dataflow.nodes[producer]
        if node.op_type not in ("Reshape", "Unsqueeze") or not is_onnx_domain(node):
            return None
        source = node.input[0]
        tensor = self.stored.get(source)
        if tensor is None or list(tensor.dims) != [channels] or self._uses(source) != 1:
            return None
        if node.op_type == "Unsqueeze":
            return source, None
        values = self._values(node.input[1])
        if values is None:
            return None
        target = [int(v) for v in values.reshape(-1)]
        spelled = [i for i, v in enumerate(target) if v == channels]
        if len(spelled) == 1 and all(v == 1 for i, v in enumerate(target) if i != spelled[0]):
            if self._uses(node.input[1]) != 1:
                return None
            return source, ShapeEdit(node.input[1], spelled[0])
        if target.count(-1) == 1 and all(v in (1, -1) for v in target):
            return source, None
        return None

    def _channel_params(self, index: int, node: onnx.NodeProto, flow: _Flow,
                        params: Sequence[str]) -> None:
        self._at_axis_one(index, node, flow, params)

    def _at_axis_one(self, index: int, node: onnx.NodeProto, flow: _Flow,
                     params: Sequence[str]) -> None:
        """An op on NC... layouts that keeps each channel to itself; `params` are its
        per-channel tensors."""
        op, label = node.op_type, self.labels[index]
        if self._abs_axis(flow, node.input[0]) != 1:
            self._pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label}: channels not on axis 1")
        for name in params:
            if not name:
                continue
            if name in self.stored and list(self.stored[name].dims) == [flow.channels]:
                self._add_member(flow, name, 0, MemberRole.PER_CHANNEL)
            elif name in self.flows:
                self._pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: {name} computed")
            else:
                self._pin(flow, DeclineCause.NOT_PER_CHANNEL,
                          f"{op} {label}: {name} not a stored per-channel tensor")
        self.flows[node.output[0]] = flow

    def _quantize(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        op, label = node.op_type, self.labels[index]
        rank = self._rank(flow, node.input[0])
        axis = attribute(node, "axis", 1)
        if attribute(node, "block_size", 0):
            self._pin(flow, DeclineCause.NOT_PER_CHANNEL, f"{op} {label} is blocked")
        for name in node.input[1:3]:
            if not name:
                continue
            tensor = self.stored.get(name)
            if tensor is None:
                self._pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: {name} computed")
            elif math.prod(tensor.dims) == 1:
                continue
            elif (rank is not None and (axis % rank) == flow.axis + rank
                  and list(tensor.dims) == [flow.channels]):
                self._add_member(flow, name, 0, MemberRole.PER_CHANNEL)
            else:
                self._pin(flow, DeclineCause.NOT_PER_CHANNEL,
                          f"{op} {label}: {name} is per another axis")
        self.flows[node.output[0]] = flow

    def _values(self, name: str | None) -> np.ndarray | None:
        return _small_array(self.stored.get(name)) if name else None

    def _spatial(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        """Pad, Resize, Upsample: fine where they leave the channel axis alone."""
        op, label = node.op_type, self.labels[index]
        rank = self._rank(flow, node.input[0])
        channel = None if rank is None else flow.axis + rank
        ok = False
        if rank is not None and channel is not None:
            if op == "Pad":
                pads = (self._values(node.input[1]) if len(node.input) > 1 and node.input[1]
                        else np.asarray(attribute(node, "pads", [])))
                axes_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
                axes = (list(range(rank)) if axes_name is None
                        else self._values(axes_name))
                if pads is not None and axes is not None:
                    axes = [int(a) % rank for a in np.asarray(axes).reshape(-1)]
                    pads = np.asarray(pads).reshape(-1)
                    ok = (len(pads) == 2 * len(axes)
                          and all(pads[i] == 0 and pads[i + len(axes)] == 0
                                  for i, a in enumerate(axes) if a == channel))
            else:
                ok = self._resize_keeps(node, flow, rank, channel)
        if not ok:
            self._pin(flow, DeclineCause.AXIS_MIXED,
                      f"{op} {label} may change the channel axis (or its values are unknown)")
        self.flows[node.output[0]] = flow

    def _resize_keeps(self, node: onnx.NodeProto, flow: _Flow, rank: int, channel: int) -> bool:
        inputs = list(node.input) + ["", "", "", ""]
        if node.op_type == "Upsample":
            scales = (self._values(inputs[1]) if inputs[1]
                      else np.asarray(attribute(node, "scales", [])))
            sizes = None
        else:
            scales = self._values(inputs[2]) if inputs[2] else None
            sizes = self._values(inputs[3]) if inputs[3] else None
            if node.op_type == "Resize" and self.opset < 11:
                scales = self._values(inputs[1])
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

    def _reduce(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        op, label = node.op_type, self.labels[index]
        rank = self._rank(flow, node.input[0])
        if rank is None:
            self._pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: rank unknown")
            return
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            values = self._values(node.input[1])
            if values is None:
                self._pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: axes computed")
                return
            axes = [int(a) for a in values.reshape(-1)]
        if not axes:
            axes = [] if attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
        axes = sorted({int(a) % rank for a in axes})
        keepdims = attribute(node, "keepdims", 1)
        channel = flow.axis + rank
        if channel in axes:
            if op in NORM_REDUCE_OPS:
                self._norm_over(flow, f"{op} {label} over the channel axis",
                                hidden=channel == rank - 1, allowed=bool(keepdims))
            else:
                self._pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label} reduces the channels")
            return  # the output holds no channels (a statistic broadcast back later)
        if keepdims:
            self.flows[node.output[0]] = flow.moved(flow.axis, rank)
        else:
            new_rank = rank - len(axes)
            new_channel = channel - sum(1 for a in axes if a < channel)
            self.flows[node.output[0]] = flow.moved(new_channel - new_rank, new_rank)

    def _norm_over(self, flow: _Flow, detail: str, hidden: bool, allowed: bool = True) -> None:
        """A normalization over the channel axis: pinned unless allowed by the user."""
        for space, _ in flow.sections:
            target = self._space(space)
            target.hidden = target.hidden or hidden
            if self.allow_norm and allowed:
                target.preserving = False
            else:
                target.pins.append((DeclineCause.NORMALIZATION, detail))

    def _softmax(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        op, label = node.op_type, self.labels[index]
        rank = self._rank(flow, node.input[0])
        new_default = self.opset >= 13
        axis = attribute(node, "axis", -1 if new_default else 1)
        if rank is None:
            self._pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: rank unknown")
        else:
            channel, axis = flow.axis + rank, axis % rank
            if (channel == axis) if new_default else (channel >= axis):
                self._pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label} over the channels")
        self.flows[node.output[0]] = flow

    def _norm(self, index: int, node: onnx.NodeProto) -> None:
        op, label = node.op_type, self.labels[index]
        skip = op in SKIP_NORM_OPS
        readers = node.input[:2] if skip else node.input[:1]
        flows = [self.flows[name] for name in readers if name in self.flows]
        if not flows:
            self._unknown(index, node)
            return
        flow = flows[0]
        for other in flows[1:]:
            flow = self._meet(flow, other, True, f"{op} {label}")
        if skip:
            for name in readers:
                if name not in self.flows:
                    self._operand(flow, name, f"{op} {label}")
        rank = self._rank(flow, node.input[0])
        if op == "GroupNormalization":
            params, first = list(node.input[1:3]), 1
        elif skip:
            params, first = list(node.input[2:5]), -1
        else:
            params = list(node.input[1:3])
            first = attribute(node, "axis", -1)
        if rank is None:
            self._pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: rank unknown")
            self._pass_norm(node, flow, skip)
            return
        channel, first = flow.axis + rank, first % rank
        if op == "GroupNormalization":
            covers = channel == 1
        else:
            covers = channel >= first
        if not covers:
            self._pin(flow, DeclineCause.AXIS_MIXED,
                      f"{op} {label} normalizes other axes than the channels'")
            self._pass_norm(node, flow, skip)
            return
        self._norm_over(flow, f"{op} {label}", hidden=op in LAYER_NORM_OPS)
        if self.allow_norm:
            if op == "GroupNormalization":
                groups = attribute(node, "num_groups", 1)
                for space, _ in flow.sections:
                    target = self._space(space)
                    target.multiple_of = math.lcm(target.multiple_of, groups)
                if len(flow.sections) > 1:
                    self._pin(flow, DeclineCause.GROUPS_DISAGREE,
                              f"{op} {label} over concatenated channels")
            for name in params:
                if not name:
                    continue
                tensor = self.stored.get(name)
                if tensor is None:
                    self._pin(flow, DeclineCause.NOT_A_CONSTANT, f"{op} {label}: {name}")
                    continue
                dims = list(tensor.dims)
                axis = len(dims) - (rank - channel) if op != "GroupNormalization" else 0
                if 0 <= axis < len(dims) and dims[axis] == flow.channels:
                    self._add_member(flow, name, axis, MemberRole.PER_CHANNEL)
                elif op == "GroupNormalization":
                    self._pin(flow, DeclineCause.GROUPS_DISAGREE,
                              f"{op} {label}: {name} per group, not per channel")
                else:
                    self._pin(flow, DeclineCause.NOT_PER_CHANNEL, f"{op} {label}: {name}")
        self._pass_norm(node, flow, skip)

    def _pass_norm(self, node: onnx.NodeProto, flow: _Flow, skip: bool) -> None:
        self.flows[node.output[0]] = flow
        if skip and len(node.output) > 3 and node.output[3]:
            self.flows[node.output[3]] = flow  # the sum input + skip (+ bias)

    def _transpose(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        perm = attribute(node, "perm", None)
        rank = len(perm) if perm else self._rank(flow, node.input[0])
        if rank is None:
            self._pin(flow, DeclineCause.DYNAMIC_SHAPE,
                      f"Transpose {self.labels[index]}: rank unknown")
            return
        perm = list(perm) if perm else list(reversed(range(rank)))
        channel = perm.index(flow.axis + rank)
        self.flows[node.output[0]] = flow.moved(channel - rank, rank)

    def _reshape(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        """Reshape, Flatten, Squeeze, Unsqueeze: fine where the channel axis stays one axis
        of its own (the dims before it multiply to the same); a Reshape target that spells
        the channel count becomes a shape edit."""
        op, label = node.op_type, self.labels[index]
        before = self.shapes.get(node.input[0])
        after = self.shapes.get(node.output[0])
        if (before is None or after is None) and op in ("Squeeze", "Unsqueeze"):
            moved = self._squeeze(node, flow)
            if moved is not None:
                self.flows[node.output[0]] = moved
                return
        if before is None or after is None:
            self._pin(flow, DeclineCause.DYNAMIC_SHAPE, f"{op} {label}: shapes unknown")
            return
        channel = flow.axis + len(before)
        if not 0 <= channel < len(before):
            self._pin(flow, DeclineCause.AXIS_MIXED, f"{op} {label}: channel axis lost")
            return
        lead = _product(before[:channel])
        target = None
        for position, dim in enumerate(after):
            if dim == flow.channels and _product(after[:position]) == lead and lead is not None:
                target = position
                break
        if target is None:
            self._pin(flow, DeclineCause.AXIS_MIXED,
                      f"{op} {label} merges or splits the channel axis")
            return
        if op == "Reshape":
            shape_name = node.input[1]
            values = self._values(shape_name)
            if values is None:
                self._pin(flow, DeclineCause.NOT_A_CONSTANT, f"Reshape {label}: target computed")
                return
            values = values.reshape(-1)
            if len(values) == len(after) and int(values[target]) == flow.channels:
                if self._uses(shape_name) > 1:
                    self._pin(flow, DeclineCause.SHARED_WEIGHT,
                              f"Reshape {label}: target {shape_name} also read elsewhere")
                if len(flow.sections) > 1:
                    self._pin(flow, DeclineCause.GROUPS_DISAGREE,
                              f"Reshape {label} of concatenated channels")
                for space, _ in flow.sections:
                    self._space(space).shapes[(shape_name, target)] = ShapeEdit(
                        shape_name, target)
            elif len(values) == len(after) and int(values[target]) == 0 and target != channel:
                self._pin(flow, DeclineCause.AXIS_MIXED, f"Reshape {label} copies a dim")
                return
        self.flows[node.output[0]] = flow.moved(target - len(after), len(after))

    def _squeeze(self, node: onnx.NodeProto, flow: _Flow) -> _Flow | None:
        """Squeeze/Unsqueeze with known axes on a flow of known rank (no shapes needed)."""
        rank = self._rank(flow, node.input[0])
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            values = self._values(node.input[1])
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

    def _concat(self, index: int, node: onnx.NodeProto) -> None:
        label = self.labels[index]
        inputs = [name for name in node.input if name]
        flows = [self.flows[name] for name in inputs if name in self.flows]
        first = flows[0]
        rank = self._rank(first, node.output[0])
        if rank is None:
            for flow in flows:
                self._pin(flow, DeclineCause.DYNAMIC_SHAPE, f"Concat {label}: rank unknown")
            return
        axis = attribute(node, "axis", 0) % rank
        channel = first.axis + rank
        if any(flow.axis != first.axis for flow in flows):
            for flow in flows:
                self._pin(flow, DeclineCause.AXIS_MIXED,
                          f"Concat {label} of channels on different axes")
            return
        if axis != channel:  # stacked along another axis: same channels in every input
            merged = first
            for other in flows[1:]:
                merged = self._meet(merged, other, False, f"Concat {label}")
            for name in inputs:
                if name not in self.flows:
                    self._operand(merged, name, f"Concat {label}")
            self.flows[node.output[0]] = merged.moved(merged.axis, rank)
            return
        sections: list[tuple[int, int]] = []
        offset = 0
        for name in inputs:
            part = self.flows.get(name)
            if part is None:
                size = self._dim_at(name, first.axis)
                if not isinstance(size, int):
                    for known in flows:
                        self._pin(known, DeclineCause.DYNAMIC_SHAPE,
                                  f"Concat {label}: size of {name} unknown")
                    return
                space = self._new_space(size)
                cause, detail = ((DeclineCause.NOT_PER_CHANNEL, f"Concat {label} of {name}")
                                 if name in self.dataflow.static else self._origin(name))
                self.spaces[space].pins.append((cause, detail))
                part = _Flow(((space, 0),), size, first.axis, rank)
            sections.extend((space, offset + inner) for space, inner in part.sections)
            offset += part.channels
        self.flows[node.output[0]] = _Flow(tuple(sections), offset, first.axis, rank)

    def _shape(self, index: int, node: onnx.NodeProto, flow: _Flow) -> None:
        """Shape/Size read the channel count; fine only where every reader of the shape
        takes other entries (a Gather of constant indices, or start/end leaving it out)."""
        op, label = node.op_type, self.labels[index]
        rank = self._rank(flow, node.input[0])
        if op == "Shape" and rank is not None:
            channel = flow.axis + rank
            start = attribute(node, "start", 0) % rank if rank else 0
            end = attribute(node, "end", None)
            end = rank if end is None else (end % rank if end < 0 else min(end, rank))
            if not start <= channel < end:
                return
            readers = self.index.main.consumers.get(node.output[0], [])
            if readers and all(self._gather_skips(use.node, channel - start) for use in readers):
                return
        self._pin(flow, DeclineCause.SHAPE_READ, f"{op} {label} reads the channel count")

    def _gather_skips(self, node: onnx.NodeProto, position: int) -> bool:
        if node.op_type != "Gather" or len(node.input) < 2:
            return False
        values = self._values(node.input[1])
        return values is not None and position not in [int(v) for v in values.reshape(-1)]

    # ---- results ----------------------------------------------------------------------

    def _results(self) -> tuple[list[ChannelGroup], list[Declined]]:
        ordered: list[tuple[int, ChannelGroup | Declined]] = list(self.not_candidates)
        seen: set[int] = set()
        for space_id in range(len(self.spaces)):
            root = self._root(space_id)
            if root in seen:
                continue
            seen.add(root)
            space = self.spaces[root]
            if not space.producers:
                continue
            first = min(space.producers)
            ordered.append((first, self._finish(space, first)))
        ordered.sort(key=lambda item: (item[0], item[1].name if isinstance(item[1], ChannelGroup)
                                       else item[1].value))
        groups = [item for _, item in ordered if isinstance(item, ChannelGroup)]
        declined = [item for _, item in ordered if isinstance(item, Declined)]
        return groups, declined

    def _finish(self, space: _Space, first: int) -> ChannelGroup | Declined:
        name = self.dataflow.nodes[first].output[0]
        pins = list(space.pins)
        if space.residual and space.hidden and not self.allow_hidden:
            pins.append((DeclineCause.RESIDUAL_STREAM,
                         "the hidden size of a transformer's residual stream"))
        if space.channels < 2:
            pins.append((DeclineCause.TOO_FEW_CHANNELS, f"{space.channels} channel"))
        roles = {member.role for member in space.members.values()}
        if not pins and MemberRole.INPUT not in roles:
            pins.append((DeclineCause.UNKNOWN_OP, "no consumer reads the channels"))
        if pins:
            causes = sorted({cause for cause, _ in pins}, key=CAUSE_ORDER.index)
            detail = next(detail for cause, detail in pins if cause == causes[0])
            return Declined(name, causes[0], detail, tuple(causes[1:]))
        members = tuple(sorted(space.members.values(),
                               key=lambda m: (_ROLE_ORDER[m.role], m.tensor, m.axis, m.offset)))
        producers = {self.dataflow.nodes[p].op_type for p in space.producers}
        ffn = (producers <= {"MatMul", "Gemm"} and len(space.consumers) == 1
               and space.consumers[0] in ("MatMul", "Gemm") and not space.residual
               and len(space.producers) <= 2)
        params = sum(self._carried(member, space.channels) for member in members)
        return ChannelGroup(
            name=name, kind=StructureKind.FFN if ffn else StructureKind.CHANNELS,
            channels=space.channels, members=members,
            attributes=tuple(sorted(space.attributes.values(),
                                    key=lambda a: (a.node, a.attribute))),
            shapes=tuple(sorted(space.shapes.values(), key=lambda s: (s.tensor, s.index))),
            multiple_of=space.multiple_of, params=params, macs=space.macs,
            output_preserving=space.preserving)

    def _carried(self, member: Member, channels: int) -> int:
        dims = list(self.stored[member.tensor].dims)
        if not dims or dims[member.axis] == 0:
            return 0
        return math.prod(dims) // dims[member.axis] * channels * member.block


_ROLE_ORDER = {MemberRole.OUTPUT: 0, MemberRole.PER_CHANNEL: 1, MemberRole.INPUT: 2}


def _product(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    """The product of dims as (known part, sorted symbols), None where one is unknown."""
    known, symbols = 1, []
    for dim in dims:
        if isinstance(dim, int):
            known *= dim
        elif isinstance(dim, str):
            symbols.append(dim)
        else:
            return None
    return known, tuple(sorted(symbols))
