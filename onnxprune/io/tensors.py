"""Tensor values: where a tensor's bytes are, reading them without needless copies, and
storing new values inline.

Inline tensors are viewed in their protobuf; external data is memory-mapped or read piece by
piece.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelLoadError

# keyed by int: TensorProto.data_type is a plain int in the onnx stubs, not a DataType
FLOAT_TYPES: dict[int, np.dtype] = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.BFLOAT16: np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)),
}
_WRITABLE_INTEGERS: dict[int, np.dtype] = {
    t: np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in (
    TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
    TensorProto.UINT32, TensorProto.INT32, TensorProto.UINT64, TensorProto.INT64)}
# element types stored several to a byte: their byte count does not follow from the shape
# by itemsize, and numpy_helper.to_array(...).tobytes() is not their raw encoding
_PACKED_BITS = {getattr(TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                if hasattr(TensorProto, name)}
PACKED_TYPES = set(_PACKED_BITS)
# types whose packing this module does not know: their sizes are not checked or computed
_UNSIZED_TYPES = {getattr(TensorProto, name) for name in ("FLOAT6E2M3", "FLOAT6E3M2")
                  if hasattr(TensorProto, name)}
# where values live when raw_data is not used, and entries per element (default int32_data)
_TYPED_FIELDS: dict[int, tuple[str, int]] = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.DOUBLE: ("double_data", 1), TensorProto.COMPLEX128: ("double_data", 2),
    TensorProto.INT64: ("int64_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.STRING: ("string_data", 1),
}
_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data")
# the element types sparse indices may have
INDEX_TYPES = frozenset({TensorProto.INT8, TensorProto.INT16, TensorProto.INT32,
                         TensorProto.INT64, TensorProto.UINT8, TensorProto.UINT16,
                         TensorProto.UINT32, TensorProto.UINT64})
# numpy's limit on the product of an array's non-zero dimensions (with room for the itemsize)
_MAX_ELEMENTS = 2**59
# an external offset or length: plain ASCII digits (int() would also take " 12", "+1", "١")
_DIGITS = re.compile(r"[0-9]{1,19}")
# model files read by load_model (absolute, not resolved): a lazy load's references point
# into them
_model_files: set[str] = set()


def iter_all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every tensor stored in the graph: initializers, the values and indices of sparse
    tensors, and the tensors of node attributes (Constant values, TENSORS attributes, those
    of subgraphs), found by the fields present, whatever type an attribute claims."""
    yield from _flatten(_stored(graph.initializer, graph.sparse_initializer, graph.node))


def iter_model_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of the model: those of its graph and of its local functions' bodies."""
    yield from iter_all_tensors(model.graph)
    for function in model.functions:
        yield from _flatten(_stored((), (), function.node))


def iter_model_sparse_tensors(model: onnx.ModelProto) -> Iterator[onnx.SparseTensorProto]:
    """Every sparse tensor of the model (graphs, subgraphs, function bodies)."""
    graph = model.graph
    items = [_stored((), graph.sparse_initializer, graph.node),
             *(_stored((), (), function.node) for function in model.functions)]
    for stored in items:
        yield from (item for item in stored if isinstance(item, onnx.SparseTensorProto))


def _flatten(items: Iterator[TensorProto | onnx.SparseTensorProto]) -> Iterator[TensorProto]:
    for item in items:
        if isinstance(item, TensorProto):
            yield item
        else:
            yield from (item.values, item.indices)


def _stored(initializers, sparse_initializers, nodes
            ) -> Iterator[TensorProto | onnx.SparseTensorProto]:
    """Tensors and sparse tensors, those of subgraphs included, in a fixed order."""
    yield from initializers
    yield from sparse_initializers
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor
            yield from attr.sparse_tensors
            graphs = [attr.g] if attr.HasField("g") else []
            for sub in [*graphs, *attr.graphs]:
                yield from _stored(sub.initializer, sub.sparse_initializer, sub.node)


def uses_external_data(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def tensor_label(tensor: TensorProto) -> str:
    """How errors name a tensor (long names cut short)."""
    name = tensor.name if isinstance(tensor.name, str) else tensor.name.decode("utf-8", "replace")
    return f"tensor {_short(name)!r}" if name else "an unnamed tensor"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _type_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def element_dtype(tensor: TensorProto, label: str | None = None) -> np.dtype:
    """The numpy dtype of the tensor's elements; an unknown or missing data type is an error
    (naming the tensor as `label` says, or by its name)."""
    label = label or tensor_label(tensor)
    data_type = tensor.data_type
    if data_type == TensorProto.UNDEFINED:
        raise ModelLoadError(f"{label} has no data type (0, UNDEFINED)")
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{label} has an unknown data type "
                             f"({data_type})") from exc


def tensor_numel(tensor: TensorProto, label: str | None = None) -> int:
    """The element count its shape gives; a negative or absurdly large shape is an error."""
    label = label or tensor_label(tensor)
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"{label} has a negative dimension in its shape "
                             f"{_short(str(dims))}")
    # numpy cannot make an array whose non-zero dims multiply past its index range
    if math.prod(d for d in dims if d) >= _MAX_ELEMENTS:
        raise ModelLoadError(f"{label} has an impossibly large shape "
                             f"{_short(str(dims))}")
    return math.prod(dims)


