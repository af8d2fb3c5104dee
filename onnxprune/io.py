"""Loading models and tensors without needless copies, and writing models atomically.

Tensor bytes stay where they are until a target is touched: inline tensors are viewed in
their protobuf, external data is memory-mapped. A *lazy* load goes further and never parses
the large inline tensors at all: a scan of the file's wire format finds them, and the proto
gets external-data references into the model file itself instead, so an inline model is
read exactly like one with external data (see `load_model`).

Writing never serializes the whole model at once and never modifies the proto: the
`ModelWriter` assembles the output from serialized pieces, streaming every large tensor's
bytes from where they are (new values given with `put`, the input's files, or the proto)
into files beside the output, which are renamed into place at the end. A failed run leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from collections.abc import Callable, Iterator
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
# a lazy load leaves inline tensors of at least this many bytes in the file
LAZY_MIN_BYTES = 1024
# inline tensors at least this large are written from the proto one at a time, not as part
# of one serialized model (which would hold a second copy of every tensor at once)
SPLIT_MIN_BYTES = 1 << 20
# bytes per read when tensor data is copied or read piece by piece
COPY_CHUNK_BYTES = 16 << 20

FLOAT_TYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.BFLOAT16: np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)),
}
_WRITABLE_INTEGERS = {t: np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in (
    TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
    TensorProto.UINT32, TensorProto.INT32, TensorProto.UINT64, TensorProto.INT64)}
# element types stored several to a byte: their byte count does not follow from the shape
# by itemsize, and numpy_helper.to_array(...).tobytes() is not their raw encoding
_PACKED_TYPES = {getattr(TensorProto, name) for name in
                 ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, name)}
# the fields of a TensorProto that hold (or point to) its values
_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "string_data", "int64_data",
                          "double_data", "uint64_data", "external_data", "data_location"})
_RAW_DATA_FIELD = 9


@dataclass
class LoadedModel:
    """A model proto plus where it came from (for external data paths).

    `uses_external_data` says whether the model file has external data of its own (the
    references a lazy load makes into the model file itself do not count).
    """

    proto: onnx.ModelProto
    path: Path | None
    base_dir: Path
    uses_external_data: bool
    lazy: bool = False


def load_model(path: str | os.PathLike, lazy: bool = False) -> LoadedModel:
    """Parse the model without reading external data; check that its external files exist.

    With `lazy`, inline tensors of `LAZY_MIN_BYTES` or more are not parsed either: they
    become external-data references (location: the model file's own name, offset and length
    of their bytes in it), read on demand like any external data. Such a proto is for this
    process only; `ModelWriter` writes them back inline (or to the output's data file).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    try:
        if lazy:
            proto = _parse_lazily(path)
        else:
            proto = onnx.load(str(path), load_external_data=False)
            _scan_file(path)  # checks inline tensor sizes without copying them
    except ModelLoadError:
        raise
    except (DecodeError, _WireError):
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
    loaded = LoadedModel(proto, path, path.parent, False, lazy)
    file_sizes: dict[str, int] = {}
    for tensor in iter_all_tensors(proto.graph):
        if uses_external_data(tensor):
            location = _check_external(tensor, loaded.base_dir, file_sizes)
            if not (lazy and location == path.name):
                loaded.uses_external_data = True
    return loaded


def model_from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike = ".") -> LoadedModel:
    external = any(uses_external_data(t) for t in iter_all_tensors(proto.graph))
    return LoadedModel(proto, None, Path(base_dir), external)


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


def _external_range(tensor: TensorProto, base_dir: Path) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor's bytes."""
    info = external_info(tensor)
    length = int(info.get("length", tensor_nbytes(tensor)))
    return base_dir / info["location"], int(info.get("offset", 0)), length


