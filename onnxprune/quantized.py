"""Quantized weights: which integer tensors are weights, and the grid between their stored
integers and the values their consumer computes with.

A quantized weight is an integer tensor read by a quantization op at its weight slot:
DequantizeLinear (per tensor, per axis or in blocks; int8/uint8/int16/uint16/int4/uint4)
feeding a float consumer, or an op that computes on integers itself (QLinearConv,
QLinearMatMul, ConvInteger, MatMulInteger, com.microsoft QGemm, DynamicQuantizeLSTM and
the 4-bit block-packed MatMulNBits). onnxprune prunes the values `(q - zero_point) * scale`
and writes a pruned weight back as exactly its zero point; kept integers are written back
unchanged, rebuilt values are rounded onto the grid (`Grid.quantize`).

Weights stay in their stored layout except for MatMulNBits, whose [N, blocks, bytes] of
packed 4-bit values are seen as the [N, K] matrix they hold (`QuantizedWeight.shape`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from .errors import OnnxPruneError
from .graph import Scope, StoredTensor, attribute, constant_tensor
from .io import read_array

# stored integer types a grid can hold, with their ranges
_RANGES: dict[int, tuple[int, int]] = {
    TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
    TensorProto.INT16: (-32768, 32767), TensorProto.UINT16: (0, 65535),
    TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
}
_NP_TYPES: dict[int, np.dtype] = {
    TensorProto.INT8: np.dtype(np.int8), TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16), TensorProto.UINT16: np.dtype(np.uint16),
}
MS_DOMAIN = "com.microsoft"
# op -> (domains, {weight slot: (scale slot or None, zero-point slot)}); onnxruntime's
# quantizer writes com.microsoft DequantizeLinear for int4 below opset 21
QUANTIZED_OPS: dict[str, tuple[tuple[str, ...], dict[int, tuple[int | None, int]]]] = {
    "DequantizeLinear": (("", MS_DOMAIN), {0: (1, 2)}),
    "QLinearConv": (("",), {3: (4, 5)}),
    "QLinearMatMul": (("",), {3: (4, 5)}),
    "ConvInteger": (("",), {1: (None, 3)}),
    "MatMulInteger": (("",), {1: (None, 3)}),
    "QGemm": ((MS_DOMAIN,), {3: (4, 5)}),
    "DynamicQuantizeLSTM": ((MS_DOMAIN,), {1: (8, 9), 2: (10, 11)}),
    "MatMulNBits": ((MS_DOMAIN,), {1: (2, 3)}),
}


class QuantizedValuesError(OnnxPruneError):
    """A quantized weight's scale values make no grid (NaN, infinite, overflowing)."""


class Unsupported(Exception):
    """An integer weight of a quantization op that onnxprune cannot prune; says why."""

    def __init__(self, op: str, why: str):
        super().__init__(f"{op}: {why}")
        self.op = op
        self.why = why


@dataclass(frozen=True)
class Grid:
    """Scale and zero point broadcast to a weight's (logical) shape, and its integer range."""

    scale: np.ndarray  # float32, broadcastable to the weight
    zero_point: np.ndarray  # int32, broadcastable to the weight
    qmin: int
    qmax: int

    def dequantize(self, ints: np.ndarray) -> np.ndarray:
        """The values the consumer computes with, float32 (pruned weights are exactly 0)."""
        shifted = ints.astype(np.int32) - self.zero_point
        return (shifted.astype(np.float32) * self.scale).astype(np.float32, copy=False)

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Nearest grid integers (int32), clipped to the range: 0 -> the zero point, and a
        dequantized value back to its own integer."""
        scale = np.broadcast_to(self.scale, values.shape)
        safe = np.where(scale == 0, np.float32(1), scale)
        steps = np.rint(values.astype(np.float32) / safe)
        steps = np.where(scale == 0, 0, steps)
        ints = steps.astype(np.int64) + self.zero_point
        return np.clip(ints, self.qmin, self.qmax).astype(np.int32)

    def round(self, values: np.ndarray) -> np.ndarray:
        """`values` moved to the nearest point of the grid (float32)."""
        return self.dequantize(self.quantize(values))

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is 0 (stored zeros are then 0 bits)."""
        return not np.any(self.zero_point)


