"""Reading the protobuf wire format of a model file without parsing its tensors.

Enough of protobuf's encoding to walk ModelProto -> graph -> node -> attribute -> tensor:
to check inline sizes, list external files, and (lazy load) cut large raw_data out of the
file. Field numbers are those of onnx.proto.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import ModelLoadError
from .tensors import expected_nbytes

# a lazy load leaves inline tensors of at least this many bytes in the file
LAZY_MIN_BYTES = 1024

# nodes shorter than this are not walked into when checking sizes (a Constant this small
# holds a few numbers, which no pruning reads)
_SCAN_MIN_NODE_BYTES = 128


class WireError(Exception):
    """The bytes are not a well-formed protobuf message."""


_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE = 7
RAW_DATA_FIELD = 9  # TensorProto.raw_data
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME = 1, 2, 8
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _signed(value: int) -> int:
    """A varint read as the int64 protobuf wrote (negative values take ten bytes)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _len_field(number: int, payload: bytes) -> bytes:
    return varint_bytes(number << 3 | 2) + varint_bytes(len(payload)) + payload


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value, field end) for each field in [start, end).

    The value is the integer of a varint field, the payload start of a length-delimited or
    fixed-width one.
    """
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError
        if wire == 0:
            value, pos = _read_varint(buf, pos, end)
        elif wire == 2:
            length, pos = _read_varint(buf, pos, end)
            value, pos = pos, pos + length
        elif wire == 1:
            value, pos = pos, pos + 8
        elif wire == 5:
            value, pos = pos, pos + 4
        else:
            raise WireError
        if pos > end:
            raise WireError
        yield number, wire, field_start, value, pos


class _Scan:
    """One walk over a serialized model.

    Checks that inline tensors have as many bytes as their types and shapes need, collects the
    external data locations, and with `lift` returns the model with each inline raw_data of
    `LAZY_MIN_BYTES` or more replaced by an external reference to where it lies in `buf`.
    """

    def __init__(self, buf, path: Path, lift: bool):
        self.buf, self.path, self.lift = buf, path, lift
        self.external_locations: set[str] = set()

    def model(self) -> bytes | None:
        """The rewritten model (None if nothing was lifted)."""
        return self._rewrite(0, len(self.buf), {_MODEL_GRAPH: self._graph,
                                                _MODEL_FUNCTIONS: self._function})

    def _function(self, start: int, end: int) -> bytes | None:
        return self._rewrite(start, end, {_FUNCTION_NODE: self._node})

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
        # the fields iter_all_tensors walks into, whatever type the attribute claims
        return self._rewrite(start, end, {_ATTR_T: self._tensor, _ATTR_TENSORS: self._tensor,
                                          _ATTR_SPARSE_TENSOR: self._sparse,
                                          _ATTR_SPARSE_TENSORS: self._sparse,
                                          _ATTR_G: self._graph, _ATTR_GRAPHS: self._graph})

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
                    dims.append(_signed(value))
                elif wire == 2:  # packed
                    pos = value
                    while pos < field_end:
                        dim, pos = _read_varint(buf, pos, field_end)
                        dims.append(_signed(dim))
            elif number == _TENSOR_DATA_TYPE and wire == 0:
                data_type = value
            elif number == _TENSOR_NAME and wire == 2:
                name = bytes(buf[value:field_end])
            elif number == RAW_DATA_FIELD and wire == 2:
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
        # negative shapes and unknown types are refused once the proto is parsed
        expected = None if any(d < 0 for d in dims) else \
            expected_nbytes(data_type, math.prod(dims))
        if expected is not None and length != expected:
            tensor_name = name.decode("utf-8", "replace")
            if len(tensor_name) > 80:
                tensor_name = tensor_name[:80] + "..."
            shape = str(dims) if len(dims) < 10 else str(dims[:10])[:-1] + ", ...]"
            raise ModelLoadError(f"{self.path}: tensor {tensor_name!r} has {length} bytes of "
                                 f"data for shape {shape} ({expected} needed; truncated or "
                                 "corrupt)")
        if not self.lift or length < LAZY_MIN_BYTES or expected is None:
            return None
        reference = b"".join(
            _len_field(_TENSOR_EXTERNAL_DATA,
                       _len_field(_ENTRY_KEY, key.encode()) + _len_field(_ENTRY_VALUE,
                                                                         value.encode()))
            for key, value in (("location", self.path.name), ("offset", str(payload_start)),
                               ("length", str(length))))
        location_field = varint_bytes(_TENSOR_DATA_LOCATION << 3) + varint_bytes(
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


def scan_file(path: Path) -> _Scan:
    """Check inline tensor sizes and collect external locations, without parsing tensors."""
    with _mapped(path) as buf:
        scan = _Scan(buf, path, lift=False)
        scan.model()
    return scan


def parse_lazily(path: Path) -> onnx.ModelProto:
    with _mapped(path) as buf:
        rewritten = _Scan(buf, path, lift=True).model()
        proto = onnx.ModelProto()
        proto.ParseFromString(bytes(buf) if rewritten is None else rewritten)
    return proto


