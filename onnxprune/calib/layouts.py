"""Layer-input layouts: how a target and its calibration inputs line up as OBS matrices.

Every calibrated method sees a target as W2 [outputs, inputs] per group and its calibration
inputs as X [tokens, inputs], so that the layer's output (before any bias) is X·W2ᵀ.
MatMul / Gemm: W2 is `WeightTarget.to_matrix` (outputs × reduction axis) and X the other
operand with its reduction axis last and every other axis folded into tokens. Conv with
weight [O, I/g, k1, k2, ...]: one matrix per group g, W2_g [O/g, k1·k2·…·I/g] whose columns
run over kernel offsets (slowest) then input channels (fastest), so that M consecutive
columns are M consecutive input channels at one kernel offset, which is exactly an N:M group
along the input-channel axis. X_g is the im2col of the input, with the same column order,
one row per (batch item, output position), honouring strides, pads, auto_pad and dilations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from onnx import numpy_helper

from ..errors import CalibrationError
from ..graph import GraphIndex, attribute, constant_tensor, is_onnx_domain
from ..io import uses_external_data
from ..targets import WeightTarget

# Tokens per chunk when summing XᵀX: float32 products over at most this many rows, then
# added into float64.
CHUNK_ROWS = 2048
CHUNK_ELEMENTS = 1 << 22  # and at most this many floats per chunk (im2col of large inputs)


@dataclass(frozen=True)
class MatrixInput:
    """A MatMul / Gemm operand: reduction axis last (second to last if `transposed`)."""

    features: int
    transposed: bool = False
    # a quantized activation (QLinearMatMul, MatMulInteger): its (scale, zero point)
    dequantize: tuple[float, float] | None = None

    groups = 1

    def rows(self, activation: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(group, X chunk [tokens, features] float32) pairs covering the activation."""
        array = _dequantized(np.asarray(activation), self.dequantize)
        if self.transposed and array.ndim >= 2:
            array = np.swapaxes(array, -1, -2)
        if array.shape[-1:] != (self.features,):
            raise CalibrationError(f"layer input of shape {list(np.shape(activation))} does not "
                                   f"have {self.features} input features where expected")
        matrix = array.reshape(-1, self.features)
        step = max(1, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, self.features)))
        for start in range(0, matrix.shape[0], step):
            yield 0, np.ascontiguousarray(matrix[start:start + step], dtype=np.float32)


