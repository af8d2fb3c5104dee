"""Model I/O: loading (lazy, external data checked), tensor values, atomic writing, and the
protobuf wire reader behind lazy loads. One job per module; this package re-exports the
names the rest of onnxprune uses."""

import os  # noqa: F401  (tests patch onnxprune.io.os.fsync: the os module every part uses)

from .load import LoadedModel, load_model, model_file_bytes, model_from_proto
from .tensors import (
    FLOAT_TYPES,
    iter_all_tensors,
    iter_chunks,
    read_array,
    tensor_nbytes,
    uses_external_data,
    write_array,
)
from .wire import LAZY_MIN_BYTES
from .writer import (
    EXTERNAL_ALIGNMENT,
    ModelWriter,
    check_output_path,
    save_model,
    write_file_atomically,
)

__all__ = [
    "EXTERNAL_ALIGNMENT",
    "FLOAT_TYPES",
    "LAZY_MIN_BYTES",
    "LoadedModel",
    "ModelWriter",
    "check_output_path",
    "iter_all_tensors",
    "iter_chunks",
    "load_model",
    "model_file_bytes",
    "model_from_proto",
    "read_array",
    "save_model",
    "tensor_nbytes",
    "uses_external_data",
    "write_array",
    "write_file_atomically",
]