def expected_nbytes(data_type: int, numel: int) -> int | None:
    """Bytes of `numel` elements of the type in raw_data; None where the type has no fixed
    size (strings) or is not known."""
    bits = _PACKED_BITS.get(data_type)
    if bits is not None:
        return (numel * bits + 7) // 8
    if data_type in (TensorProto.UNDEFINED, TensorProto.STRING) or data_type in _UNSIZED_TYPES:
        return None
    try:
        return numel * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes the tensor's values take when stored densely."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    element_dtype(tensor)
    nbytes = expected_nbytes(tensor.data_type, tensor_numel(tensor))
    if nbytes is None:
        raise ModelLoadError(f"{tensor_label(tensor)}: type {_type_name(tensor.data_type)} "
                             "is not supported")
    return nbytes


def external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def check_tensor(tensor: TensorProto, base_dir: Path | None = None,
                 check_raw: bool = True, label: str | None = None) -> None:
    """Refuse a tensor whose values cannot be read as its type and shape say.

    Data type known, shape sane, and exactly as many values as the shape needs: in raw_data
    (unless not `check_raw`: reading raw_data copies it), in the typed field of its type, or
    in a range of an external file inside the model's folder (`external_range`, when
    `base_dir` is given).
    """
    label = label or tensor_label(tensor)
    element_dtype(tensor, label)
    numel = tensor_numel(tensor, label)
    if uses_external_data(tensor):
        if base_dir is not None:
            external_range(tensor, base_dir, label)
        return
    if tensor.HasField("raw_data"):
        if check_raw or tensor.data_type == TensorProto.STRING:
            _check_raw_length(tensor, len(tensor.raw_data), numel, label)
        return
    field, per_element = _typed_field(tensor.data_type)
    count = len(getattr(tensor, field))
    if per_element is not None and count != numel * per_element:
        if numel and not count and not _any_typed_data(tensor):
            raise ModelLoadError(f"{label} has no data (its shape "
                                 f"{_short(str(list(tensor.dims)))} needs {numel} values)")
        raise ModelLoadError(f"{label} has {count} values in {field} for shape "
                             f"{_short(str(list(tensor.dims)))} ({numel * per_element} needed)")


def _check_raw_length(tensor: TensorProto, length: int, numel: int, label: str) -> None:
    expected = expected_nbytes(tensor.data_type, numel)
    if tensor.data_type == TensorProto.STRING:
        raise ModelLoadError(f"{label}: a STRING tensor cannot hold raw_data")
    if expected is not None and length != expected:
        raise ModelLoadError(f"{label} has {length} bytes of data for shape "
                             f"{_short(str(list(tensor.dims)))} ({expected} needed; truncated "
                             "or corrupt)")


def _typed_field(data_type: int) -> tuple[str, int | None]:
    """The repeated field that holds values of the type when raw_data is not used, and how
    many entries each element takes (None: not checked)."""
    field = _TYPED_FIELDS.get(data_type)
    if field is not None:
        return field
    return "int32_data", None if data_type in _PACKED_BITS or data_type in _UNSIZED_TYPES else 1


def _any_typed_data(tensor: TensorProto) -> bool:
    return any(len(getattr(tensor, name)) for name in _VALUE_FIELDS)


