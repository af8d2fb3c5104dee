"""Writing models atomically, streaming tensor data from where it is.

Writing never serializes the whole model at once and never modifies the proto: the
`ModelWriter` assembles the output from serialized pieces, streaming every large tensor's
bytes from where they are (new values given with `put`, the input's files, or the proto)
into files beside the output, which are renamed into place at the end. A failed run leaves
nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import ModelLoadError, OutputPathError
from .load import LoadedModel
from .tensors import (
    PACKED_TYPES,
    check_values,
    external_info,
    external_range,
    iter_model_tensors,
    read_array,
    read_exactly,
    tensor_nbytes,
    tensor_numel,
    uses_external_data,
)
from .wire import RAW_DATA_FIELD, varint_bytes

# protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 2**26
# tensors at least this large go to external data when a model is written that way.
EXTERNAL_THRESHOLD = 1024
EXTERNAL_ALIGNMENT = 64
# inline tensors at least this large are written from the proto one at a time, not as part
# of one serialized model (which would hold a second copy of every tensor at once)
SPLIT_MIN_BYTES = 1 << 20
# bytes per read when tensor data is copied piece by piece
COPY_CHUNK_BYTES = 16 << 20

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
                              f"({exc.strerror or exc})") from exc
    probe.unlink()
    return output


def save_model(loaded: LoadedModel, output: str | os.PathLike,
               external: bool | None = None, durable: bool = False,
               verify: Callable[[Path], object] | None = None) -> Path:
    """Write atomically. External data is used when asked, when the input had it, or > 2 GiB.

    The proto is not modified; tensor data is streamed, never serialized all at once. With
    `durable` the files are fsynced before they are renamed into place (see `ModelWriter`);
    `verify` checks the written model before its rename (`ModelWriter.commit`).
    """
    with ModelWriter(loaded, output, external, durable) as writer:
        return writer.commit(verify)

# the fields of a TensorProto that hold (or point to) its values
_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "string_data", "int64_data",
                          "double_data", "uint64_data", "external_data", "data_location"})

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

    `expect`: tensors of the proto that hold no values yet, only their dims (a structured
    rewrite's cut tensors, `structured.surgery.Shrinking`): each must be given with `put`
    before `commit`. In a model file filled in place their room is reserved at the size
    their dims give, so that their values, too, go straight to their place.

    Layout of the data file: tensors given with `put` in that order, then the others in
    `iter_model_tensors` order, each at a multiple of `EXTERNAL_ALIGNMENT`.
    """

    def __init__(self, loaded: LoadedModel, output: str | os.PathLike,
                 external: bool | None = None, durable: bool = False,
                 expect: Iterable[TensorProto] = ()):
        self.loaded = loaded
        self.durable = durable
        self.output = Path(output)
        self.directory = self.output.parent if str(self.output.parent) else Path(".")
        if external is None:
            total = sum(tensor_nbytes(t) for t in iter_model_tensors(loaded.proto))
            external = loaded.uses_external_data or total > PROTOBUF_LIMIT
        self.external = external
        self.data_name = self.output.name + ".data"
        # id(tensor) -> (tensor, its new bytes: _Placed in the data file, a _WrittenSlot in
        # the model file, or a payload kept for commit). Tensors are kept: ids hold while
        # the objects live.
        self._pending: dict[int, tuple[TensorProto, _Placed | _Payload]] = {}
        # id(tensor) -> (tensor, offset, length) of its raw bytes in the inline output
        self._slots: dict[int, tuple[TensorProto, int, int]] = {}
        # id(tensor) -> tensor, for the tensors announced with `expect`
        self._expected = {id(tensor): tensor for tensor in expect}
        self._temps: list[Path] = []
        self._data: IO[bytes] | None = None  # the data file being appended to (external)
        self._data_offset = 0
        # the model file being filled in place (inline, lazy input)
        self._model: IO[bytes] | None = None
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
            raise self._error(exc) from exc

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if not self._done:
            self.abort()

    def put(self, tensor: TensorProto, values: np.ndarray) -> None:
        """The tensor's new values (its dtype and shape). Keep `values` unchanged after."""
        self._check_open()
        check_values(tensor, values)
        values = np.ascontiguousarray(values)
        payload = _ArrayPayload(values)
        slot = self._slots.get(id(tensor))
        where: _Placed | _Payload
        try:
            if self.external and values.nbytes >= EXTERNAL_THRESHOLD:
                where = self._append(payload)
            elif slot is not None and slot[2] == values.nbytes:
                _, offset, length = slot
                model = self._model
                if model is None:  # slots are laid out only with the model file open
                    raise RuntimeError(f"the writer of {self.output} has slots but no model "
                                       "file open")
                model.seek(offset)
                payload.write_to(model)
                _start_writeback(model, offset, length)
                where = _WrittenSlot(offset, length)
            else:
                where = payload
        except OSError as exc:
            self.abort()
            raise self._error(exc) from exc
        self._pending[id(tensor)] = (tensor, where)

    def commit(self, verify: Callable[[Path], object] | None = None) -> Path:
        """Write everything not yet written and rename the files into place; `verify(path)`
        is called on the written model before its rename and may refuse it by raising (the
        output is then not written, and a file already at its path is left as it was)."""
        self._check_open()
        try:
            plan = self._plan()
            if self.external:  # copy the other tensors' bytes to the data file
                plan = {key: (tensor, where if key in self._pending
                              else self._append(_unplaced(where)))
                        for key, (tensor, where) in plan.items()}
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
            if verify is not None:
                verify(model_tmp)
            os.replace(model_tmp, self.output)
            self._temps.remove(model_tmp)
            if self.external:
                self._temps.remove(self.directory / self.data_name)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError):
                raise self._error(exc) from exc
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

    def _open_temp(self, name: str, mode: str) -> IO[bytes]:
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
        data = self._data
        if data is None:  # opened in __init__ when writing external data
            raise RuntimeError(f"the writer of {self.output} has no data file open")
        padding = (-self._data_offset) % EXTERNAL_ALIGNMENT
        if padding:
            data.write(b"\0" * padding)
            self._data_offset += padding
        offset = self._data_offset
        length = payload.write_to(data)
        self._data_offset += length
        _start_writeback(data, offset, length)
        return _Placed(self.data_name, offset, length)

    def _plan(self, reserve: bool = False) -> dict[int, tuple[TensorProto, _Placed | _Payload]]:
        """Each tensor whose bytes are not serialized with the proto, by id, with where its
        bytes are: given with `put`, or where they are now (a file, the proto). An expected
        tensor not given yet is an error, or with `reserve` room of its size (a layout)."""
        plan: dict[int, tuple[TensorProto, _Placed | _Payload]] = {}
        base_dir = self.loaded.base_dir
        for tensor in iter_model_tensors(self.loaded.proto):
            key = id(tensor)
            if key in plan:
                continue
            pending = self._pending.get(key)
            if pending is not None:
                plan[key] = pending
                continue
            if key in self._expected:
                if not reserve:
                    raise ValueError(f"tensor {tensor.name!r} was expected but not given with "
                                     "put()")
                plan[key] = (tensor, _Reserved(tensor_nbytes(tensor)))
                continue
            payload = _untouched_payload(tensor, base_dir, self.external)
            if payload is not None:
                plan[key] = (tensor, payload)
        missing = [t.name for key, (t, _) in self._pending.items() if key not in plan]
        missing += [t.name for key, t in self._expected.items() if key not in plan]
        if missing:
            raise ValueError(f"put() was given or expects tensors that are not in the model: "
                             f"{sorted(set(missing))}")
        return plan

    def _layout(self) -> dict[int, tuple[TensorProto, int, int]]:
        """Where each tensor's raw bytes will lie in the inline output, as the proto is now."""
        plan = self._plan(reserve=True)
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


