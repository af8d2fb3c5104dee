"""Loading a model: the proto without its large tensor bytes, with its external data checked.

A *lazy* load never parses the large inline tensors at all: a scan of the file's wire format
finds them, and the proto gets external-data references into the model file itself instead,
so an inline model is read exactly like one with external data (see `load_model`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from ..errors import ModelLoadError
from .tensors import (
    INDEX_TYPES,
    check_tensor,
    external_info,
    iter_model_sparse_tensors,
    iter_model_tensors,
    note_model_file,
    tensor_label,
    tensor_numel,
    uses_external_data,
)
from .wire import WireError, parse_lazily, scan_file


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
            proto = parse_lazily(path)
        else:
            proto = onnx.load(str(path), load_external_data=False)
            scan_file(path)  # checks inline tensor sizes without copying them
    except ModelLoadError:
        raise
    except (DecodeError, WireError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf could not be parsed; "
                             "truncated or not ONNX)") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:  # onnx raises several types for corrupt files
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_one_line(exc)})") from exc
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and proto.ir_version == 0):
        raise ModelLoadError(f"{path}: not a valid ONNX model (no graph)")
    if proto.ir_version == 0:
        raise ModelLoadError(f"{path}: not a valid ONNX model (ir_version missing)")
    note_model_file(path)
    _check_structure(proto, path)
    loaded = LoadedModel(proto, path, path.parent, False, lazy)
    for sparse in iter_model_sparse_tensors(proto):  # first: their parts are often unnamed
        for part, tensor in (("values", sparse.values), ("indices", sparse.indices)):
            check_tensor(tensor, loaded.base_dir, check_raw=False,
                         label=f"{part} of {sparse_label(sparse)}")
        check_sparse(sparse)
    for tensor in iter_model_tensors(proto):
        # raw_data lengths were checked by the scan of the file, without copying them
        check_tensor(tensor, loaded.base_dir, check_raw=False)
        if uses_external_data(tensor) and not (
                lazy and external_info(tensor).get("location") == path.name):
            loaded.uses_external_data = True
    return loaded


def model_from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike = ".") -> LoadedModel:
    """A model built in memory; its tensors are checked when they are read."""
    external = any(uses_external_data(t) for t in iter_model_tensors(proto))
    return LoadedModel(proto, None, Path(base_dir), external)


def check_sparse(sparse: onnx.SparseTensorProto) -> None:
    """Refuse a sparse tensor whose values, indices and shape do not fit together (the range
    of the indices is checked where they are read)."""
    label = sparse_label(sparse)
    dims = list(sparse.dims)
    if not dims or any(d < 0 for d in dims) or math.prod(d for d in dims if d) >= 2**59:
        raise ModelLoadError(f"{label} has an invalid shape {str(dims)[:80]}")
    if len(sparse.values.dims) != 1:
        raise ModelLoadError(f"{label}: its values must be 1-D, not of shape "
                             f"{list(sparse.values.dims)}")
    count = sparse.values.dims[0]
    indices = sparse.indices
    if count == 0 and tensor_numel(indices, f"indices of {label}") == 0:
        return
    if indices.data_type not in INDEX_TYPES:
        raise ModelLoadError(f"{label}: its indices must be integers, not of type "
                             f"{indices.data_type}")
    if list(indices.dims) not in ([count], [count, len(dims)]):
        raise ModelLoadError(f"{label} has indices of shape {list(indices.dims)} for {count} "
                             f"values of a rank-{len(dims)} tensor (expected [{count}] or "
                             f"[{count}, {len(dims)}])")


def sparse_label(sparse: onnx.SparseTensorProto) -> str:
    """How errors name a sparse tensor: by the name of its values."""
    return "sparse " + tensor_label(sparse.values)


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus every external data file it references inside
    its folder.

    Found by scanning the file's wire format: the tensors are not parsed.
    """
    path = Path(path)
    try:
        locations = scan_file(path).external_locations
    except WireError as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf could not be parsed; "
                             "truncated or not ONNX)") from exc
    total = path.stat().st_size
    folder = os.path.realpath(path.parent)
    for location in filter(None, locations):
        with contextlib.suppress(OSError, ValueError):  # unreadable names count nothing
            file = os.path.realpath(path.parent / location)
            if file.startswith(folder.rstrip(os.sep) + os.sep) and os.path.isfile(file):
                total += os.path.getsize(file)
    return total