def _check_external(tensor: TensorProto, base_dir: Path, file_sizes: dict[str, int]) -> str:
    """Check the tensor's external reference; returns its location."""
    info = external_info(tensor)
    location = info.get("location")
    if not location:
        raise ModelLoadError(f"tensor {tensor.name!r}: external data without a location")
    if Path(location).is_absolute() or ".." in Path(location).parts:
        # the same rule as onnx.load: a model may only read data from beside itself
        raise ModelLoadError(f"tensor {tensor.name!r}: external data location {location!r} "
                             "points outside the model's directory")
    file = base_dir / location
    if location not in file_sizes:
        if not file.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r}: external data file {file} is missing")
        file_sizes[location] = file.stat().st_size
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", tensor_nbytes(tensor)))
    except ValueError:
        raise ModelLoadError(f"tensor {tensor.name!r}: external data offset or length is not "
                             "a number") from None
    if offset + length > file_sizes[location]:
        raise ModelLoadError(f"tensor {tensor.name!r}: external data file {file} is truncated")
    return location


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
        file, offset, _ = _external_range(tensor, base_dir)
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
    file, offset, _ = _external_range(tensor, base_dir)
    buffer = np.empty(min(numel, max_elements), dtype)
    with open(file, "rb") as fh:
        for start in range(0, numel, max_elements):
            piece = buffer[:min(max_elements, numel - start)]
            fh.seek(offset + start * dtype.itemsize)
            _read_exactly(fh, piece.view(np.uint8), file)
            piece.flags.writeable = False
            yield piece
            piece.flags.writeable = True


def _read_into(file: Path, offset: int, out: np.ndarray) -> None:
    with open(file, "rb") as fh:
        fh.seek(offset)
        _read_exactly(fh, out, file)


def _read_exactly(fh, out: np.ndarray, file: Path) -> None:
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
    _check_values(tensor, array)
    for field in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.ClearField("external_data")
    tensor.ClearField("data_location")
    tensor.raw_data = np.ascontiguousarray(array).tobytes()