def external_range(tensor: TensorProto, base_dir: Path, label: str | None = None
                   ) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes, checked before any read.

    The file must resolve, symbolic links followed, inside the model's folder `base_dir`
    (or be the model file `load_model` read there: a lazy load's references); offset and length
    must be plain non-negative integers, the length what the shape needs, the range inside
    the file.
    """
    label = label or tensor_label(tensor)
    info = external_info(tensor)
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"{label}: external data without a location")
    if not isinstance(location, str):
        raise ModelLoadError(f"{label}: external data location is not valid UTF-8")
    shown = _short(location)
    if "\0" in location:
        raise ModelLoadError(f"{label}: external data location {shown!r} is not a file name")
    if Path(location).is_absolute() or ".." in Path(location).parts:
        # the same rule as onnx.load: a model may only read data from beside itself
        raise ModelLoadError(f"{label}: external data location {shown!r} points outside the "
                             "model's directory")
    file = Path(base_dir) / location
    real = os.path.realpath(file)
    folder = os.path.realpath(base_dir)
    if not (real.startswith(folder.rstrip(os.sep) + os.sep)
            or os.path.abspath(file) in _model_files):
        raise ModelLoadError(f"{label}: external data location {shown!r} leads outside the "
                             f"model's directory (a symbolic link to {_short(real)})")
    try:
        status = os.stat(real)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{label}: external data file {_short(str(file))} is "
                             "missing") from exc
    except OSError as exc:
        raise ModelLoadError(f"{label}: external data file {_short(str(file))} cannot be read "
                             f"({exc.strerror or exc})") from exc
    if not stat.S_ISREG(status.st_mode):
        raise ModelLoadError(f"{label}: external data {_short(str(file))} is not a regular file")
    numel = tensor_numel(tensor, label)
    element_dtype(tensor, label)
    needed = expected_nbytes(tensor.data_type, numel)
    if needed is None:
        raise ModelLoadError(f"{label}: {_type_name(tensor.data_type)} values cannot be "
                             "external data")
    offset = _byte_count(info, "offset", 0, label)
    length = _byte_count(info, "length", needed, label)
    if length != needed:
        raise ModelLoadError(f"{label}: external data length {length} does not match its shape "
                             f"{_short(str(list(tensor.dims)))} of "
                             f"{_type_name(tensor.data_type)} ({needed} bytes)")
    if offset + length > status.st_size:
        raise ModelLoadError(f"{label}: external data file {_short(str(file))} is truncated "
                             f"(bytes {offset}..{offset + length} asked, "
                             f"{status.st_size} present)")
    return file, offset, length


def _byte_count(info: dict[str, str], key: str, default: int, label: str) -> int:
    text = info.get(key)
    if text is None:
        return default
    if not isinstance(text, str) or not _DIGITS.fullmatch(text):
        raise ModelLoadError(f"{label}: external data {key} {_short(str(text), 40)!r} is not a "
                             "non-negative integer")
    return int(text)


def note_model_file(path: Path) -> None:
    """Allow external references to this model file by its own name, even where the file
    is a link to elsewhere: a lazy load's references point into it."""
    _model_files.add(os.path.abspath(path))


def read_array(tensor: TensorProto, base_dir: Path, writable: bool = False,
               label: str | None = None) -> np.ndarray:
    """The tensor's values; a read-only memory map or buffer view unless `writable`.

    A writable array of external data is read into fresh memory, not through a memory map,
    so the process holds one copy of the tensor, not two. A tensor whose data does not
    match its type and shape, or whose external data lies outside the model's folder, is a
    ModelLoadError.
    """
    label = label or tensor_label(tensor)
    check_tensor(tensor, None, check_raw=False, label=label)
    dtype = FLOAT_TYPES.get(tensor.data_type)
    shape = tuple(tensor.dims)
    if uses_external_data(tensor):
        file, offset, length = external_range(tensor, base_dir, label)
        if dtype is None:  # small, not pruned: read the bytes, decode them as onnx does
            raw = np.empty(length, np.uint8)
            _read_into(file, offset, raw)
            return _decode(tensor, label, raw.tobytes())
        if writable or length == 0:
            array = np.empty(shape, dtype)
            _read_into(file, offset, array.reshape(-1).view(np.uint8))
            return array
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
    if dtype is None:
        if tensor.HasField("raw_data"):
            _check_raw_length(tensor, len(tensor.raw_data), tensor_numel(tensor, label), label)
        array = _decode(tensor, label)
        return array.copy() if writable else array
    if tensor.HasField("raw_data") or tensor_numel(tensor, label) == 0:
        data = tensor.raw_data
        _check_raw_length(tensor, len(data), tensor_numel(tensor, label), label)
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
    else:
        array = _decode(tensor, label)
    return np.array(array, copy=True) if writable else array


def _decode(tensor: TensorProto, label: str, raw: bytes | None = None) -> np.ndarray:
    """numpy_helper.to_array of an inline tensor (or of `raw` as its raw_data), its errors
    reported as the tensor's."""
    if raw is not None:
        inline = TensorProto()
        inline.CopyFrom(tensor)
        inline.ClearField("external_data")
        inline.ClearField("data_location")
        inline.raw_data = raw
        tensor = inline
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelLoadError(f"{label}: values cannot be read "
                             f"({_short(lines[0], 120)})") from exc


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
    # out.data is memoryview(out); numpy's stubs declare ndarray a Buffer only for 3.12+
    view = out.data.cast("B")
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
    # floats (weights), the byte-sized integers of compact forms and quantized weights, and
    # packed 4-bit weights given as their raw bytes
    bits = _PACKED_BITS.get(tensor.data_type)
    if bits is not None:
        size = expected_nbytes(tensor.data_type, tensor_numel(tensor))
        if array.dtype != np.uint8 or array.ndim != 1 or array.size != size:
            raise ValueError(f"{tensor.name}: writing {array.dtype}{array.shape} over "
                             f"{size} packed bytes")
        return
    dtype = FLOAT_TYPES.get(tensor.data_type) or _WRITABLE_INTEGERS.get(tensor.data_type)
    if dtype is None:
        raise ValueError(f"{tensor.name}: only float and whole-byte integer tensors are "
                         f"written, not {TensorProto.DataType.Name(tensor.data_type)}")
    if array.dtype != dtype or tuple(array.shape) != tuple(tensor.dims):
        raise ValueError(f"{tensor.name}: writing {array.dtype}{array.shape} over "
                         f"{dtype}{tuple(tensor.dims)}")


