"""The one place that builds onnxruntime sessions: CPU provider, threads, quiet logging, and
where external (or lazily referenced) tensor data lives.

Validation, calibration capture and the folding check all build their sessions here, so a
change of provider, thread policy or log level is made once.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnxruntime as ort

from .errors import ModelLoadError

# onnxruntime log severity: fatal only. Its errors (3) would print coloured lines to stderr
# before our one-line message, which already carries their text.
QUIET = 4
PROVIDERS = ["CPUExecutionProvider"]


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
        except ValueError:  # protobuf refuses messages of 2 GiB or more
            raise ModelLoadError(f"{label} is over 2 GiB in memory; save it with external "
                                 "data and pass its path") from None
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
        raise ModelLoadError(f"{label}: onnxruntime cannot load it ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run over many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
