"""ONNX sparse tensors: `sparse_initializer` entries and Constant nodes with `sparse_value`.

onnx.checker wants int64 indices (here the 1-D linearized form), sorted and unique. The
helpers of onnx and onnx-graphsurgeon do not read sparse tensors (to_array ignores them,
graphsurgeon drops `raw_data`), so they are written and read here at the protobuf level.
onnxruntime turns every sparse tensor dense when it loads the model: the format saves
disk, not memory or time.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import SparseTensorProto

from ..errors import ModelLoadError
from ..io import read_array, tensor_nbytes
from ..io.load import check_sparse, sparse_label
from .graphs import FLOAT_DATA_TYPES, bits_of, make_tensor

INDEX_BYTES = 8  # int64, the only index type onnx.checker accepts


def sparse_bytes(nnz: int, itemsize: int) -> int:
    return nnz * (itemsize + INDEX_BYTES)


def make_sparse(name: str, array: np.ndarray) -> SparseTensorProto:
    """The non-zero bit patterns of `array` (so -0.0 and NaN payloads survive) and their
    flat C-order indices."""
    indices = np.flatnonzero(bits_of(array))
    sparse = SparseTensorProto()
    sparse.values.CopyFrom(make_tensor(name, array.reshape(-1)[indices], doc=""))
    sparse.indices.CopyFrom(make_tensor("", indices.astype(np.int64), doc=""))
    sparse.dims.extend(array.shape)
    return sparse


def sparse_to_dense(sparse: SparseTensorProto, base_dir: Path) -> np.ndarray:
    """The dense array of a sparse tensor (values and indices may be external data).

    Values, indices and shape that do not fit together, or an index outside the shape, are a
    ModelLoadError naming the tensor.
    """
    check_sparse(sparse)
    shape = tuple(int(d) for d in sparse.dims)
    dtype = FLOAT_DATA_TYPES.get(sparse.values.data_type)
    label = sparse_label(sparse)
    values = read_array(sparse.values, Path(base_dir), label=f"values of {label}").reshape(-1)
    dense = np.zeros(math.prod(shape), dtype or values.dtype)
    if values.size:
        indices = read_array(sparse.indices, Path(base_dir), label=f"indices of {label}")
        # compare before any cast: a uint64 index past 2**63 would wrap to a negative int64
        bounds = shape if indices.ndim == 2 else (dense.size,)
        if indices.size and (indices.min() < 0 or np.any(indices.max(axis=0) >= bounds)):
            raise ModelLoadError(f"{label}: an index lies outside its shape {list(shape)}")
        indices = indices.astype(np.int64)
        if indices.ndim == 2:  # [nnz, rank] coordinates
            indices = np.ravel_multi_index(tuple(indices.T), shape)
        dense[indices.reshape(-1)] = values
    return dense.reshape(shape)


def stored_sparse_bytes(sparse: SparseTensorProto) -> int:
    return tensor_nbytes(sparse.values) + tensor_nbytes(sparse.indices)


def constant_sparse_value(node: onnx.NodeProto) -> SparseTensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "sparse_value" and attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            return attr.sparse_tensor
    return None


def set_constant_attribute(node: onnx.NodeProto, attribute: onnx.AttributeProto) -> None:
    """Replace whatever value attribute a Constant node has by `attribute`."""
    for index in reversed(range(len(node.attribute))):
        del node.attribute[index]
    node.attribute.append(attribute)
