"""How pruned weights are stored: dense, ONNX sparse tensors, or compact self-rebuilding form.

- `store(target, weights, fmt, pattern, model=...)` writes one pruned target back.
- `densify_model(model, base_dir)` turns sparse and compact tensors back into dense ones.
- `stored_formats(model, base_dir)` lists the sparse and compact tensors of a model.
- `format_bytes_table(array, pattern=..., reduction_axis=...)` compares the sizes each
  format would take with the entropy bound (for `inspect`).
- `unfolded_rebuild_nodes(model)` checks in onnxruntime that compact tensors are folded.

See `compact.py` for the compact forms and the measurements behind them.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import Pattern
from .compact import FOLD_CAP_BYTES, choose_plan, chunk_rows, nm_plan, unstructured_plans
from .densify import StoredInfo, densify_model, stored_formats
from .entropy import binary_entropy, entropy_bound_bytes
from .folding import unfolded_rebuild_nodes
from .graphs import bits_of
from .sparse import sparse_bytes
from .storage import STORED_FORMATS, Blocker, DenseCause, StoreResult, store

__all__ = [
    "FOLD_CAP_BYTES",
    "STORED_FORMATS",
    "Blocker",
    "DenseCause",
    "StoreResult",
    "StoredInfo",
    "binary_entropy",
    "densify_model",
    "entropy_bound_bytes",
    "format_bytes_table",
    "store",
    "stored_formats",
    "unfolded_rebuild_nodes",
]


def format_bytes_table(array: np.ndarray, dtype: np.dtype | str | None = None,
                       pattern: Pattern | str | None = None,
                       reduction_axis: int = -1, value_bits: int = 0) -> dict:
    """Bytes of one tensor in each format beside the entropy bound.

    Returns ``{"numel", "nnz", "sparsity", "dense", "sparse", "compact", "compact_format",
    "entropy_bound"}``: `sparse` with int64 indices, `compact` the compact form `store` would
    choose (the smallest, or one within `compact.LOAD_SLACK` of it that rebuilds with fewer
    bytes written; reported even where it is not smaller than dense, which `store` keeps). `pattern`
    (an N:M pattern, along `reduction_axis`) lets the packed N:M form compete. `dtype`, if
    given, must be the array's dtype (it is accepted for symmetry with the report).
    `value_bits` 4: the int8/uint8 `array` holds int4/uint4 weights, dense two to a byte
    (no sparse form: onnxruntime loads none for them) and compact with 4-bit values.
    """
    array = np.ascontiguousarray(array)
    if dtype is not None and np.dtype(dtype) != array.dtype:
        raise ValueError(f"array has dtype {array.dtype}, not {dtype}")
    pattern = Pattern.parse(pattern) if pattern is not None else Pattern()
    itemsize = value_bits / 8 if value_bits else array.dtype.itemsize
    numel = int(array.size)
    nnz = int(np.count_nonzero(bits_of(array))) if numel else 0
    table: dict[str, int | float | str | None] = {
        "numel": numel, "nnz": nnz, "sparsity": 1.0 - nnz / numel if numel else 0.0,
        "dense": math.ceil(numel * itemsize),
        "sparse": None if value_bits else sparse_bytes(nnz, array.dtype.itemsize),
        "compact": None, "compact_format": None,
        "entropy_bound": entropy_bound_bytes(numel, nnz, itemsize)}
    if numel == 0 or array.ndim == 0:
        return table
    axis = reduction_axis % array.ndim
    m = pattern.m if pattern.is_nm else 0
    chunks = [array[start:stop] for start, stop in chunk_rows(array.shape, axis, m)]
    plans = unstructured_plans(chunks, value_bits)
    if pattern.is_nm:
        plan = nm_plan(chunks, axis, pattern.n, pattern.m, value_bits)
        if plan is not None:
            plans.append(plan)
    best = choose_plan(plans)
    table["compact"], table["compact_format"] = best.bytes, best.format
    return table