def _check_values(tensor: TensorProto, array: np.ndarray) -> None:
    # floats (weights) and the byte-sized integers of compact forms
    dtype = FLOAT_TYPES.get(tensor.data_type) or _WRITABLE_INTEGERS.get(tensor.data_type)
    if dtype is None:
        raise ValueError(f"{tensor.name}: only float and whole-byte integer tensors are "
                         f"written, not {TensorProto.DataType.Name(tensor.data_type)}")
    if array.dtype != dtype or tuple(array.shape) != tuple(tensor.dims):
        raise ValueError(f"{tensor.name}: writing {array.dtype}{array.shape} over "
                         f"{dtype}{tuple(tensor.dims)}")


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus every external data file it references.

    Found by scanning the file's wire format: the tensors are not parsed.
    """
    path = Path(path)
    try:
        locations = _scan_file(path).external_locations
    except _WireError:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf could not be parsed; "
                             "truncated or not ONNX)") from None
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
               external: bool | None = None, durable: bool = False) -> Path:
    """Write atomically. External data is used when asked, when the input had it, or > 2 GiB.

    The proto is not modified; tensor data is streamed, never serialized all at once. With
    `durable` the files are fsynced before they are renamed into place (see `ModelWriter`).
    """
    with ModelWriter(loaded, output, external, durable) as writer:
        return writer.commit()


# --- writing -------------------------------------------------------------------------------

class ModelWriter:
    """Writes `loaded` to `output` atomically, streaming tensor data from where it is.

    `put(tensor, values)` gives one tensor new values without touching the proto, and writes
    them at once where they will stay: appended to the output's data file (external data),
    or at their final place in the model file when the model was loaded lazily (the layout
    of the output follows from the proto, and new values have the old size). Otherwise they
    are kept until `commit`. Writing as the values come lets the disk work while the next
    tensor is computed, and keeps memory at one tensor for a model of any size.

    `commit` writes every other tensor, copied from the proto or the files it references,
    and the rest of the model, and renames the files into place. Leaving the `with` block
    without a commit (an error) removes the temporary files. Renaming makes the output
    atomic for readers and for a failed run; `durable` also fsyncs the files before the
    rename, so that a power loss cannot leave a renamed but unwritten file (slower: the
    run then waits for the disk, ~0.5 s per 400 MB here).

    Layout of the data file: tensors given with `put` in that order, then the others in
    `iter_all_tensors` order, each at a multiple of `EXTERNAL_ALIGNMENT`.
    """

    def __init__(self, loaded: LoadedModel, output: str | os.PathLike,
                 external: bool | None = None, durable: bool = False):
        self.loaded = loaded
        self.durable = durable
        self.output = Path(output)
        self.directory = self.output.parent if str(self.output.parent) else Path(".")
        graph = loaded.proto.graph
        if external is None:
            total = sum(tensor_nbytes(t) for t in iter_all_tensors(graph))
            external = loaded.uses_external_data or total > PROTOBUF_LIMIT
        self.external = external
        self.data_name = self.output.name + ".data"
        # id(tensor) -> (tensor, its new bytes: _Placed in the data file, a _WrittenSlot in
        # the model file, or a payload kept for commit). Tensors are kept: ids hold while
        # the objects live.
        self._pending: dict[int, tuple[TensorProto, _Placed | _Payload]] = {}
        # id(tensor) -> (tensor, offset, length) of its raw bytes in the inline output
        self._slots: dict[int, tuple[TensorProto, int, int]] = {}
        self._temps: list[Path] = []
        self._data = None  # the data file being appended to (external)
        self._data_offset = 0
        self._model = None  # the model file being filled in place (inline, lazy input)
        self._done = False
        own = [self.output, self.directory / self.data_name] if external else [self.output]
        _check_not_own_data(loaded.proto, loaded.base_dir, own)
        try:
            if external:
                self._data = self._open_temp(self.data_name, "wb")
            elif loaded.lazy:
                self._slots = self._layout()
                self._model = self._open_temp(self.output.name, "r+b")
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._done:
            self.abort()

    def put(self, tensor: TensorProto, values: np.ndarray) -> None:
        """The tensor's new values (its dtype and shape). Keep `values` unchanged after."""
        self._check_open()
        _check_values(tensor, values)
        values = np.ascontiguousarray(values)
        payload = _ArrayPayload(values)
        slot = self._slots.get(id(tensor))
        try:
            if self.external and values.nbytes >= EXTERNAL_THRESHOLD:
                where = self._append(payload)
            elif slot is not None and slot[2] == values.nbytes:
                _, offset, length = slot
                self._model.seek(offset)
                payload.write_to(self._model)
                _start_writeback(self._model, offset, length)
                where = _WrittenSlot(offset, length)
            else:
                where = payload
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None
        self._pending[id(tensor)] = (tensor, where)

    def commit(self) -> Path:
        """Write everything not yet written and rename the files into place."""
        self._check_open()
        try:
            plan = self._plan()
            if self.external:  # copy the other tensors' bytes to the data file
                plan = {key: (tensor, self._append(where) if key not in self._pending
                              else where) for key, (tensor, where) in plan.items()}
            pieces = _Serializer(plan).model(self.loaded.proto)
            size = _size(pieces)
            if not self.external and size >= 2**31:
                raise OutputPathError(f"model too large to serialize inline ({size:,} bytes); "
                                      "save it with external data")
            if self._data is not None:
                self._data.flush()
                self._sync(self._data)
                self._data.close()
                self._data = None
            model_tmp = self._write_model(plan, pieces)
            if self.external:
                os.replace(self._temps[0], self.directory / self.data_name)
                # from here the data file is in place: remove it too if the model cannot follow
                self._temps[0] = self.directory / self.data_name
            os.replace(model_tmp, self.output)
            self._temps.remove(model_tmp)
            if self.external:
                self._temps.remove(self.directory / self.data_name)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise self._error(exc) from None
            raise
        self.abort()  # nothing left but a model file superseded by a rewrite, if any
        return self.output

    def abort(self) -> None:
        """Remove every file written so far (that has not been renamed into place)."""
        for handle in (self._data, self._model):
            if handle is not None:
                with contextlib.suppress(OSError):
                    handle.close()
        self._data = self._model = None
        while self._temps:
            with contextlib.suppress(OSError):
                self._temps.pop().unlink()
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"the writer of {self.output} has already committed or aborted")

    def _open_temp(self, name: str, mode: str):
        tmp = _temp_path(self.directory, name)
        self._temps.append(tmp)
        return open(tmp, mode)  # noqa: SIM115 (closed in commit / abort)

    def _error(self, exc: OSError) -> OutputPathError:
        return OutputPathError(f"cannot write {self.output}: {exc.strerror or exc}")

    def _write_model(self, plan: dict, pieces: list) -> Path:
        """Write the model file; returns its temporary path."""
        written = [where for _, where in plan.values() if isinstance(where, _WrittenSlot)]
        if self._model is not None:
            offsets = _payload_offsets(pieces)
            model_tmp = self._temps[-1]
            if all(offsets[id(where)] == where.offset for where in written):
                fh, self._model = self._model, None
                with fh:
                    fh.seek(0)
                    _emit(fh, pieces)  # steps over the values already in place
                    fh.truncate()
                    fh.flush()
                    self._sync(fh)
                return model_tmp
            # the graph changed since the layout was made: write the model anew, taking the
            # values already written from the first file (removed at the end)
            self._model.close()
            self._model = None
            plan = {key: (tensor, _FilePayload(model_tmp, where.offset, where.length)
                          if isinstance(where, _WrittenSlot) else where)
                    for key, (tensor, where) in plan.items()}
            pieces = _Serializer(plan).model(self.loaded.proto)
            _size(pieces)
        with self._open_temp(self.output.name, "wb") as fh:
            _emit(fh, pieces)
            fh.flush()
            self._sync(fh)
        return self._temps[-1]

    def _sync(self, fh) -> None:
        if self.durable:
            os.fsync(fh.fileno())

    def _append(self, payload: _Payload) -> _Placed:
        """Write the payload at the next aligned offset of the data file."""
        padding = (-self._data_offset) % EXTERNAL_ALIGNMENT
        if padding:
            self._data.write(b"\0" * padding)
            self._data_offset += padding
        offset = self._data_offset
        length = payload.write_to(self._data)
        self._data_offset += length
        _start_writeback(self._data, offset, length)
        return _Placed(self.data_name, offset, length)

    def _plan(self) -> dict[int, tuple[TensorProto, _Placed | _Payload]]:
        """Each tensor whose bytes are not serialized with the proto, by id, with where its
        bytes are: given with `put`, or where they are now (a file, the proto)."""
        plan: dict[int, tuple[TensorProto, _Placed | _Payload]] = {}
        base_dir = self.loaded.base_dir
        for tensor in iter_all_tensors(self.loaded.proto.graph):
            key = id(tensor)
            if key in plan:
                continue
            pending = self._pending.get(key)
            if pending is not None:
                plan[key] = pending
                continue
            payload = _untouched_payload(tensor, base_dir, self.external)
            if payload is not None:
                plan[key] = (tensor, payload)
        missing = [t.name for key, (t, _) in self._pending.items() if key not in plan]
        if missing:
            raise ValueError(f"put() was given tensors that are not in the model: {missing}")
        return plan

    def _layout(self) -> dict[int, tuple[TensorProto, int, int]]:
        """Where each tensor's raw bytes will lie in the inline output, as the proto is now."""
        plan = self._plan()
        pieces = _Serializer(plan).model(self.loaded.proto)
        _size(pieces)
        offsets = _payload_offsets(pieces)
        return {key: (tensor, offsets[id(where)], where.length)
                for key, (tensor, where) in plan.items() if id(where) in offsets}


