"""Loading models and tensors without needless copies, and writing models atomically.

Tensor bytes stay where they are until a target is touched: inline tensors are viewed in
their protobuf, external data is memory-mapped. Saving writes into temporary files beside
the output and renames them into place, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelLoadError, OutputPathError

log = logging.getLogger(__name__)

# protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26
# tensors at least this large go to external data when a model is written that way.
EXTERNAL_THRESHOLD = 1024
EXTERNAL_ALIGNMENT = 64

FLOAT_TYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.BFLOAT16: np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)),
}


@dataclass
class LoadedModel:
    """A model proto plus where it came from (for external data paths)."""

    proto: onnx.ModelProto
    path: Path | None
    base_dir: Path
    uses_external_data: bool


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Parse the model without reading external data; check that its external files exist."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf could not be parsed; "
                             "truncated or not ONNX)") from None
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # onnx raises several types for corrupt files
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_one_line(exc)})") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and proto.ir_version == 0):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph)")
    if proto.ir_version == 0:
        raise ModelLoadError(f"{path}: not a valid ONNX model (ir_version missing)")
    loaded = LoadedModel(proto, path, path.parent, False)
    for tensor in iter_all_tensors(proto.graph):
        if uses_external_data(tensor):
            loaded.uses_external_data = True
            _check_external(tensor, loaded.base_dir)
        else:
            _check_inline(tensor, path)
    return loaded


def model_from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike = ".") -> LoadedModel:
    external = any(uses_external_data(t) for t in iter_all_tensors(proto.graph))
    return LoadedModel(proto, None, Path(base_dir), external)


def iter_all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every dense tensor stored in the graph: initializers, Constant values, subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
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


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _check_external(tensor: TensorProto, base_dir: Path) -> None:
    info = _external_info(tensor)
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"tensor {tensor.name!r}: external data without a location")
    if Path(location).is_absolute() or ".." in Path(location).parts:
        # the same rule as onnx.load: a model may only read data from beside itself
        raise ModelLoadError(f"tensor {tensor.name!r}: external data location {location!r} "
                             "points outside the model's directory")
    file = base_dir / location
    if not file.is_file():
        raise ModelLoadError(f"tensor {tensor.name!r}: external data file {file} is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", tensor_nbytes(tensor)))
    except ValueError:
        raise ModelLoadError(f"tensor {tensor.name!r}: external data offset or length is not "
                             "a number") from None
    if offset + length > file.stat().st_size:
        raise ModelLoadError(f"tensor {tensor.name!r}: external data file {file} is truncated")


def _check_inline(tensor: TensorProto, path: Path) -> None:
    if tensor.HasField("raw_data") and tensor.data_type in FLOAT_TYPES:
        if len(tensor.raw_data) != tensor_nbytes(tensor):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has {len(tensor.raw_data)} bytes "
                                 f"of data for shape {list(tensor.dims)} (truncated or corrupt)")


def read_array(tensor: TensorProto, base_dir: Path, writable: bool = False) -> np.ndarray:
    """The tensor's values; a read-only memory map or buffer view unless `writable`."""
    dtype = FLOAT_TYPES.get(tensor.data_type)
    shape = tuple(tensor.dims)
    if dtype is None:
        array = numpy_helper.to_array(tensor, str(base_dir))
        return array.copy() if writable else array
    if uses_external_data(tensor):
        info = _external_info(tensor)
        array = np.memmap(base_dir / info["location"], dtype=dtype, mode="r",
                          offset=int(info.get("offset", 0)), shape=shape)
    elif tensor.HasField("raw_data") or tensor_numel(tensor) == 0:
        array = np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
    else:
        array = numpy_helper.to_array(tensor)
    return np.array(array, copy=True) if writable else array


