"""The one place that builds and runs onnxruntime sessions: CPU provider, threads, quiet
logging, where external (or lazily referenced) tensor data lives, and how a feed goes in and
the outputs come out.

Validation, calibration capture, the sensitivity sweep and the folding check all build their
sessions here, so a change of provider, thread policy or log level is made once.

`run_session` takes any feed a caller can hold: numpy arrays, numpy scalars (a 0-d input),
and ml_dtypes arrays (bfloat16, float8), which numpy cannot hand to onnxruntime and which
travel as OrtValues; outputs of those types come back as ml_dtypes arrays.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import ModelLoadError

# onnxruntime log severity: fatal only. Its errors (3) would print coloured lines to stderr
# before our one-line message, which already carries their text.
QUIET = 4
PROVIDERS = ["CPUExecutionProvider"]
# Element types numpy cannot hand to onnxruntime directly; they travel as OrtValues.
ORTVALUE_ONLY_TYPES = ("bfloat16", "float8", "int4", "uint4", "float4")


def session_options(*, intra_op_threads: int | None = None, spinning: bool = True,
                    data_folder: str | os.PathLike | None = None) -> ort.SessionOptions:
    """Options for a quiet CPU session.

    `spinning=False` keeps idle onnxruntime threads from spinning while numpy works between
    runs (calibration sums statistics between stages). `data_folder`: where the tensors a
    serialized model references (external data, or a lazy load's references into the model
    file) are found.
    """
    # Sessions log through their own logger; environment and load messages through this one.
    ort.set_default_logger_severity(QUIET)
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path",
            str(Path(data_folder).resolve()))
    return options


def create_session(source: str | bytes, options: ort.SessionOptions | None = None
                   ) -> ort.InferenceSession:
    """An InferenceSession on the CPU provider; onnxruntime's own errors pass through."""
    return ort.InferenceSession(source, options or session_options(), providers=PROVIDERS)


def make_session(model: str | os.PathLike | onnx.ModelProto, *,
                 intra_op_threads: int | None = None) -> ort.InferenceSession:
    """A quiet CPU session for a model path or ModelProto.

    Pass a path for models with external data or over 2 GiB; a ModelProto is serialized.
    Any load failure becomes a one-line `ModelLoadError`.
    """
    options = session_options(intra_op_threads=intra_op_threads)
    if isinstance(model, onnx.ModelProto):
        label = f"model {model.graph.name!r}" if model.graph.name else "model"
        try:
            source: str | bytes = model.SerializeToString()
        except ValueError as exc:  # protobuf refuses messages of 2 GiB or more
            raise ModelLoadError(f"{label} is over 2 GiB in memory; save it with external "
                                 "data and pass its path") from exc
    else:
        path = Path(model)
        label = str(path)
        if path.is_dir():
            raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
        source = str(path)
    try:
        return create_session(source, options)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise ModelLoadError(f"{label}: onnxruntime cannot load it ({first_line(exc)})") from exc


def run_session(session: ort.InferenceSession, feed: Mapping[str, Any]) -> dict[str, Any]:
    """Run `session` on `feed` (input name -> array or numpy scalar); outputs by name.

    onnxruntime's own exceptions pass through: callers say what failed in their terms.
    """
    feed = {name: np.asarray(value) for name, value in feed.items()}  # a scalar: a 0-d array
    names = [o.name for o in session.get_outputs()]
    needs_ortvalues = any(array.dtype.kind == "V" for array in feed.values()) or any(
        kind in o.type for o in session.get_outputs() for kind in ORTVALUE_ONLY_TYPES)
    if not needs_ortvalues:
        return dict(zip(names, session.run(names, feed), strict=True))
    values = session.run_with_ort_values(names, {k: _to_ortvalue(v) for k, v in feed.items()})
    return {name: _ortvalue_to_numpy(value) for name, value in zip(names, values, strict=True)}


def _to_ortvalue(array: np.ndarray) -> ort.OrtValue:
    array = np.ascontiguousarray(array)
    if array.dtype.kind != "V":
        return ort.OrtValue.ortvalue_from_numpy(array)
    # ml_dtypes arrays (bfloat16, float8): hand over the bits with the ONNX element type.
    element_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    bits = array.view(f"u{array.dtype.itemsize}")
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, onnx_element_type=element_type)


def _ortvalue_to_numpy(value: ort.OrtValue) -> Any:
    if not value.is_tensor():
        return value.numpy()
    try:
        return value.numpy()
    except RuntimeError:  # bfloat16 / float8 have no numpy type in onnxruntime: copy the bits
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.element_type()))
        shape = tuple(value.shape())
        nbytes = value.tensor_size_in_bytes()
        if nbytes == 0:
            return np.zeros(shape, dtype)
        buffer = (ctypes.c_char * nbytes).from_address(value.data_ptr())
        return np.frombuffer(buffer, dtype=np.uint8).copy().view(dtype).reshape(shape)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run over many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