def _start_writeback(fh, offset: int, length: int) -> None:
    """Have the kernel start writing these bytes to disk now, while the next tensor is
    computed, rather than at a final fsync or whenever the page cache fills.

    (POSIX_FADV_DONTNEED starts writeback of dirty pages in the range without waiting, and
    drops them from the page cache once clean: the output is not read again.)
    """
    if length < SPLIT_MIN_BYTES or not hasattr(os, "posix_fadvise"):
        return
    fh.flush()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.posix_fadvise(fh.fileno(), offset, length, os.POSIX_FADV_DONTNEED)


@dataclass(frozen=True)
class _Placed:
    """Bytes already written to the output's data file."""

    location: str
    offset: int
    length: int


class _Payload:
    """Bytes of one tensor to be written somewhere; `length` is known before writing."""

    length: int

    def write_to(self, fh) -> int:
        raise NotImplementedError


class _ArrayPayload(_Payload):
    def __init__(self, array: np.ndarray):
        self.array = array
        self.length = array.nbytes

    def write_to(self, fh) -> int:
        if self.length:
            fh.write(memoryview(self.array.reshape(-1).view(np.uint8)))
        return self.length


class _WrittenSlot(_Payload):
    """Bytes already written at their place in the model file: emitting steps over them."""

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length

    def write_to(self, fh) -> int:
        fh.seek(self.length, os.SEEK_CUR)
        return self.length