def _check_structure(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse text fields that are not valid UTF-8 (protobuf hands them over as bytes, which
    no string operation or copy accepts), and attributes that do not hold what their type
    says, and graphs that define a tensor twice. One walk over every message but tensor
    data: about 5 us a node."""
    stack: list = [(proto, None)]  # (message, the node it belongs to)
    while stack:
        message, node = stack.pop()
        if type(message) is TensorProto:  # ListFields would copy raw_data
            fields = [(field, getattr(message, field.name)) for field in _TENSOR_TEXT
                      if _has(message, field)]
        else:
            fields = message.ListFields()
            if type(message) is onnx.NodeProto:
                node = message
            elif type(message) is onnx.AttributeProto:
                _check_attribute(message, fields, node)
            elif type(message) is onnx.GraphProto:
                _check_unique_initializers(message)
        for field, value in fields:
            kind = _FIELD_KINDS.get(field)
            if kind is None:
                kind = _FIELD_KINDS[field] = _kind(field)
            if kind == _TEXT:
                if type(value) is not str and (type(value) is bytes or any(
                        type(item) is bytes for item in value)):
                    raise ModelLoadError(f"{path}: not a valid ONNX model (a "
                                         f"{message.DESCRIPTOR.name}.{field.name} is not valid "
                                         "UTF-8)")
            elif kind == _MESSAGES:
                stack.extend((item, node) for item in value)
            elif kind == _MESSAGE:
                stack.append((value, node))


def _check_unique_initializers(graph: onnx.GraphProto) -> None:
    """Two initializers (dense or sparse) of one name: which one a consumer reads, and which
    one pruning rewrites, would be anyone's guess."""
    names = [t.name for t in graph.initializer]
    names += [s.values.name for s in graph.sparse_initializer]
    if len(set(names)) != len(names):
        twice = next(name for name, count in Counter(names).items() if count > 1)
        raise ModelLoadError(f"graph {_short(str(graph.name))!r} defines tensor "
                             f"{_short(str(twice))!r} more than once (as initializers or sparse "
                             "initializers)")


def _check_attribute(attr: onnx.AttributeProto, fields: list, node: onnx.NodeProto | None
                     ) -> None:
    """An attribute holds values of its own type only (code reading `attr.t` of a TENSOR
    attribute holding a sparse tensor would get an empty tensor, `attr.f` of a FLOAT one
    holding ints a 0.0), and a TENSOR, SPARSE_TENSOR or GRAPH one holds its value."""
    if attr.type == onnx.AttributeProto.UNDEFINED:
        return  # (old models leave the type out; the walks over tensors go by the fields)
    expected = _VALUE_FIELDS.get(attr.type)
    held = [field.name for field, _ in fields if field.name in _ALL_VALUE_FIELDS]
    if all(name == expected for name in held) and (
            held or expected not in _REQUIRED_FIELDS or attr.ref_attr_name):
        return
    kind = onnx.AttributeProto.AttributeType.Name(attr.type)
    holds = " and ".join(_FIELD_WORDS[name] for name in held) or "nothing"
    where = f"node {_short(str(node.name))!r}: " if node is not None else ""
    raise ModelLoadError(f"{where}attribute {_short(str(attr.name))!r} is of type {kind} but "
                         f"holds {holds}")


# the field that holds an attribute's value, by attribute type, and how errors call them
_VALUE_FIELDS = {getattr(onnx.AttributeProto, kind): field for kind, field in (
    ("FLOAT", "f"), ("INT", "i"), ("STRING", "s"), ("TENSOR", "t"), ("GRAPH", "g"),
    ("SPARSE_TENSOR", "sparse_tensor"), ("TYPE_PROTO", "tp"), ("FLOATS", "floats"),
    ("INTS", "ints"), ("STRINGS", "strings"), ("TENSORS", "tensors"), ("GRAPHS", "graphs"),
    ("SPARSE_TENSORS", "sparse_tensors"), ("TYPE_PROTOS", "type_protos"))}
_ALL_VALUE_FIELDS = frozenset(_VALUE_FIELDS.values())
_REQUIRED_FIELDS = frozenset({"t", "g", "sparse_tensor"})
_FIELD_WORDS = {"f": "a float", "i": "an int", "s": "a string", "t": "a tensor",
                "g": "a graph", "sparse_tensor": "a sparse tensor", "tp": "a type",
                "floats": "floats", "ints": "ints", "strings": "strings", "tensors": "tensors",
                "graphs": "graphs", "sparse_tensors": "sparse tensors", "type_protos": "types"}
_OTHER, _TEXT, _MESSAGE, _MESSAGES = range(4)
_FIELD_KINDS: dict = {}
# the fields of a TensorProto that hold text, or messages that do
_TENSOR_TEXT = [field for field in TensorProto.DESCRIPTOR.fields
                if field.type in (field.TYPE_STRING, field.TYPE_MESSAGE)]


def _kind(field) -> int:
    if field.type == field.TYPE_STRING:
        return _TEXT
    if field.type == field.TYPE_MESSAGE:  # (onnx.proto has no map fields)
        return _MESSAGES if _is_repeated(field) else _MESSAGE
    return _OTHER


def _has(message, field) -> bool:
    return len(getattr(message, field.name)) > 0 if _is_repeated(field) \
        else message.HasField(field.name)


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == field.LABEL_REPEATED


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