@dataclass(frozen=True)
class ConvInput:
    """A Conv data input, seen through im2col with the weight's column order."""

    channels: int  # input channels per group
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin pads, then end pads (ONNX order)
    auto_pad: str = "NOTSET"
    dequantize: tuple[float, float] | None = None  # as MatrixInput's (QLinearConv, ConvInteger)

    @property
    def features(self) -> int:
        return math.prod(self.kernel) * self.channels

    def geometry(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...],
                                                        tuple[int, ...]]:
        """Output spatial shape, begin pads and end pads for an input of `spatial` shape."""
        rank = len(self.kernel)
        spans = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = tuple(-(-size // s) for size, s in zip(spatial, self.strides, strict=True))
            totals = [max(0, (o - 1) * s + span - size) for o, s, span, size
                      in zip(out, self.strides, spans, spatial, strict=True)]
            small = tuple(t // 2 for t in totals)
            large = tuple(t - t // 2 for t in totals)
            begin, end = (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)
            return out, tuple(begin), tuple(end)
        if self.auto_pad == "VALID":
            begin = end = (0,) * rank
        else:
            begin, end = self.pads[:rank], self.pads[rank:]
        out = tuple((size + b + e - span) // s + 1 for size, b, e, span, s
                    in zip(spatial, begin, end, spans, self.strides, strict=True))
        return out, tuple(begin), tuple(end)

    def rows(self, activation: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(group, im2col chunk [positions, features] float32), per batch item and group."""
        x = _dequantized(np.asarray(activation), self.dequantize)
        rank = len(self.kernel)
        if x.ndim != rank + 2 or x.shape[1] != self.channels * self.groups:
            raise CalibrationError(f"Conv input of shape {list(x.shape)} does not have "
                                   f"{self.channels * self.groups} channels and {rank} "
                                   "spatial axes")
        out, begin, end = self.geometry(x.shape[2:])
        if min(out) <= 0:
            return
        offsets = list(itertools.product(*(range(k) for k in self.kernel)))
        per_first = math.prod(out[1:]) * self.features
        step = max(1, CHUNK_ELEMENTS // max(1, per_first))
        pad_width = [(0, 0)] + list(zip(begin, end, strict=True))
        for item in range(x.shape[0]):
            for group in range(self.groups):
                channels = x[item, group * self.channels:(group + 1) * self.channels]
                padded = np.pad(channels.astype(np.float32, copy=False), pad_width)
                for first in range(0, out[0], step):
                    count = min(step, out[0] - first)
                    part = (count,) + out[1:]
                    columns = np.empty(part + (len(offsets), self.channels), dtype=np.float32)
                    for index, offset in enumerate(offsets):
                        window = [slice(None)]
                        for axis in range(rank):
                            origin = offset[axis] * self.dilations[axis]
                            if axis == 0:
                                origin += first * self.strides[0]
                            window.append(slice(origin,
                                                origin + (part[axis] - 1) * self.strides[axis] + 1,
                                                self.strides[axis]))
                        columns[..., index, :] = np.moveaxis(padded[tuple(window)], 0, -1)
                    yield group, columns.reshape(-1, self.features)


Layout = MatrixInput | ConvInput


def _unfit_geometry(geometry: Mapping[str, tuple], rank: int) -> str:
    """The first of strides, dilations, pads whose length or values do not fit a `rank`-D
    kernel ('' when all fit)."""
    for name, values in geometry.items():
        length = 2 * rank if name == "pads" else rank
        least = 0 if name == "pads" else 1
        if len(values) != length or not all(isinstance(v, int) and not isinstance(v, bool)
                                            and v >= least for v in values):
            return name
    return ""


def _dequantized(array: np.ndarray, grid: tuple[float, float] | None) -> np.ndarray:
    if grid is None:
        return array
    scale, zero = grid
    return (array.astype(np.float32) - np.float32(zero)) * np.float32(scale)


def layer_inputs(layout: Layout, activation: np.ndarray) -> list[np.ndarray]:
    """The whole X [tokens, features] of each group for one activation (for tests/tools)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(layout.groups)]
    for group, rows in layout.rows(activation):
        parts[group].append(rows)
    return [np.concatenate(p) if p else np.zeros((0, layout.features), np.float32)
            for p in parts]


@dataclass
class TargetView:
    """One target as OBS matrices [groups, outputs/groups, features], and where its inputs are.

    `inputs` holds one (activation name, layout) per consumer node; the weight sees the sum
    of their statistics. `consumers` are the consumer nodes' indices in the main graph's
    `Dataflow.nodes`.
    """

    target: WeightTarget
    inputs: tuple[tuple[str, Layout], ...]
    consumers: tuple[int, ...]  # indices into `GraphIndex.dataflow.nodes`
    groups: int = 1
    features: int = 0

    def to_obs(self, weights: np.ndarray) -> np.ndarray:
        """The weights as float32 [groups, rows, features] (a new array)."""
        weights = np.asarray(weights)
        if self.target.op_type in CONV_LIKE:
            out_channels, channels = weights.shape[:2]
            grouped = weights.reshape(self.groups, out_channels // self.groups, channels,
                                      -1)
            moved = np.swapaxes(grouped, 2, 3)  # [g, O/g, kernel positions, channels]
            return np.ascontiguousarray(moved, dtype=np.float32).reshape(
                self.groups, out_channels // self.groups, self.features)
        return np.ascontiguousarray(self.target.to_matrix(weights), dtype=np.float32)[None]

    def from_obs(self, matrices: np.ndarray) -> np.ndarray:
        """Inverse of `to_obs`: the stored layout (dtype kept), C-contiguous."""
        if self.target.op_type in CONV_LIKE:
            shape = self.target.shape
            out_channels, channels = shape[:2]
            positions = math.prod(shape[2:])
            grouped = matrices.reshape(self.groups, out_channels // self.groups, positions,
                                       channels)
            return np.ascontiguousarray(np.swapaxes(grouped, 2, 3)).reshape(shape)
        return self.target.from_matrix(matrices[0])


def target_view(target: WeightTarget, index: GraphIndex) -> TargetView | str:
    """How `target` lines up with its consumers' inputs, or why it cannot be calibrated."""
    if target.graph is not index.graph or target.source not in ("initializer",
                                                                "constant_node"):
        return f"stored in {target.source}; only main-graph weights can be calibrated"
    uses, _ = index.uses(target.tensor_name)
    if any(not use.scope.is_main for use in uses):
        return "some consumers sit inside subgraphs, whose inputs cannot be captured"
    flow = index.dataflow
    inputs: list[tuple[str, Layout]] = []
    nodes, consumers = [], []
    groups = 1
    features = None
    for use in uses:
        node, slot = use.node, use.slot
        layout: Layout  # each supported consumer sets both; any other returns
        activation: str
        if node.op_type == "MatMul" and is_onnx_domain(node):
            if any(d != 1 for d in target.shape[:-2]):
                return "MatMul weight with batch dimensions"
            activation = node.input[1 - slot]
            layout = MatrixInput(target.reduction_length, transposed=slot == 0)
        elif node.op_type == "Gemm" and is_onnx_domain(node) and slot in (0, 1):
            activation = node.input[1 - slot]
            if slot == 1:
                transposed = bool(attribute(node, "transA", 0))
            else:
                transposed = not attribute(node, "transB", 0)
            layout = MatrixInput(target.reduction_length, transposed=transposed)
        elif (node.op_type, slot) in QUANTIZED_MATRIX_SLOTS and is_onnx_domain(node):
            if len(target.shape) != 2:
                return f"{node.op_type} weight with batch dimensions"
            quantized = _quantized_activation(node, flow)
            if isinstance(quantized, str):
                return quantized
            activation, grid = quantized
            layout = MatrixInput(target.reduction_length, dequantize=grid)
        elif node.op_type in CONV_LIKE and is_onnx_domain(node) and \
                slot == CONV_LIKE[node.op_type]:
            if use.perms:
                return "Conv weight reached through a Transpose"
            groups = int(attribute(node, "group", 1))
            rank = len(target.shape) - 2
            kernel = tuple(int(k) for k in target.shape[2:])
            geometry = {name: tuple(attribute(node, name, [default] * (rank * count)))
                        for name, default, count in (("strides", 1, 1), ("dilations", 1, 1),
                                                     ("pads", 0, 2))}
            unfit = _unfit_geometry(geometry, rank)
            if unfit:  # onnxruntime checks these for Conv, not for QLinearConv/ConvInteger
                return f"its {unfit} do not fit its {rank}-D kernel"
            layout = ConvInput(
                channels=int(target.shape[1]), groups=groups, kernel=kernel,
                strides=geometry["strides"], dilations=geometry["dilations"],
                pads=geometry["pads"], auto_pad=_text(attribute(node, "auto_pad", "NOTSET")))
            activation = node.input[0]
            if node.op_type != "Conv":
                quantized = _quantized_activation(node, flow)
                if isinstance(quantized, str):
                    return quantized
                activation, grid = quantized
                layout = replace(layout, dequantize=grid)
            if target.shape[0] % groups:
                return f"Conv with {target.shape[0]} outputs and group={groups}"
        else:
            return f"{node.op_type} consumers are not supported by calibrated methods"
        if activation in flow.static:
            return "the layer input is a constant"
        if features is not None and layout.features != features:
            return "consumers disagree on the number of input features"
        features = layout.features
        inputs.append((activation, layout))
        nodes.append(node)
        consumers.append(flow.index_of(use))
    ops = {n.op_type for n in nodes}
    if ops & set(CONV_LIKE) and len(ops) > 1:
        return "weight used both by Conv and by other ops"
    return TargetView(target, tuple(inputs), tuple(consumers), groups, features or 0)


# weight slot of ops whose weights view as Conv's [O, I/g, k...]
CONV_LIKE = {"Conv": 1, "QLinearConv": 3, "ConvInteger": 1}
# (op, weight slot) of quantized matrix products whose activation is input 0
QUANTIZED_MATRIX_SLOTS = {("QLinearMatMul", 3), ("MatMulInteger", 1)}


def _quantized_activation(node, flow) -> tuple[str, tuple[float, float] | None] | str:
    """The activation to capture for a quantized consumer and how to dequantize it: a
    DynamicQuantizeLinear's float input as it is, else the integer input with the op's
    stored scale (QLinear ops; the integer ops have none, and a uniform scale changes no
    method's choice) and zero point; or why it cannot be captured."""
    name = node.input[0]
    producer = flow.producer.get(name)
    if producer is not None and flow.nodes[producer].op_type == "DynamicQuantizeLinear":
        return flow.nodes[producer].input[0], None
    if node.op_type in ("QLinearMatMul", "QLinearConv"):
        scale_name, zero_name = node.input[1], node.input[2]
    else:
        scale_name, zero_name = "", node.input[2] if len(node.input) > 2 else ""
    scale = _stored_scalar(flow, scale_name, 1.0)
    zero = _stored_scalar(flow, zero_name, 0.0)
    if scale is None or zero is None:
        return f"{node.op_type} activation scale or zero point is not a stored scalar"
    return name, (scale, zero)


def _stored_scalar(flow, name: str, default: float) -> float | None:
    """A one-element initializer or Constant value, inline; None where it is not one."""
    if not name:
        return default
    tensor = flow.initializers.get(name)
    if tensor is None and name in flow.producer:
        tensor = constant_tensor(flow.nodes[flow.producer[name]])
    if tensor is None or math.prod(tensor.dims) != 1 or uses_external_data(tensor):
        return None
    return float(numpy_helper.to_array(tensor).reshape(-1)[0])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
