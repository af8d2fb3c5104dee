"""Tensor values: where a tensor's bytes are, reading them without needless copies, and
storing new values inline.

Inline tensors are viewed in their protobuf; external data is memory-mapped or read piece by
piece.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelLoadError

FLOAT_TYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.BFLOAT16: np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)),
}
# element types stored several to a byte: their byte count does not follow from the shape
# by itemsize, and numpy_helper.to_array(...).tobytes() is not their raw encoding
PACKED_TYPES = {getattr(TensorProto, name) for name in
                 ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, name)}

def iter_all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in the graph: initializers, Constant values, the values and
    indices of sparse tensors, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_all_tensors(sub)


def uses_external_data(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def tensor_numel(tensor: TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes the tensor's values take when stored densely."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return tensor_numel(tensor) * itemsize


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_range(tensor: TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes."""
    info = external_info(tensor)
    length = int(info.get("length", tensor_nbytes(tensor)))
    return base_dir / info["location"], int(info.get("offset", 0)), length


def read_array(tensor: TensorProto, base_dir: Path, writable: bool = False) -> np.ndarray:
    """The tensor's values; a read-only memory map or buffer view unless `writable`.

    A writable array of external data is read into fresh memory, not through a memory map,
    so the process holds one copy of the tensor, not two.
    """
    dtype = FLOAT_TYPES.get(tensor.data_type)
    shape = tuple(tensor.dims)
    if dtype is None:
        array = numpy_helper.to_array(tensor, str(base_dir))
        return array.copy() if writable else array
    if uses_external_data(tensor):
        file, offset, _ = external_range(tensor, base_dir)
        if writable:
            array = np.empty(shape, dtype)
            _read_into(file, offset, array.reshape(-1).view(np.uint8))
            return array
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
    if tensor.HasField("raw_data") or tensor_numel(tensor) == 0:
        array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
    else:
        array = numpy_helper.to_array(tensor)
    return np.array(array, copy=True) if writable else array


def iter_chunks(tensor: TensorProto, base_dir: Path, max_elements: int) -> Iterator[np.ndarray]:
    """The float tensor's values, flat and in order, in read-only pieces of `max_elements`.

    External data is read piece by piece into one buffer that every piece reuses: finish
    with a piece before asking for the next. Inline data is viewed, not copied again.
    """
    max_elements = max(1, int(max_elements))
    dtype = FLOAT_TYPES.get(tensor.data_type)
    numel = tensor_numel(tensor)
    if dtype is None or not uses_external_data(tensor):
        flat = read_array(tensor, base_dir).reshape(-1)
        for start in range(0, numel, max_elements):
            yield flat[start:start + max_elements]
        return
    file, offset, _ = external_range(tensor, base_dir)
    buffer = np.empty(min(numel, max_elements), dtype)
    with open(file, "rb") as fh:
        for start in range(0, numel, max_elements):
            piece = buffer[:min(max_elements, numel - start)]
            fh.seek(offset + start * dtype.itemsize)
            read_exactly(fh, piece.view(np.uint8), file)
            piece.flags.writeable = False
            yield piece
            piece.flags.writeable = True


def _read_into(file: Path, offset: int, out: np.ndarray) -> None:
    with open(file, "rb") as fh:
        fh.seek(offset)
        read_exactly(fh, out, file)


def read_exactly(fh, out: np.ndarray, file: Path) -> None:
    """Fill the uint8 array `out` from the file's current position."""
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        count = fh.readinto(view[done:])
        if not count:
            raise ModelLoadError(f"external data file {file} is truncated")
        done += count


def write_array(tensor: TensorProto, array: np.ndarray) -> None:
    """Store `array` inline as the tensor's raw data (same dtype and shape as before)."""
    check_values(tensor, array)
    for field in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def check_values(tensor: TensorProto, array: np.ndarray) -> None:
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is None:
        raise ValueError(f"{tensor.name}: only float tensors are written, not "
                         f"{TensorProto.DataType.Name(tensor.data_type)}")
    if array.dtype != dtype or tuple(array.shape) != tuple(tensor.dims):
        raise ValueError(f"{tensor.name}: writing {array.dtype}{array.shape} over "
                         f"{dtype}{tuple(tensor.dims)}")


