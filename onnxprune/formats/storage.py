"""Write one pruned target back into its graph as dense, sparse or compact storage.

Where each kind of stored weight goes (decided here, tested in tests/test_formats.py):

- An initializer becomes a `sparse_initializer` of the same graph, or is removed and
  rebuilt by nodes placed at the start of the graph, writing the same name.
- A Constant node gets a `sparse_value` instead of its `value`, or is replaced in place by
  its rebuild nodes (payload as initializers of the same graph); densify puts the Constant
  back, with its name.
- Weights inside If/Loop/Scan bodies are handled the same way inside their subgraph;
  onnxruntime folds rebuilds in subgraphs too.
- What a weight passes through on its way to the consumer (Cast, Transpose, ...) is left
  as it is: only the stored tensor changes.
- Stays dense, with the cause in `StoreResult.cause` (a `DenseCause`; `StoreResult.reason`
  words it): a tensor also listed as a graph
  input (an initializer callers may override: replacing it would change the model's
  interface), an empty or scalar tensor, compact in a model below ai.onnx opset 11 (the
  rebuild ops), a sparse_initializer below IR version 6 or a sparse Constant below opset
  11, any form not smaller than dense, and compact for a tensor of 1 GiB or more dense
  (onnxruntime would not fold its rebuild; logged as a warning).

Limits of the formats themselves (ONNX and onnxruntime, not this code): ONNX shape
inference types sparse initializers as sparse tensors, so `onnx.checker` with
`full_check=True` fails on models whose dense ops read them (the plain checker passes, and
onnxruntime densifies them at load); `onnx.load` does not load external data of sparse
tensors, so check such models with `load_external_data=False`. Compact tensors pass the
full check and carry a value_info with their type and shape; they are folded at graph
optimization level BASIC or higher (the default is ALL) and recomputed at every run when
optimizations are disabled.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..config import Pattern
from ..graph import defined_names
from ..io import write_array
from ..targets import WeightTarget
from .compact import (
    FOLD_CAP_BYTES,
    MIN_OPSET,
    TensorBuilder,
    choose_plan,
    chunk_rows,
    encode_chunk,
    meta_doc,
    plan_meta,
    tensor_plans,
)
from .graphs import (
    COMPACT_MARK,
    FLOAT_DATA_TYPES,
    INTEGER_DATA_TYPES,
    REBUILD_PREFIX,
    add_metadata_format,
    bits_of,
    constant_node_index,
    default_opset,
    initializer_index,
)
from .sparse import make_sparse, set_constant_attribute, sparse_bytes

log = logging.getLogger(__name__)

DenseWriter = Callable[[TensorProto, np.ndarray], None]
STORED_FORMATS = ("dense", "sparse", "compact")  # what `store` writes
STREAMED_PAYLOAD_BYTES = 1 << 16  # smaller compact tensors stay in the proto until it is saved


class DenseCause(enum.Enum):
    """Why a target stays dense when sparse or compact storage was asked for.

    The particulars are in `Blocker.detail`; `Blocker.reason` (and `StoreResult.reason`)
    words both.
    """

    EMPTY_OR_SCALAR = "empty_or_scalar"
    STORAGE_NOT_FOUND = "storage_not_found"  # the tensor is not where its target says
    GRAPH_INPUT = "graph_input"  # an initializer also listed as a graph input
    COMPACT_NEEDS_OPSET = "compact_needs_opset"  # detail: opset (the model's), needed
    FOLD_LIMIT = "fold_limit"  # too large for onnxruntime to fold a rebuild; detail: bytes
    SPARSE_NEEDS_IR_VERSION = "sparse_needs_ir_version"  # detail: ir_version, needed
    SPARSE_CONSTANT_NEEDS_OPSET = "sparse_constant_needs_opset"  # detail: opset, needed
    # detail: format (sparse/compact), bytes, dense_bytes, sparsity; encoding (compact form)
    NOT_SMALLER = "not_smaller"
    PACKED = "packed"  # 4-bit integers packed two to a byte (int4, MatMulNBits)
    ZERO_POINT = "zero_point"  # a quantized weight whose zero points are not all 0


_DENSE_REASONS = {
    DenseCause.EMPTY_OR_SCALAR: "empty or scalar tensor",
    DenseCause.STORAGE_NOT_FOUND: "its storage was not found in its graph",
    DenseCause.GRAPH_INPUT: "also a graph input (an initializer callers may override)",
    DenseCause.COMPACT_NEEDS_OPSET: "compact storage needs ai.onnx opset >= {needed}; the "
                                    "model has {opset}",
    DenseCause.FOLD_LIMIT: "{bytes:,} bytes dense reach onnxruntime's constant-folding limit "
                           "({limit:,} bytes per node output)",
    DenseCause.SPARSE_NEEDS_IR_VERSION: "sparse_initializer needs IR version >= {needed}; the "
                                        "model has {ir_version}",
    DenseCause.SPARSE_CONSTANT_NEEDS_OPSET: "Constant sparse_value needs ai.onnx opset >= "
                                            "{needed}; the model has {opset}",
    DenseCause.PACKED: "packed 4-bit integers are stored dense",
    DenseCause.ZERO_POINT: "its zero points are not 0, so its pruned weights are not zero "
                           "bytes (quantize with symmetric weights to store it compact)",
}
_NOT_SMALLER = {
    "sparse": "sparse ({bytes:,} bytes with int64 indices) is not smaller than dense "
              "({dense_bytes:,} bytes) at {sparsity:.1%} sparsity",
    "compact": "compact ({bytes:,} bytes as {encoding}) is not smaller than dense "
               "({dense_bytes:,} bytes) at {sparsity:.1%} sparsity",
}
SPARSE_MIN_IR_VERSION = 6  # sparse_initializer
SPARSE_CONSTANT_MIN_OPSET = 11  # Constant's sparse_value


@dataclass(frozen=True)
class Blocker:
    """Why one target stays dense: the cause and its particulars."""

    cause: DenseCause
    detail: Mapping[str, object] = field(default_factory=dict, hash=False)

    @property
    def reason(self) -> str:
        if self.cause is DenseCause.NOT_SMALLER:
            return _NOT_SMALLER[str(self.detail["format"])].format(**self.detail)
        return _DENSE_REASONS[self.cause].format(**self.detail)


@dataclass(frozen=True)
class StoreResult:
    """What `store` did with one target.

    `format` is what was actually written: dense, sparse, compact-gaps, compact-bitmask,
    compact-nm or compact-zeros; `bytes` the bytes the tensor now takes in the model;
    `blocker` says why it stayed dense when another format was asked for (else None):
    `cause` is what code tests, `reason` what reports show.
    """

    format: str
    bytes: int
    blocker: Blocker | None = None

    @property
    def cause(self) -> DenseCause | None:
        return self.blocker.cause if self.blocker is not None else None

    @property
    def reason(self) -> str | None:
        return self.blocker.reason if self.blocker is not None else None


def store(target: WeightTarget, weights: np.ndarray, fmt: str, pattern: Pattern | None = None,
          *, model: onnx.ModelProto | None = None, write_dense: DenseWriter = write_array,
          forms: tuple[str, ...] | None = None,
          write_payload: DenseWriter | None = None) -> StoreResult:
    """Replace the dense storage of one target by `fmt`, where that is smaller.

    `weights` are the target's values in its stored shape and dtype. `dense` writes them
    back in place. `sparse` makes an ONNX sparse tensor (sparse_initializer, or a Constant's
    sparse_value), `compact` the smallest self-decompressing form; either stays dense, with
    the reason, where it would not be smaller or cannot be used. `pattern` lets N:M
    targets use the packed N:M form. `model`, when given, is checked for the opset and IR
    version the format needs and gets a metadata entry naming the formats used.
    `write_dense(tensor, weights)` writes a tensor that is (or stays) dense: by default
    into the proto (`io.write_array`); a streaming writer passes its own (`ModelWriter.put`).
    `forms` (tests and benchmarks) forces one of the given compact forms (zeros, gaps,
    bitmask, nm) even where it is not the smallest or not smaller than dense.
    `write_payload(tensor, values)`, when given, takes each large new tensor of a compact
    form as soon as it is in the graph (a streaming writer puts it in the output file), and
    the proto keeps it without its bytes.
    """
    if fmt not in STORED_FORMATS:
        raise ValueError(f"format must be one of {', '.join(STORED_FORMATS)}; got {fmt!r}")
    weights = np.ascontiguousarray(weights)
    tensor = target.stored_tensor
    if target.quant is not None and target.quant.packed:  # raw bytes of packed integers
        if fmt != "dense":
            log.info("%s: stays dense: %s", target.name, Blocker(DenseCause.PACKED).reason)
            write_dense(tensor, weights)
            return StoreResult("dense", weights.nbytes, Blocker(DenseCause.PACKED))
        write_dense(tensor, weights)
        return StoreResult("dense", weights.nbytes)
    dtype = FLOAT_DATA_TYPES.get(tensor.data_type) or (
        INTEGER_DATA_TYPES.get(tensor.data_type) if target.quant is not None else None)
    if dtype is None or weights.dtype != dtype or weights.shape != tuple(tensor.dims):
        raise ValueError(f"{target.name}: weights {weights.dtype}{weights.shape} do not match "
                         f"the stored tensor {dtype}{tuple(tensor.dims)}")
    if fmt != "dense":
        blocker = _blocker(target, weights, fmt, model)
        if blocker is None:
            result = (_store_sparse(target, weights, model) if fmt == "sparse" else
                      _store_compact(target, weights, pattern or Pattern(), model, forms,
                                     write_payload))
            if isinstance(result, StoreResult):
                return result
            blocker = result
        log.info("%s: stays dense: %s", target.name, blocker.reason)
        write_dense(tensor, weights)
        return StoreResult("dense", weights.nbytes, blocker)
    write_dense(tensor, weights)
    return StoreResult("dense", weights.nbytes)


def _location(graph: onnx.GraphProto, name: str) -> tuple[str, int] | None:
    """("initializer", index in graph.initializer) or ("constant", index in graph.node)."""
    index = initializer_index(graph, name)
    if index is not None:
        return "initializer", index
    index = constant_node_index(graph, name)
    if index is not None:
        return "constant", index
    return None


def _stored_at(target: WeightTarget) -> tuple[onnx.GraphProto, str, int]:
    """The graph, kind and index where `_blocker` found the target's storage."""
    graph = target.graph
    location = _location(graph, target.tensor_name) if graph is not None else None
    if graph is None or location is None:
        raise ValueError(f"{target.name}: its storage was not found in its graph")
    kind, index = location
    return graph, kind, index