def _unplaced(where: _Placed | _Payload) -> _Payload:
    """An untouched tensor's payload (`_plan` places only tensors given with `put`)."""
    if isinstance(where, _Placed):
        raise RuntimeError("a tensor not given with put() is already in the data file")
    return where


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
            # .data: memoryview(array); numpy's stubs declare ndarray a Buffer only for 3.12+
            fh.write(self.array.reshape(-1).view(np.uint8).data)
        return self.length


class _Reserved(_Payload):
    """Room for the values of an expected tensor, in a layout: never written."""

    def __init__(self, length: int):
        self.length = length

    def write_to(self, fh) -> int:
        raise RuntimeError("an expected tensor's values were never given")


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
                read_exactly(source, piece, self.file)
                fh.write(piece.data)  # memoryview(piece), as the stubs accept it
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

    def __init__(self, tensor: TensorProto, base_dir: Path):
        self.tensor, self.base_dir = tensor, base_dir
        self.length = tensor_nbytes(tensor)

    def write_to(self, fh) -> int:
        data = np.ascontiguousarray(read_array(self.tensor, self.base_dir)).tobytes()
        fh.write(data)
        return len(data)


def _untouched_payload(tensor: TensorProto, base_dir: Path, external: bool) -> _Payload | None:
    """Where an unchanged tensor's bytes come from, if they are to be moved or streamed."""
    if tensor.data_type == TensorProto.STRING:
        return None
    if uses_external_data(tensor):
        file, offset, length = external_range(tensor, base_dir)
        return _FilePayload(file, offset, length)
    if tensor.data_type in PACKED_TYPES:
        return None
    nbytes = tensor_nbytes(tensor)
    if tensor.HasField("raw_data"):
        if nbytes >= (EXTERNAL_THRESHOLD if external else SPLIT_MIN_BYTES):
            return _ProtoRawPayload(tensor, nbytes)
        return None
    if external and nbytes >= EXTERNAL_THRESHOLD and tensor_numel(tensor) > 0:
        return _TypedDataPayload(tensor, base_dir)
    return None


