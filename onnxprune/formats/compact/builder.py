"""The graph builder every compact form writes its rebuild with: named payloads, shared
constants, cached lookup tables, zeros of the weight's type and byte unpacking."""

from __future__ import annotations

import math
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from ...quantized import pack_nibbles
from ..graphs import make_tensor, zero_value
from .base import EncodingPlan, Payload, form_of

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


class TensorBuilder:
    """The nodes and initializers that rebuild one tensor, all named under `prefix`.

    Small constants are shared by content and the byte tables built once, so a chunk
    costs little more than its payload and its own few nodes. `initializers` holds only
    what some node reads: a constant made for a chunk and read by none (the chunk's shape,
    which an N:M rebuild may never need) is left out, so that onnxruntime does not warn
    about it at every load.

    `data_type` is the type the rebuild writes. With `value_bits` 4 (int4/uint4 weights
    rebuilt as int8/uint8) each chunk's values are stored two to a byte, as ONNX packs
    int4, and unpacked by a byte-table lookup and a 16-entry table of the signed or unsigned
    nibble values before the form's rebuild reads them.
    """

    def __init__(self, prefix: str, plan: EncodingPlan, data_type: int, reduction_axis: int | None,
                 opset: int | None = None, value_bits: int = 0):
        self.prefix = prefix
        self.plan = plan
        self.data_type = data_type
        self.reduction_axis = reduction_axis
        self.opset = opset
        self.value_bits = value_bits
        self.nodes: list[onnx.NodeProto] = []
        self._initializers: list[TensorProto] = []
        self.arrays: dict[str, np.ndarray] = {}  # the values of each initializer, by name
        self._constants: dict[tuple, str] = {}
        self._tables: dict[tuple, str] = {}
        self._values = 0

    @property
    def initializers(self) -> list[TensorProto]:
        """The initializers the rebuild nodes read, in the order they were made."""
        read = {name for node in self.nodes for name in node.input}
        return [tensor for tensor in self._initializers if tensor.name in read]

    def payload(self, field_name: str, array: np.ndarray) -> str:
        name = f"{self.prefix}/{field_name}"
        self._initializers.append(make_tensor(name, array))
        self.arrays[name] = array
        return name

    def const(self, array) -> str:
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.payload(f"k{len(self._constants)}", array)
        return self._constants[key]

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        if output is None:
            output = f"{self.prefix}/v{self._values}"
            self._values += 1
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def table(self, key: tuple, make: Callable[[], str]) -> str:
        """The value built once per tensor under `key` (`make()` builds it the first time)."""
        if key not in self._tables:
            self._tables[key] = make()
        return self._tables[key]

    def byte_table(self, part: int, shift: int, plus: int) -> str:
        """[256, 8/part] int32: code t of byte b is ((b >> part*t) & mask) << shift, + plus."""
        return self.table((part, shift, plus), lambda: self._byte_table(part, shift, plus))

    def _byte_table(self, part: int, shift: int, plus: int) -> str:
        per_byte = 8 // part
        table = self.op("Reshape", [self._byte_range(), self.const(np.array([-1, 1],
                                                                             np.int64))])
        if part < 8:
            table = self.op("Div", [table, self.const((1 << (part * np.arange(per_byte)))
                                                      .astype(np.int32))])
            table = self.op("Mod", [table, self.const(np.int32(1 << part))])
        if shift:
            table = self.op("Mul", [table, self.const(np.int32(1 << shift))])
        if plus:
            table = self.op("Add", [table, self.const(np.int32(plus))])
        return table

    def zeros(self, shape: list[int], output: str | None = None) -> str:
        """A zero tensor of the weight's type. ConstantOfShape takes bfloat16 only from
        opset 20 on; before that, bfloat16 zeros are gathered from one stored zero."""
        if self.data_type != TensorProto.BFLOAT16 or (self.opset or 0) >= 20:
            return self.op("ConstantOfShape", [self.const(np.array(shape, np.int64))], output,
                           value=zero_value(self.data_type))
        zero = self.table(("zero",), lambda: self.payload("zero", np.zeros(1, BFLOAT16)))
        # GatherElements wants every index dim but the axis within the data's dims
        index = self.op("ConstantOfShape", [self.const(np.array([math.prod(shape)], np.int64))],
                        value=zero_value(TensorProto.INT32))
        if len(shape) == 1:
            return self.op("GatherElements", [zero, index], output, axis=0)
        flat = self.op("GatherElements", [zero, index], axis=0)
        return self.op("Reshape", [flat, self.const(np.array(shape, np.int64))], output)

    def _byte_range(self) -> str:
        return self.table(("range",), lambda: self.op("Range", [
            self.const(np.int32(0)), self.const(np.int32(256)), self.const(np.int32(1))]))

    def unpack(self, packed: str, table: str, count: int, stored: int) -> str:
        """Look every byte up in `table`, flatten, and cut the padding to `count` codes."""
        codes = self.op("Gather", [table, self.op("Cast", [packed], to=TensorProto.INT32)])
        flat = self.op("Reshape", [codes, self.const(np.array([-1], np.int64))])
        if stored == count:
            return flat
        return self.op("Slice", [flat, self.const(np.array([0], np.int64)),
                                 self.const(np.array([count], np.int64))])

    def chunk(self, number: int, payload: Payload, output: str) -> None:
        """Add the rebuild of one chunk, writing `output` (4-bit values: their shape goes
        to `payload.params["values_shape"]`, for the description)."""
        names = {key: self.payload(f"c{number}/{key}", pack_nibbles(array)
                                   if key == "values" and self.value_bits == 4 else array)
                 for key, array in payload.arrays.items()}
        if self.value_bits == 4 and "values" in names:
            values = payload.arrays["values"]
            payload.params["values_shape"] = list(values.shape)
            names["values"] = self._unpacked_values(names["values"], values.shape)
        shape = self.const(np.array(payload.shape, np.int64))
        # an all-zero chunk is stored as zeros whatever the tensor's plan
        form = form_of("zeros") if payload.kind == "zeros" else self.plan.form
        form.build(self, payload, names, shape, output)

    def _unpacked_values(self, packed: str, shape: tuple[int, ...]) -> str:
        """The 4-bit values of `packed` as the rebuild's type, in `shape`."""
        count = math.prod(shape)
        codes = self.unpack(packed, self.byte_table(4, 0, 0), count, -(-count // 2) * 2)
        nibbles = np.arange(16)
        if self.data_type == TensorProto.INT8:  # two's complement: codes 8..15 are -8..-1
            nibbles = np.where(nibbles < 8, nibbles, nibbles - 16)
        table = self.table(("nibbles",), lambda: self.const(nibbles.astype(
            helper.tensor_dtype_to_np_dtype(self.data_type))))
        values = self.op("Gather", [table, codes])
        if len(shape) == 1:
            return values
        return self.op("Reshape", [values, self.const(np.array(shape, np.int64))])