def _blocker(target: WeightTarget, weights: np.ndarray, fmt: str,
             model: onnx.ModelProto | None) -> Blocker | None:
    """Why `fmt` cannot be used for this target at all, or None."""
    if weights.ndim == 0 or weights.size == 0:
        return Blocker(DenseCause.EMPTY_OR_SCALAR)
    graph = target.graph
    location = _location(graph, target.tensor_name) if graph is not None else None
    if graph is None or location is None:
        return Blocker(DenseCause.STORAGE_NOT_FOUND)
    if any(i.name == target.tensor_name for i in graph.input):
        return Blocker(DenseCause.GRAPH_INPUT)
    kind = location[0]
    opset = default_opset(model) if model is not None else None
    if fmt == "compact":
        if model is not None and (opset is None or opset < MIN_OPSET):
            return Blocker(DenseCause.COMPACT_NEEDS_OPSET, {"opset": opset, "needed": MIN_OPSET})
        if weights.nbytes >= FOLD_CAP_BYTES:
            blocker = Blocker(DenseCause.FOLD_LIMIT, {"bytes": weights.nbytes,
                                                      "limit": FOLD_CAP_BYTES})
            log.warning("%s: stays dense: %s; a compact form would be rebuilt at every "
                        "inference", target.name, blocker.reason)
            return blocker
    if fmt == "sparse" and model is not None:
        if kind == "initializer" and model.ir_version < SPARSE_MIN_IR_VERSION:
            return Blocker(DenseCause.SPARSE_NEEDS_IR_VERSION,
                           {"ir_version": model.ir_version, "needed": SPARSE_MIN_IR_VERSION})
        if kind == "constant" and (opset is None or opset < SPARSE_CONSTANT_MIN_OPSET):
            return Blocker(DenseCause.SPARSE_CONSTANT_NEEDS_OPSET,
                           {"opset": opset, "needed": SPARSE_CONSTANT_MIN_OPSET})
    return None