@dataclass(frozen=True)
class QuantizedWeight:
    """How one quantized weight's stored integers map to values: read from the graph at
    discovery; the scale and zero point tensors are read only when `grid` is asked for."""

    op: str  # the quantization op reading the weight
    stored_type: int
    shape: tuple[int, ...]  # the weight as pruned (MatMulNBits: [N, K])
    scale: TensorProto | None
    zero_point: TensorProto | None
    view: tuple[int, ...]  # shape the scale and zero point take to broadcast over `shape`
    block_axis: int = -1  # blocks along this axis (blocked DequantizeLinear, MatMulNBits)
    block_size: int = 0
    bits: int = 0  # MatMulNBits: bits per packed value
    default_zero: int = 0

    @property
    def qmin(self) -> int:
        return 0 if self.bits else _RANGES[self.stored_type][0]

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1 if self.bits else _RANGES[self.stored_type][1]

    @property
    def dtype_name(self) -> str:
        if self.bits:
            return f"uint{self.bits} (MatMulNBits)"
        return TensorProto.DataType.Name(self.stored_type).lower()

    @property
    def packed(self) -> bool:
        """Stored several values to a byte (int4/uint4, MatMulNBits)."""
        return bool(self.bits) or self.stored_type in (TensorProto.INT4, TensorProto.UINT4)

    def grid(self, base_dir) -> Grid:
        # a MatMulInteger/ConvInteger whose weight scale was not found after it (see
        # `_scale_after`): the weight's integers minus its zero point
        scale = (np.ones(math.prod(self.view), np.float32) if self.scale is None else
                 np.asarray(read_array(self.scale, base_dir), dtype=np.float32))
        if self.zero_point is None:
            zero = np.full(scale.shape, self.default_zero, np.int32)
        elif self.bits:  # packed row by row, each row padded to whole bytes
            rows, blocks = self.view
            packed = np.asarray(read_array(self.zero_point, base_dir)).reshape(rows, -1)
            zero = _unpack_bits(packed, self.bits)[:, :blocks]
        else:
            zero = np.asarray(read_array(self.zero_point, base_dir)).astype(np.int32)
        if not np.isfinite(scale).all():
            raise QuantizedValuesError(f"{self.op}: its scale holds NaN or infinite values")
        reach = max(abs(self.qmin - int(zero.min(initial=0))),
                    abs(self.qmax - int(zero.max(initial=0))))
        if float(np.abs(scale).max(initial=0.0)) * reach > float(np.finfo(np.float32).max):
            raise QuantizedValuesError(f"{self.op}: its scale is so large that the weights "
                                       "overflow float32")
        return Grid(self._spread(scale), self._spread(zero), self.qmin, self.qmax)

    def _spread(self, values: np.ndarray) -> np.ndarray:
        """Scale or zero point in a shape that broadcasts over the weight."""
        count = math.prod(self.view)
        values = values.reshape(-1)[:count].reshape(self.view)
        if self.block_size:
            axis = self.block_axis
            values = np.repeat(values, self.block_size, axis=axis)
            values = np.take(values, np.arange(self.shape[axis]), axis=axis)
        return values

    def to_ints(self, stored: np.ndarray) -> np.ndarray:
        """The stored tensor's integers (int32) in the weight's shape."""
        if self.bits:
            rows, cols = self.shape
            return _unpack_bits(stored, self.bits).reshape(rows, -1)[:, :cols]
        return np.asarray(stored).astype(np.int32)

    def to_stored(self, ints: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """Integers in the weight's shape back in the stored form; `stored` is the tensor as
        it was (MatMulNBits keeps the padding of its last block from it). Packed types come
        back as their raw bytes (uint8)."""
        ints = np.asarray(ints)
        if self.bits:
            old = _unpack_bits(stored, self.bits).reshape(self.shape[0], -1).copy()
            old[:, :self.shape[1]] = ints
            return _pack_bits(old, self.bits).reshape(stored.shape)
        if self.stored_type in (TensorProto.INT4, TensorProto.UINT4):
            return _pack_bits(ints, 4)
        return ints.astype(_NP_TYPES[self.stored_type])


def unpack_nibbles(raw: np.ndarray, count: int, signed: bool) -> np.ndarray:
    """The first `count` 4-bit values of ONNX int4/uint4 raw bytes (low nibble first), flat:
    int8 sign-extended when `signed` (int4), else uint8 (uint4)."""
    values = _unpack_bits(np.asarray(raw, np.uint8).reshape(-1), 4)[:count]
    if signed:
        values = values - ((values & 8) << 1)
    return values.astype(np.int8 if signed else np.uint8)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Integers in [-8, 15] as ONNX int4/uint4 raw bytes: two to a byte, low nibble first,
    the last byte's high nibble 0 for an odd count (uint8, flat)."""
    return _pack_bits(values, 4)


def _unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Values packed low bits first, `8 // bits` to a byte, as int32 (unsigned)."""
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(-1)
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (raw[:, None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*np.shape(packed)[:-1], -1).astype(np.int32) if packed.ndim > 1 \
        else values.reshape(-1).astype(np.int32)


def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `_unpack_bits` over the flattened values (a last byte is zero-padded);
    signed values keep their low bits (two's complement, as ONNX stores int4)."""
    flat = (np.asarray(values).reshape(-1).astype(np.int32) & ((1 << bits) - 1)).astype(
        np.uint8)
    per_byte = 8 // bits
    padded = np.zeros(-(-flat.size // per_byte) * per_byte, np.uint8)
    padded[:flat.size] = flat
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(padded.reshape(-1, per_byte) << shifts, axis=1).astype(
        np.uint8)


def weight_slot_of(node: onnx.NodeProto, slot: int) -> bool:
    """Whether `slot` of `node` is the weight slot of a quantization op."""
    entry = QUANTIZED_OPS.get(node.op_type)
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return entry is not None and domain in entry[0] and slot in entry[1]


class StaticValues:
    """Stored tensors by scope and name: where a quantization op's scale and zero point are."""

    def __init__(self, stored: list[StoredTensor]):
        self._by_name: dict[tuple[int, str], TensorProto] = {
            (id(item.scope), item.name): item.tensor for item in stored}

    def find(self, scope: Scope, name: str) -> TensorProto | None:
        if not name:
            return None
        owner = scope.owner_of(name)
        if owner is None:
            return None
        tensor = self._by_name.get((id(owner), name))
        if tensor is None:  # a Constant node defined in the owner
            for node in owner.graph.node:
                if node.op_type == "Constant" and node.output and node.output[0] == name:
                    return constant_tensor(node)
        return tensor


def quantized_weight(item: StoredTensor, values: StaticValues) -> QuantizedWeight | None:
    """The quantization of an integer stored tensor that quantization ops read as a weight,
    None when none does (an ordinary integer tensor), or `Unsupported` raised."""
    if item.tensor.data_type == TensorProto.INT32:  # quantized biases (DequantizeLinear)
        return None
    uses = item.scope.consumers.get(item.name, [])
    weight_uses = [use for use in uses if weight_slot_of(use.node, use.slot)]
    if not weight_uses:
        return None
    if len(weight_uses) < len(uses):
        stray = next(use for use in uses if use not in weight_uses)
        raise Unsupported(weight_uses[0].node.op_type, "the integer weight is also read by "
                          f"{stray.node.op_type}, outside a quantization op's weight slot")
    found = [_describe(item, use.node, use.slot, use.scope, values) for use in weight_uses]
    first = found[0]
    for second in found[1:]:
        if not _same_grid(first, second):
            raise Unsupported(first.op, "read by several quantization ops with different "
                                        "scales or zero points")
    return first


def _same_grid(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    def names(w: QuantizedWeight):
        return (w.scale.name if w.scale is not None else None,
                w.zero_point.name if w.zero_point is not None else None)
    return (a.shape == b.shape and a.view == b.view and names(a) == names(b)
            and a.block_size == b.block_size and a.bits == b.bits)


def _int_attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    """An integer attribute, or `Unsupported` naming it when it holds something else."""
    value = attribute(node, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unsupported(node.op_type, f"its attribute {name} is not an integer")
    return value


def _describe(item: StoredTensor, node: onnx.NodeProto, slot: int, scope: Scope,
              values: StaticValues) -> QuantizedWeight:
    op = node.op_type
    data_type = item.tensor.data_type
    shape = tuple(int(d) for d in item.tensor.dims)
    scale_slot, zero_slot = QUANTIZED_OPS[op][1][slot]

    def static(slot_number: int | None, what: str) -> TensorProto | None:
        if slot_number is None or slot_number >= len(node.input) or not node.input[slot_number]:
            return None
        tensor = values.find(scope, node.input[slot_number])
        if tensor is None:
            raise Unsupported(op, f"its {what} is computed at run time, not stored")
        return tensor

    scale = static(scale_slot, "scale")
    zero = static(zero_slot, "zero point")
    if scale_slot is None:  # MatMulInteger, ConvInteger: the scale is applied after the op
        scale = _scale_after(node, scope, values, zero)
    if op == "MatMulNBits":
        return _nbits(item, node, scale, zero, slot, scope)
    if data_type not in _RANGES:
        raise Unsupported(op, f"{TensorProto.DataType.Name(data_type).lower()} weights are "
                              "not supported")
    if zero is not None and zero.data_type != data_type:
        raise Unsupported(op, "the zero point's type differs from the weight's")
    if scale is not None and scale.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                     TensorProto.BFLOAT16, TensorProto.DOUBLE):
        raise Unsupported(op, "its scale is not floating point")
    rank = len(shape)
    given = scale if scale is not None else zero
    grid_shape = tuple(int(d) for d in given.dims) if given is not None else ()
    count = math.prod(grid_shape)
    if scale is not None and zero is not None and math.prod(zero.dims) != count:
        raise Unsupported(op, f"{math.prod(zero.dims)} zero points for {count} scales")

    def made(view: tuple[int, ...], block_axis: int = -1, block_size: int = 0
             ) -> QuantizedWeight:
        return QuantizedWeight(op, data_type, shape, scale, zero, view, block_axis, block_size)

    if count == 1:
        return made((1,) * rank)
    if op == "DequantizeLinear":
        axis = _int_attribute(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        block = _int_attribute(node, "block_size", 0)
        if not 0 <= axis < rank:
            raise Unsupported(op, f"axis {axis} is outside the weight's rank {rank}")
        if block:
            view = tuple(grid_shape)
            if len(view) != rank or view[axis] != -(-shape[axis] // block):
                raise Unsupported(op, "its block scales do not match the weight's shape")
            return made(view, axis, block)
        return made(_axis_view(rank, axis, count, shape, op))
    if op in ("QLinearConv", "ConvInteger"):
        return made(_axis_view(rank, 0, count, shape, op))
    if op in ("QLinearMatMul", "MatMulInteger"):
        return made(_axis_view(rank, rank - 1, count, shape, op))
    if op == "QGemm":
        axis = 0 if _int_attribute(node, "transB", 0) else 1
        return made(_axis_view(rank, axis, count, shape, op))
    # DynamicQuantizeLSTM: [directions] or [directions, 4*hidden] over [dirs, in, 4*hidden]
    if len(grid_shape) == 1 and rank == 3 and count == shape[0]:
        return made((shape[0], 1, 1))
    if len(grid_shape) == 2 and rank == 3 and grid_shape == (shape[0], shape[2]):
        return made((shape[0], 1, shape[2]))
    raise Unsupported(op, f"scale of shape {list(grid_shape)} does not match the weight "
                          f"{list(shape)}")


def _scale_after(node: onnx.NodeProto, scope: Scope, values: StaticValues,
                 zero: TensorProto | None) -> TensorProto | None:
    """The weight scale a MatMulInteger/ConvInteger output is multiplied by, as onnxruntime's
    dynamic quantizer writes it: op -> Cast -> Mul(., Mul(activation scale, weight scale)).
    None where the graph is otherwise, or where the scales are not as many as the zero
    points: the weight is then read as its integers minus the zero point."""
    def only_consumer(name: str, op_type: str) -> onnx.NodeProto | None:
        uses = scope.consumers.get(name, [])
        if len(uses) != 1 or uses[0].node.op_type != op_type:
            return None
        return uses[0].node

    cast = only_consumer(node.output[0], "Cast") if node.output else None
    mul = only_consumer(cast.output[0], "Mul") if cast is not None and cast.output else None
    if cast is None or mul is None or len(mul.input) != 2:
        return None
    other = mul.input[1] if mul.input[0] == cast.output[0] else mul.input[0]
    product = scope.producers.get(other)
    if product is None or product.op_type != "Mul":
        return None
    stored = [tensor for tensor in (values.find(scope, name) for name in product.input)
              if tensor is not None]
    if len(stored) != 1 or stored[0].data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                        TensorProto.DOUBLE):
        return None
    if zero is not None and math.prod(zero.dims) != math.prod(stored[0].dims):
        return None
    return stored[0]


def _axis_view(rank: int, axis: int, count: int, shape: tuple[int, ...], op: str
               ) -> tuple[int, ...]:
    if rank == 0 or shape[axis] != count:
        raise Unsupported(op, f"{count} scales do not run along axis {axis} of the weight "
                              f"{list(shape)}")
    return tuple(count if i == axis else 1 for i in range(rank))


def _nbits(item: StoredTensor, node: onnx.NodeProto, scale: TensorProto | None,
           zero: TensorProto | None, slot: int, scope: Scope) -> QuantizedWeight:
    op = "MatMulNBits"
    bits = _int_attribute(node, "bits", 4)
    k, n = _int_attribute(node, "K", 0), _int_attribute(node, "N", 0)
    block = _int_attribute(node, "block_size", 0)
    if len(node.input) > 4 and node.input[4]:
        raise Unsupported(op, "act-order weights (g_idx) are not supported")
    if bits not in (2, 4, 8) or k <= 0 or n <= 0 or block <= 0:
        raise Unsupported(op, f"bits={bits}, K={k}, N={n}, block_size={block} are not a "
                              "packing onnxprune reads")
    blocks = -(-k // block)
    expected = (n, blocks, block * bits // 8)
    if tuple(int(d) for d in item.tensor.dims) != expected or \
            item.tensor.data_type != TensorProto.UINT8:
        raise Unsupported(op, f"packed weights of shape {list(item.tensor.dims)}, expected "
                              f"uint8 {list(expected)}")
    if scale is None or math.prod(scale.dims) != n * blocks:
        raise Unsupported(op, "its scales do not hold one value per block")
    if zero is not None and zero.data_type != TensorProto.UINT8:
        raise Unsupported(op, "float zero points put no weight exactly at zero")
    if zero is not None and math.prod(zero.dims) != n * -(-blocks * bits // 8):
        raise Unsupported(op, f"{math.prod(zero.dims)} packed zero points for {n} rows of "
                              f"{blocks} blocks")
    return QuantizedWeight(op=op, stored_type=TensorProto.UINT8, shape=(n, k), scale=scale,
                           zero_point=zero, view=(n, blocks), block_axis=1, block_size=block,
                           bits=bits, default_zero=1 << (bits - 1))