class _FilePayload(_Payload):
    """A byte range of a file: the input's external data (or the model file, after a lazy
    load). Copied in pieces through one buffer."""

    def __init__(self, file: Path, offset: int, length: int):
        self.file, self.offset, self.length = file, offset, length

    def write_to(self, fh) -> int:
        buffer = np.empty(min(self.length, COPY_CHUNK_BYTES), np.uint8)
        with open(self.file, "rb") as source:
            source.seek(self.offset)
            for start in range(0, self.length, COPY_CHUNK_BYTES):
                piece = buffer[:min(COPY_CHUNK_BYTES, self.length - start)]
                _read_exactly(source, piece, self.file)
                fh.write(memoryview(piece))
        return self.length


class _ProtoRawPayload(_Payload):
    """A tensor's raw_data in the proto, fetched (one tensor's copy) only while written."""

    def __init__(self, tensor: TensorProto, length: int):
        self.tensor, self.length = tensor, length

    def write_to(self, fh) -> int:
        raw = self.tensor.raw_data
        if len(raw) != self.length:
            raise ModelLoadError(f"tensor {self.tensor.name!r} has {len(raw)} bytes of data for "
                                 f"shape {list(self.tensor.dims)} (truncated or corrupt)")
        fh.write(raw)
        return self.length


class _TypedDataPayload(_Payload):
    """Values held in float_data / int32_data / ... written as raw little-endian bytes."""

    def __init__(self, tensor: TensorProto):
        self.tensor = tensor
        self.length = tensor_nbytes(tensor)

    def write_to(self, fh) -> int:
        data = np.ascontiguousarray(numpy_helper.to_array(self.tensor)).tobytes()
        fh.write(data)
        return len(data)


def _untouched_payload(tensor: TensorProto, base_dir: Path, external: bool) -> _Payload | None:
    """Where an unchanged tensor's bytes come from, if they are to be moved or streamed."""
    if tensor.data_type == TensorProto.STRING:
        return None
    if uses_external_data(tensor):
        file, offset, length = _external_range(tensor, base_dir)
        return _FilePayload(file, offset, length)
    if tensor.data_type in _PACKED_TYPES:
        return None
    nbytes = tensor_nbytes(tensor)
    if tensor.HasField("raw_data"):
        if nbytes >= (EXTERNAL_THRESHOLD if external else SPLIT_MIN_BYTES):
            return _ProtoRawPayload(tensor, nbytes)
        return None
    if external and nbytes >= EXTERNAL_THRESHOLD and tensor_numel(tensor) > 0:
        return _TypedDataPayload(tensor)
    return None


# Serialized output is a tree of pieces: bytes, _Nested submessages and payloads. Fields are
# emitted in field-number order, as protobuf serializes them, so an unchanged model comes
# out byte for byte as `SerializeToString` would write it.

@dataclass
class _Nested:
    """A length-delimited field whose content is itself a list of pieces."""

    number: int
    parts: list


def _is_repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)
    return flag if flag is not None else fd.label == fd.LABEL_REPEATED