def _not_smaller(fmt: str, size: int, weights: np.ndarray, nnz: int,
                 **detail: object) -> Blocker:
    return Blocker(DenseCause.NOT_SMALLER, {"format": fmt, "bytes": size,
                                            "dense_bytes": weights.nbytes,
                                            "sparsity": 1 - nnz / weights.size, **detail})


def _store_sparse(target: WeightTarget, weights: np.ndarray,
                  model: onnx.ModelProto | None) -> StoreResult | Blocker:
    nnz = int(np.count_nonzero(bits_of(weights)))
    size = sparse_bytes(nnz, weights.dtype.itemsize)
    if size >= weights.nbytes:
        return _not_smaller("sparse", size, weights, nnz)
    graph, kind, index = _stored_at(target)
    sparse = make_sparse(target.tensor_name, weights)
    if kind == "initializer":
        del graph.initializer[index]
        graph.sparse_initializer.append(sparse)
    else:
        set_constant_attribute(graph.node[index], helper.make_attribute("sparse_value", sparse))
    add_metadata_format(model, "sparse")
    return StoreResult("sparse", size)


def _store_compact(target: WeightTarget, weights: np.ndarray, pattern: Pattern,
                   model: onnx.ModelProto | None,
                   forms: tuple[str, ...] | None = None,
                   write_payload: DenseWriter | None = None) -> StoreResult | Blocker:
    axis = target.reduction_axis
    if not pattern.is_nm and _already_2_4(weights, axis):
        pattern = Pattern(2, 4)  # pruned before (a re-stored model): the N:M form competes
    m = pattern.m if pattern.is_nm else 0
    rows = chunk_rows(weights.shape, axis, m)
    chunks = [weights[start:stop] for start, stop in rows]
    plans = tensor_plans(chunks, axis, (pattern.n, pattern.m) if pattern.is_nm else None)
    if forms is not None:
        plans = [p for p in plans if p.kind in forms] or plans
    best = choose_plan(plans)
    if forms is None and best.bytes >= weights.nbytes:
        nnz = int(np.count_nonzero(bits_of(weights)))
        return _not_smaller("compact", best.bytes, weights, nnz, encoding=best.format)

    graph, kind, index = _stored_at(target)
    label = target.scope_label
    prefix = _unique_prefix(graph, REBUILD_PREFIX + (f"{label}/" if label else ""))
    opset = default_opset(model) if model is not None else None
    data_type = target.stored_tensor.data_type
    builder = TensorBuilder(prefix, best, data_type, axis, opset)
    chunk_metas, outputs = [], []
    for number, ((start, stop), chunk) in enumerate(zip(rows, chunks, strict=True)):
        payload = encode_chunk(chunk, best, axis)
        output = target.tensor_name if len(chunks) == 1 else f"{prefix}/c{number}/dense"
        builder.chunk(number, payload, output)
        chunk_meta = {"kind": payload.kind, "rows": [start, stop], "nnz": payload.params["nnz"]}
        if "layout" in payload.params:
            chunk_meta["layout"] = payload.params["layout"]
        chunk_metas.append(chunk_meta)
        outputs.append(output)
    if len(chunks) > 1:
        builder.op("Concat", outputs, target.tensor_name, axis=0)

    meta = {"version": 1, "tensor": target.tensor_name, "prefix": prefix,
            "format": best.format, "data_type": data_type,
            "shape": list(weights.shape), "stored_as": kind, **plan_meta(best, axis),
            "chunks": chunk_metas}
    if kind == "constant":
        meta["node_name"] = graph.node[index].name
    final = builder.nodes[-1]
    final.name = f"{prefix}/rebuild"
    final.doc_string = meta_doc(meta)
    value_info = helper.make_tensor_value_info(target.tensor_name, data_type, weights.shape)
    value_info.doc_string = COMPACT_MARK

    if kind == "initializer":
        del graph.initializer[index]
        position = 0
    else:
        del graph.node[index]
        position = index
    for offset, node in enumerate(builder.nodes):
        graph.node.insert(position + offset, node)
    size = sum(t.ByteSize() for t in builder.initializers) + \
        sum(n.ByteSize() for n in builder.nodes) + value_info.ByteSize()
    streamed: set[str] = set()
    if write_payload is not None:
        # the bytes must never be copied into the graph: protobuf frees a cleared field's
        # memory only with the whole model, so the model would grow by a payload per target
        for tensor in builder.initializers:
            if builder.arrays[tensor.name].nbytes >= STREAMED_PAYLOAD_BYTES:
                tensor.ClearField("raw_data")
                streamed.add(tensor.name)
    graph.initializer.extend(builder.initializers)
    if write_payload is not None:
        added = graph.initializer[len(graph.initializer) - len(builder.initializers):]
        for tensor in added:  # the graph's own copies, which the writer will look for
            if tensor.name in streamed:
                write_payload(tensor, builder.arrays[tensor.name])
    if not any(v.name == target.tensor_name for v in graph.value_info):
        graph.value_info.append(value_info)
    add_metadata_format(model, "compact")
    return StoreResult(best.format, size)


def _already_2_4(weights: np.ndarray, axis: int) -> bool:
    """Whether every aligned group of 4 along `axis` holds at most 2 non-zeros."""
    if weights.ndim == 0 or weights.shape[axis] % 4 or not weights.size:
        return False
    nonzero = (bits_of(weights) != 0).reshape(weights.shape)
    groups = np.moveaxis(nonzero, axis, -1).reshape(-1, 4)
    return bool((groups.sum(axis=1, dtype=np.int8) <= 2).all())


def _unique_prefix(graph: onnx.GraphProto, stem: str) -> str:
    """`stem` + `c<k>` with the smallest k that no name in the graph starts with."""
    taken = set()
    for name in defined_names(graph):
        if name.startswith(stem + "c"):
            head = name[len(stem) + 1:].split("/", 1)[0]
            if head.isdigit():
                taken.add(int(head))
    number = 0
    while number in taken:
        number += 1
    return f"{stem}c{number}"