def write_array(tensor: TensorProto, array: np.ndarray) -> None:
    """Store `array` inline as the tensor's raw data (same dtype and shape as before)."""
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is None:
        raise ValueError(f"{tensor.name}: only float tensors are written, not "
                         f"{TensorProto.DataType.Name(tensor.data_type)}")
    if array.dtype != dtype or tuple(array.shape) != tuple(tensor.dims):
        raise ValueError(f"{tensor.name}: writing {array.dtype}{array.shape} over "
                         f"{dtype}{tuple(tensor.dims)}")
    for field in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus every external data file it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {_external_info(t).get("location") for t in iter_all_tensors(proto.graph)
                 if uses_external_data(t)}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size
                                     for loc in locations if loc)


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Reject an output that is the input, or whose directory cannot be written."""
    output = Path(output)
    if input_path is not None:
        inp = Path(input_path)
        same = output.resolve() == inp.resolve()
        if not same and output.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(output, inp)
        if same:
            raise OutputPathError(f"output {output} is the input file; choose another path")
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        raise OutputPathError(f"output directory {directory} does not exist")
    if output.is_dir():
        raise OutputPathError(f"output {output} is a directory")
    # access() says yes to root even on read-only mounts: try to create a file instead
    try:
        probe = _temp_path(directory, output.name)
    except OSError as exc:
        raise OutputPathError(f"output directory {directory} is not writable "
                              f"({exc.strerror or exc})") from None
    probe.unlink()
    return output


def save_model(loaded: LoadedModel, output: str | os.PathLike,
               external: bool | None = None) -> Path:
    """Write atomically. External data is used when asked, when the input had it, or > 2 GiB.

    The proto is left as it was: tensors moved to the data file for writing are put back.
    """
    output = Path(output)
    proto = loaded.proto
    total = sum(tensor_nbytes(t) for t in iter_all_tensors(proto.graph))
    if external is None:
        external = loaded.uses_external_data or total > PROTOBUF_LIMIT
    directory = output.parent if str(output.parent) else Path(".")
    data_name = output.name + ".data"
    if external:
        _check_not_own_data(proto, loaded.base_dir, [output, directory / data_name])
    temps: list[Path] = []
    try:
        if external:
            data_tmp = _temp_path(directory, data_name)
            temps.append(data_tmp)
            with _tensors_moved_to_file(proto, loaded.base_dir, data_tmp, data_name):
                model_tmp = _write_proto(proto, directory, output.name)
            temps.append(model_tmp)
            os.replace(data_tmp, directory / data_name)
            # from here the data file is in place: remove it too if the model cannot follow
            temps[0] = directory / data_name
        else:
            if any(uses_external_data(t) for t in iter_all_tensors(proto.graph)):
                raise OutputPathError("model still references external data; save it with "
                                      "external data")
            model_tmp = _write_proto(proto, directory, output.name)
            temps.append(model_tmp)
        os.replace(model_tmp, output)
    except BaseException as exc:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputPathError(f"cannot write {output}: {exc.strerror or exc}") from None
        raise
    return output


def _check_not_own_data(proto: onnx.ModelProto, base_dir: Path, paths: list[Path]) -> None:
    """Refuse to write over an external data file the model itself reads from.

    Renaming the new data file over it would leave the input model (and this proto) pointing
    at bytes laid out for another model.
    """
    sources = set()
    for tensor in iter_all_tensors(proto.graph):
        if uses_external_data(tensor):
            location = _external_info(tensor).get("location")
            if location:
                sources.add((base_dir / location).resolve())
    for path in paths:
        if path.resolve() in sources:
            raise OutputPathError(f"output {path} is an external data file the model reads "
                                  "from; choose another output name or directory")


def _temp_path(directory: Path, name: str) -> Path:
    """A new empty file beside the output, created with the mode a plain open() would give.

    (mkstemp creates files 0600, and a rename would carry that mode onto the output.)
    """
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name in {directory}")


def _write_proto(proto: onnx.ModelProto, directory: Path, name: str) -> Path:
    tmp = _temp_path(directory, name)
    try:
        with open(tmp, "wb") as fh:
            fh.write(proto.SerializeToString())
            fh.flush()
            os.fsync(fh.fileno())
    except ValueError as exc:  # protobuf refuses messages over 2 GiB
        tmp.unlink()
        raise OutputPathError(f"model too large to serialize inline: {exc}") from None
    except BaseException:
        tmp.unlink()
        raise
    return tmp


@contextlib.contextmanager
def _tensors_moved_to_file(proto: onnx.ModelProto, base_dir: Path, data_path: Path,
                           data_name: str):
    """Stream every large tensor's bytes into `data_path` and point the tensor at it.

    On exit, also after an error, each tensor is put back exactly as it was.
    """
    # (tensor, its fields without raw_data, its raw_data or None)
    moved: list[tuple[TensorProto, TensorProto, bytes | None]] = []
    try:
        with open(data_path, "wb") as fh:
            offset = 0
            for tensor in iter_all_tensors(proto.graph):
                if tensor.data_type == TensorProto.STRING:
                    continue
                if tensor_nbytes(tensor) < EXTERNAL_THRESHOLD and not uses_external_data(tensor):
                    continue
                raw = _tensor_bytes(tensor, base_dir)
                # The inline bytes are kept here, not read back from the data file: a write
                # that fails half-way must not lose them. Clearing the field first keeps one
                # copy of each tensor in memory. Registered before anything can fail.
                kept = raw if tensor.HasField("raw_data") else None
                tensor.ClearField("raw_data")
                original = TensorProto()
                original.CopyFrom(tensor)  # cheap now: the bytes are out of it
                moved.append((tensor, original, kept))
                padding = (-offset) % EXTERNAL_ALIGNMENT
                fh.write(b"\0" * padding)
                offset += padding
                fh.write(raw)
                _point_to_external(tensor, data_name, offset, len(raw))
                offset += len(raw)
                del raw, kept
            fh.flush()
            os.fsync(fh.fileno())
        yield
    finally:
        while moved:
            tensor, original, kept = moved.pop()
            tensor.CopyFrom(original)
            if kept is not None:
                tensor.raw_data = kept


def _tensor_bytes(tensor: TensorProto, base_dir: Path):
    """The tensor's little-endian bytes, as a memory map where it is external."""
    if uses_external_data(tensor):
        info = _external_info(tensor)
        length = int(info.get("length", tensor_nbytes(tensor)))
        return np.memmap(base_dir / info["location"], dtype=np.uint8, mode="r",
                         offset=int(info.get("offset", 0)), shape=(length,))
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _point_to_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data",
                  "raw_data", "external_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
