"""Loading a model: the proto without its large tensor bytes, with its external data checked.

A *lazy* load never parses the large inline tensors at all: a scan of the file's wire format
finds them, and the proto gets external-data references into the model file itself instead,
so an inline model is read exactly like one with external data (see `load_model`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from ..errors import ModelLoadError
from .tensors import external_info, iter_all_tensors, tensor_nbytes, uses_external_data
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
    except (DecodeError, WireError):
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


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model file plus every external data file it references.

    Found by scanning the file's wire format: the tensors are not parsed.
    """
    path = Path(path)
    try:
        locations = scan_file(path).external_locations
    except WireError:
        raise ModelLoadError(f"{path}: not a valid ONNX model (protobuf could not be parsed; "
                             "truncated or not ONNX)") from None
    return path.stat().st_size + sum((path.parent / loc).stat().st_size
                                     for loc in locations if loc)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