# Serialized output is a tree of pieces: bytes, _Nested submessages and payloads. Fields are
# emitted in field-number order, as protobuf serializes them, so an unchanged model comes
# out byte for byte as `SerializeToString` would write it.

@dataclass
class _Nested:
    """A length-delimited field whose content is itself a list of pieces."""

    number: int
    parts: list
    # the content's length in bytes, set by `_size` before `_emit` writes it
    size: int = field(init=False, repr=False, compare=False)


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
        return self._split(model, {"graph": self._graph, "functions": self._function}) or \
            [model.SerializeToString()]

    def _function(self, function: onnx.FunctionProto) -> list | None:
        return self._split(function, {"node": self._node})

    def _graph(self, graph: onnx.GraphProto) -> list | None:
        return self._split(graph, {"node": self._node, "initializer": self._tensor,
                                   "sparse_initializer": self._sparse})

    def _sparse(self, sparse: onnx.SparseTensorProto) -> list | None:
        return self._split(sparse, {"values": self._tensor, "indices": self._tensor})

    def _node(self, node: onnx.NodeProto) -> list | None:
        return self._split(node, {"attribute": self._attribute})

    def _attribute(self, attr: onnx.AttributeProto) -> list | None:
        # the fields iter_all_tensors walks into, whatever type the attribute claims
        return self._split(attr, {"t": self._tensor, "tensors": self._tensor,
                                  "sparse_tensor": self._sparse, "sparse_tensors": self._sparse,
                                  "g": self._graph, "graphs": self._graph})

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
                _copy_field(tensor, before if fd.number < RAW_DATA_FIELD else after, fd)
        if isinstance(where, _Placed):
            before.MergeFrom(after)
            for key, value in (("location", where.location), ("offset", str(where.offset)),
                               ("length", str(where.length))):
                entry = before.external_data.add()
                entry.key, entry.value = key, value
            before.data_location = TensorProto.EXTERNAL
            return [before.SerializeToString()]
        header = varint_bytes(RAW_DATA_FIELD << 3 | 2) + varint_bytes(where.length)
        return [before.SerializeToString(), header, where, after.SerializeToString()]


def _size(parts: list) -> int:
    total = 0
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            total += len(part)
        elif isinstance(part, _Nested):
            inner = _size(part.parts)
            part.size = inner
            total += len(varint_bytes(part.number << 3 | 2)) + len(varint_bytes(inner)) + inner
        else:
            total += part.length
    return total


def _emit(fh, parts: list) -> None:
    """Write pieces sized by `_size`."""
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            fh.write(part)
        elif isinstance(part, _Nested):
            fh.write(varint_bytes(part.number << 3 | 2) + varint_bytes(part.size))
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
                position += len(varint_bytes(part.number << 3 | 2) + varint_bytes(part.size))
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
    for tensor in iter_model_tensors(proto):
        if uses_external_data(tensor):
            location = external_info(tensor).get("location")
            if location:
                with contextlib.suppress(OSError, ValueError, TypeError):  # unusable names
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



def write_file_atomically(path: str | os.PathLike, write: Callable[[IO[Any]], object],
                          binary: bool = True) -> Path:
    """A small side file (report, masks) written through a temporary file renamed into
    place, with the mode a model output gets; `write(fh)` fills it."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        tmp = _temp_path(directory, path.name)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        with open(tmp, "wb" if binary else "w") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
