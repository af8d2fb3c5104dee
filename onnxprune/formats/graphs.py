"""Small protobuf-level helpers the storage formats share: tensors, lookups, markers.

Everything works on the protobuf directly (no onnx-graphsurgeon): the formats touch one
tensor at a time and must not copy the rest of the model. Walks over subgraphs come from
`onnxprune.graph` (`walk_graphs` is re-exported here for the formats).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from ..graph import walk_graphs as walk_graphs
from ..quantized import pack_nibbles

# Every node, initializer and value_info a compact tensor adds carries this doc_string
# (the node that produces the tensor carries it followed by the JSON description).
COMPACT_MARK = "onnxprune:compact"
# Names of everything a compact rebuild adds start with this (then c<k>/ or <node>/c<k>/).
REBUILD_PREFIX = "onnxprune/"
# Model metadata key listing the storage formats onnxprune used ("compact", "sparse").
METADATA_KEY = "onnxprune:storage"

# Bit views: a weight is "non-zero" when any bit is set, so -0.0 and NaN payloads survive.
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# keyed by int: TensorProto.data_type is a plain int in the onnx stubs, not a DataType
FLOAT_DATA_TYPES: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    TensorProto.DOUBLE: np.dtype(np.float64),
}
# the stored types of quantized weights that storage writes as they are (whole bytes)
INTEGER_DATA_TYPES: dict[int, np.dtype] = {
    TensorProto.INT8: np.dtype(np.int8), TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16), TensorProto.UINT16: np.dtype(np.uint16),
}
# packed 4-bit quantized weights (their ml_dtypes type, one value per byte in numpy), and the
# whole-byte type a compact form rebuilds them in before one conversion to the packed type
FOUR_BIT_DATA_TYPES: dict[int, np.dtype] = {
    TensorProto.INT4: np.dtype(ml_dtypes.int4), TensorProto.UINT4: np.dtype(ml_dtypes.uint4),
}
REBUILT_AS: dict[int, int] = {TensorProto.INT4: TensorProto.INT8,
                              TensorProto.UINT4: TensorProto.UINT8}
# what compact and sparse forms may hold: float weights and quantized ones (compact only for
# the packed 4-bit types)
STORED_DATA_TYPES: dict[int, np.dtype] = {**FLOAT_DATA_TYPES, **INTEGER_DATA_TYPES,
                                          **FOUR_BIT_DATA_TYPES}
_DATA_TYPE_OF = {dtype: code for code, dtype in {**FLOAT_DATA_TYPES,
                                                  **FOUR_BIT_DATA_TYPES}.items()}


def bits_of(array: np.ndarray) -> np.ndarray:
    """Flat unsigned-integer view of a C-contiguous float array (no copy)."""
    return np.ascontiguousarray(array).reshape(-1).view(_UNSIGNED[array.dtype.itemsize])


def data_type_of(dtype: np.dtype) -> int:
    """ONNX element type of a numpy dtype (bfloat16 through ml_dtypes)."""
    dtype = np.dtype(dtype)
    if dtype in _DATA_TYPE_OF:
        return _DATA_TYPE_OF[dtype]
    return helper.np_dtype_to_tensor_dtype(dtype)


def make_tensor(name: str, array: np.ndarray, doc: str | None = COMPACT_MARK) -> TensorProto:
    """A TensorProto holding `array` as little-endian raw bytes (any dtype, bfloat16 too;
    int4/uint4 packed two to a byte as ONNX stores them). `doc` None sets no doc_string (an
    empty one set is still serialized): densify's tensors, byte for byte as they were."""
    array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-D)
    tensor = TensorProto(name=name, data_type=data_type_of(array.dtype))
    if doc is not None:
        tensor.doc_string = doc
    tensor.dims.extend(array.shape)
    if tensor.data_type in FOUR_BIT_DATA_TYPES:
        tensor.raw_data = pack_nibbles(array.astype(np.int8)).tobytes()
    else:
        tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return tensor


def zero_value(data_type: int) -> TensorProto:
    """The one-element zero of `data_type`, for ConstantOfShape's `value` attribute."""
    itemsize = FLOAT_DATA_TYPES[data_type].itemsize if data_type in FLOAT_DATA_TYPES else \
        np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    tensor = TensorProto(name="zero", data_type=data_type, raw_data=bytes(itemsize))
    tensor.dims.append(1)
    return tensor


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's ai.onnx opset version, or None when it imports none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def initializer_index(graph: onnx.GraphProto, name: str) -> int | None:
    for index, tensor in enumerate(graph.initializer):
        if tensor.name == name:
            return index
    return None


def constant_node_index(graph: onnx.GraphProto, name: str) -> int | None:
    """Index of the Constant node whose `value` tensor defines `name`."""
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") \
                and len(node.output) == 1 and node.output[0] == name \
                and any(a.name == "value" for a in node.attribute):
            return index
    return None


def add_metadata_format(model: onnx.ModelProto | None, fmt: str) -> None:
    """Record in the model metadata that tensors are stored in `fmt`."""
    if model is None:
        return
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            formats = set(filter(None, entry.value.split(",")))
            formats.add(fmt)
            entry.value = ",".join(sorted(formats))
            return
    model.metadata_props.add(key=METADATA_KEY, value=fmt)


def remove_metadata_format(model: onnx.ModelProto) -> None:
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == METADATA_KEY:
            del model.metadata_props[index]