def _copy_field(source, target, fd) -> None:
    value = getattr(source, fd.name)
    if _is_repeated(fd):
        getattr(target, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(target, fd.name).CopyFrom(value)
    else:
        setattr(target, fd.name, value)


def _has_field(message, fd) -> bool:
    return len(getattr(message, fd.name)) > 0 if _is_repeated(fd) else message.HasField(fd.name)


class _Serializer:
    """Turns a proto into pieces, splitting only the messages on the way to a planned tensor.

    Fields of a split message other than the ones walked into are serialized one by one
    from a partial copy (unknown fields of split messages are not kept).
    """

    def __init__(self, plan: dict[int, tuple[TensorProto, _Placed | _Payload]]):
        self.plan = plan

    def model(self, model: onnx.ModelProto) -> list:
        return self._split(model, {"graph": self._graph}) or [model.SerializeToString()]

    def _graph(self, graph: onnx.GraphProto) -> list | None:
        return self._split(graph, {"node": self._node, "initializer": self._tensor,
                                   "sparse_initializer": self._sparse})

    def _sparse(self, sparse: onnx.SparseTensorProto) -> list | None:
        return self._split(sparse, {"values": self._tensor, "indices": self._tensor})

    def _node(self, node: onnx.NodeProto) -> list | None:
        return self._split(node, {"attribute": self._attribute})

    def _attribute(self, attr: onnx.AttributeProto) -> list | None:
        if attr.type == onnx.AttributeProto.TENSOR:
            return self._split(attr, {"t": self._tensor})
        if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            return self._split(attr, {"sparse_tensor": self._sparse})
        if attr.type == onnx.AttributeProto.GRAPH:
            return self._split(attr, {"g": self._graph})
        if attr.type == onnx.AttributeProto.GRAPHS:
            return self._split(attr, {"graphs": self._graph})
        return None

    def _split(self, message, walk: dict[str, Callable]) -> list | None:
        children: dict[str, list] = {}
        split = False
        for name, piece_of in walk.items():
            fd = message.DESCRIPTOR.fields_by_name[name]
            if _is_repeated(fd):
                values = list(getattr(message, name))
            else:
                values = [getattr(message, name)] if message.HasField(name) else []
            children[name] = [(value, piece_of(value)) for value in values]
            split = split or any(piece is not None for _, piece in children[name])
        if not split:
            return None
        parts: list = []
        for fd, _ in message.ListFields():
            if fd.name in children:
                for value, piece in children[fd.name]:
                    parts.append(_Nested(fd.number, piece if piece is not None
                                         else [value.SerializeToString()]))
            else:
                partial = type(message)()
                _copy_field(message, partial, fd)
                parts.append(partial.SerializeToString())
        return parts

    def _tensor(self, tensor: TensorProto) -> list | None:
        planned = self.plan.get(id(tensor))
        if planned is None:
            return None
        where = planned[1]
        # the tensor without its values, in two halves around raw_data's field number
        before, after = TensorProto(), TensorProto()
        for fd in TensorProto.DESCRIPTOR.fields:
            if fd.name not in _DATA_FIELDS and _has_field(tensor, fd):
                _copy_field(tensor, before if fd.number < _RAW_DATA_FIELD else after, fd)
        if isinstance(where, _Placed):
            before.MergeFrom(after)
            for key, value in (("location", where.location), ("offset", str(where.offset)),
                               ("length", str(where.length))):
                entry = before.external_data.add()
                entry.key, entry.value = key, value
            before.data_location = TensorProto.EXTERNAL
            return [before.SerializeToString()]
        header = _varint_bytes(_RAW_DATA_FIELD << 3 | 2) + _varint_bytes(where.length)
        return [before.SerializeToString(), header, where, after.SerializeToString()]


def _size(parts: list) -> int:
    total = 0
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            total += len(part)
        elif isinstance(part, _Nested):
            inner = _size(part.parts)
            part.size = inner
            total += len(_varint_bytes(part.number << 3 | 2)) + len(_varint_bytes(inner)) + inner
        else:
            total += part.length
    return total


def _emit(fh, parts: list) -> None:
    """Write pieces sized by `_size`."""
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            fh.write(part)
        elif isinstance(part, _Nested):
            fh.write(_varint_bytes(part.number << 3 | 2) + _varint_bytes(part.size))
            _emit(fh, part.parts)
        else:
            part.write_to(fh)


def _payload_offsets(parts: list) -> dict[int, int]:
    """Offset of each payload (by id) in the bytes that `_emit` writes for sized pieces."""
    offsets: dict[int, int] = {}

    def walk(parts: list, position: int) -> int:
        for part in parts:
            if isinstance(part, (bytes, bytearray)):
                position += len(part)
            elif isinstance(part, _Nested):
                position += len(_varint_bytes(part.number << 3 | 2) + _varint_bytes(part.size))
                position = walk(part.parts, position)
            else:
                offsets[id(part)] = position
                position += part.length
        return position

    walk(parts, 0)
    return offsets


def _check_not_own_data(proto: onnx.ModelProto, base_dir: Path, paths: list[Path]) -> None:
    """Refuse to write over a file the model itself reads from.

    Renaming the new data file over it would leave the input model (and this proto) pointing
    at bytes laid out for another model.
    """
    sources = set()
    for tensor in iter_all_tensors(proto.graph):
        if uses_external_data(tensor):
            location = external_info(tensor).get("location")
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


# --- reading the wire format ----------------------------------------------------------------
#
# Enough of protobuf's encoding to walk ModelProto -> graph -> node -> attribute -> tensor
# without parsing tensor bytes: to check inline sizes, list external files, and (lazy load)
# cut large raw_data out of the file. Field numbers are those of onnx.proto.

# nodes shorter than this are not walked into when checking sizes (a Constant this small
# holds a few numbers, which no pruning reads)
_SCAN_MIN_NODE_BYTES = 128


class _WireError(Exception):
    """The bytes are not a well-formed protobuf message."""


_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_GRAPHS, _ATTR_TYPE, _ATTR_SPARSE_TENSOR = 5, 6, 11, 20, 22
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME = 1, 2, 8
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint_bytes(number << 3 | 2) + _varint_bytes(len(payload)) + payload


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value, field end) for each field in [start, end).

    The value is the integer of a varint field, the payload start of a length-delimited one.
    """
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            value, pos = pos, pos + length
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise _WireError
        if pos > end:
            raise _WireError
        yield number, wire, field_start, value, pos


class _Scan:
    """One walk over a serialized model.

    Checks that inline float tensors have as many bytes as their shapes need, collects the
    external data locations, and with `lift` returns the model with each inline raw_data of
    `LAZY_MIN_BYTES` or more replaced by an external reference to where it lies in `buf`.
    """

    def __init__(self, buf, path: Path, lift: bool):
        self.buf, self.path, self.lift = buf, path, lift
        self.external_locations: set[str] = set()

    def model(self) -> bytes | None:
        """The rewritten model (None if nothing was lifted)."""
        return self._rewrite(0, len(self.buf), {_MODEL_GRAPH: self._graph})

    def _rewrite(self, start: int, end: int, walk: dict[int, Callable]) -> bytes | None:
        """Walk into the fields named in `walk`; rebuild this message if one changed."""
        buf = self.buf
        parts: list[bytes] = []
        copied = start
        for number, wire, field_start, value, field_end in _fields(buf, start, end):
            handler = walk.get(number)
            if handler is None or wire != 2:
                continue
            new = handler(value, field_end)
            if new is not None:
                parts.append(buf[copied:field_start])
                parts.append(_len_field(number, new))
                copied = field_end
        if not parts:
            return None
        parts.append(buf[copied:end])
        return b"".join(parts)

    def _graph(self, start: int, end: int) -> bytes | None:
        return self._rewrite(start, end, {_GRAPH_NODE: self._node,
                                          _GRAPH_INITIALIZER: self._tensor,
                                          _GRAPH_SPARSE_INITIALIZER: self._sparse})

    def _sparse(self, start: int, end: int) -> bytes | None:
        return self._rewrite(start, end, {_SPARSE_VALUES: self._tensor,
                                          _SPARSE_INDICES: self._tensor})

    def _node(self, start: int, end: int) -> bytes | None:
        # most nodes hold no tensor worth a look: the walk is Python, graphs are large
        if end - start < (LAZY_MIN_BYTES if self.lift else _SCAN_MIN_NODE_BYTES):
            return None
        return self._rewrite(start, end, {_NODE_ATTRIBUTE: self._attribute})

    def _attribute(self, start: int, end: int) -> bytes | None:
        kind = None
        for number, wire, _, value, _ in _fields(self.buf, start, end):
            if number == _ATTR_TYPE and wire == 0:
                kind = value
        # the same attributes iter_all_tensors walks into
        if kind == onnx.AttributeProto.TENSOR:
            return self._rewrite(start, end, {_ATTR_T: self._tensor})
        if kind == onnx.AttributeProto.SPARSE_TENSOR:
            return self._rewrite(start, end, {_ATTR_SPARSE_TENSOR: self._sparse})
        if kind == onnx.AttributeProto.GRAPH:
            return self._rewrite(start, end, {_ATTR_G: self._graph})
        if kind == onnx.AttributeProto.GRAPHS:
            return self._rewrite(start, end, {_ATTR_GRAPHS: self._graph})
        return None

    def _tensor(self, start: int, end: int) -> bytes | None:
        buf = self.buf
        dims: list[int] = []
        data_type = location = 0
        name = b""
        raw = None  # (field start, payload start, field end)
        external_entries: list[tuple[int, int]] = []
        for number, wire, field_start, value, field_end in _fields(buf, start, end):
            if number == _TENSOR_DIMS:
                if wire == 0:
                    dims.append(value)
                elif wire == 2:  # packed
                    pos = value
                    while pos < field_end:
                        dim, pos = _read_varint(buf, pos, field_end)
                        dims.append(dim)
            elif number == _TENSOR_DATA_TYPE and wire == 0:
                data_type = value
            elif number == _TENSOR_NAME and wire == 2:
                name = bytes(buf[value:field_end])
            elif number == _RAW_DATA_FIELD and wire == 2:
                raw = (field_start, value, field_end)
            elif number == _TENSOR_DATA_LOCATION and wire == 0:
                location = value
            elif number == _TENSOR_EXTERNAL_DATA and wire == 2:
                external_entries.append((value, field_end))
        if location == TensorProto.EXTERNAL:
            for entry_start, entry_end in external_entries:
                self._note_location(entry_start, entry_end)
            return None
        if raw is None:
            return None
        field_start, payload_start, field_end = raw
        length = field_end - payload_start
        dtype = FLOAT_TYPES.get(data_type)
        if dtype is not None:
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if length != expected:
                tensor_name = name.decode("utf-8", "replace")
                raise ModelLoadError(f"{self.path}: tensor {tensor_name!r} has {length} bytes of "
                                     f"data for shape {dims} (truncated or corrupt)")
        if not self.lift or length < LAZY_MIN_BYTES:
            return None
        reference = b"".join(
            _len_field(_TENSOR_EXTERNAL_DATA,
                       _len_field(_ENTRY_KEY, key.encode()) + _len_field(_ENTRY_VALUE,
                                                                         value.encode()))
            for key, value in (("location", self.path.name), ("offset", str(payload_start)),
                               ("length", str(length))))
        location_field = _varint_bytes(_TENSOR_DATA_LOCATION << 3) + _varint_bytes(
            TensorProto.EXTERNAL)
        return b"".join((buf[start:field_start], buf[field_end:end], reference, location_field))

    def _note_location(self, start: int, end: int) -> None:
        key = value = None
        for number, wire, _, payload, field_end in _fields(self.buf, start, end):
            if wire == 2 and number == _ENTRY_KEY:
                key = bytes(self.buf[payload:field_end])
            elif wire == 2 and number == _ENTRY_VALUE:
                value = bytes(self.buf[payload:field_end])
        if key == b"location" and value:
            self.external_locations.add(value.decode("utf-8", "replace"))


@contextlib.contextmanager
def _mapped(path: Path):
    """The file's bytes, memory-mapped (an empty file gives b"")."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def _scan_file(path: Path) -> _Scan:
    """Check inline tensor sizes and collect external locations, without parsing tensors."""
    with _mapped(path) as buf:
        scan = _Scan(buf, path, lift=False)
        scan.model()
    return scan


def _parse_lazily(path: Path) -> onnx.ModelProto:
    with _mapped(path) as buf:
        rewritten = _Scan(buf, path, lift=True).model()
        proto = onnx.ModelProto()
        proto.ParseFromString(bytes(buf) if rewritten is None else rewritten)
    return proto


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
