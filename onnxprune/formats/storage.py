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
- Quantized weights are stored as their integers. Packed int4/uint4 weights (ONNX INT4 and
  UINT4 tensors, read by DequantizeLinear) are rebuilt as int8/uint8 by the usual forms, from
  values stored two to a byte, then converted to the packed type under the tensor's own
  name: a Cast from opset 21 on, below it onnxruntime's com.microsoft QuantizeLinear (scale
  1, zero point 0: exact on integers; the models that read int4 there use that domain's
  DequantizeLinear already). The DequantizeLinear, its scale and its zero point are left as
  they are, so a zero point shared with other weights is no obstacle. They stay dense as
  sparse tensors (onnxruntime 1.32 cannot load int4 sparse tensors), and with zero points
  that are not 0 (as int8 ones do: their pruned weights are not zero bits; logged as a
  warning). MatMulNBits stays dense: its 4-bit blocks are read by the op itself, with no
  DequantizeLinear in front where a rebuild could go.

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
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..config import Pattern
from ..graph import defined_names
from ..io import read_array, uses_external_data, write_array
from ..quantized import MS_DOMAIN, unpack_nibbles
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
    FOUR_BIT_DATA_TYPES,
    INTEGER_DATA_TYPES,
    REBUILD_PREFIX,
    REBUILT_AS,
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
    PACKED = "packed"  # MatMulNBits: packed 4-bit blocks read by the op itself
    SPARSE_FOUR_BIT = "sparse_four_bit"  # int4/uint4 as an ONNX sparse tensor
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
    DenseCause.PACKED: "MatMulNBits reads its packed 4-bit blocks itself, with no "
                       "DequantizeLinear before it where a compact or sparse form could be "
                       "rebuilt, so they are stored dense",
    DenseCause.SPARSE_FOUR_BIT: "onnxruntime cannot load int4/uint4 sparse tensors (use "
                                "--format compact)",
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
CAST_FOUR_BIT_MIN_OPSET = 21  # Cast to int4/uint4; below, com.microsoft QuantizeLinear


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
        return _store_packed(target, weights, fmt, pattern, model, write_dense, forms,
                             write_payload)
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


def _not_smaller(fmt: str, size: int, weights: np.ndarray, nnz: int, dense_bytes: int,
                 **detail: object) -> Blocker:
    return Blocker(DenseCause.NOT_SMALLER, {"format": fmt, "bytes": size,
                                            "dense_bytes": dense_bytes,
                                            "sparsity": 1 - nnz / weights.size, **detail})


def _store_packed(target: WeightTarget, weights: np.ndarray, fmt: str, pattern: Pattern | None,
                  model: onnx.ModelProto | None, write_dense: DenseWriter,
                  forms: tuple[str, ...] | None,
                  write_payload: DenseWriter | None) -> StoreResult:
    """A weight of packed 4-bit integers, given as its raw bytes: int4/uint4 compact where it
    can be, dense otherwise (MatMulNBits always)."""
    quant = target.quant
    assert quant is not None  # (store checked)
    blocker = None
    if fmt != "dense":
        if quant.bits:
            blocker = Blocker(DenseCause.PACKED)
        elif fmt == "sparse":
            blocker = Blocker(DenseCause.SPARSE_FOUR_BIT)
        else:
            ints = _four_bit_ints(target, weights)
            blocker = _blocker(target, ints, fmt, model) or _four_bit_blocker(target, model)
            if blocker is None:
                result = _store_compact(target, ints, pattern or Pattern(), model, forms,
                                        write_payload)
                if isinstance(result, StoreResult):
                    return result
                blocker = result
        (log.warning if blocker.cause is DenseCause.ZERO_POINT else log.info)(
            "%s: stays dense: %s", target.name, blocker.reason)
    write_dense(target.stored_tensor, weights)
    return StoreResult("dense", weights.nbytes, blocker)


def _four_bit_ints(target: WeightTarget, raw: np.ndarray) -> np.ndarray:
    """The integers of an int4/uint4 weight's raw bytes, int8/uint8 in its shape."""
    tensor = target.stored_tensor
    shape = tuple(int(d) for d in tensor.dims)
    numel = math.prod(shape)
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != -(-numel // 2):
        raise ValueError(f"{target.name}: weights {raw.dtype}{raw.shape} are not the "
                         f"{-(-numel // 2)} packed bytes of {shape}")
    return unpack_nibbles(raw, numel, tensor.data_type == TensorProto.INT4).reshape(shape)


def _four_bit_blocker(target: WeightTarget, model: onnx.ModelProto | None) -> Blocker | None:
    """Why an int4/uint4 weight cannot be compact beyond what `_blocker` checks, or None."""
    quant = target.quant
    assert quant is not None
    # an external zero point is not read here: where it is not 0, the pruned weights are
    # not zero bits and compact is not smaller, which `_store_compact` finds
    zero = quant.zero_point
    if zero is not None and not uses_external_data(zero) and \
            np.any(read_array(zero, Path(".")).astype(np.int8)):
        return Blocker(DenseCause.ZERO_POINT)
    opset = default_opset(model) if model is not None else None
    if model is not None and (opset is None or opset < CAST_FOUR_BIT_MIN_OPSET) and \
            not any(entry.domain == MS_DOMAIN for entry in model.opset_import):
        return Blocker(DenseCause.COMPACT_NEEDS_OPSET,
                       {"opset": opset, "needed": CAST_FOUR_BIT_MIN_OPSET})
    return None


def _store_sparse(target: WeightTarget, weights: np.ndarray,
                  model: onnx.ModelProto | None) -> StoreResult | Blocker:
    nnz = int(np.count_nonzero(bits_of(weights)))
    size = sparse_bytes(nnz, weights.dtype.itemsize)
    if size >= weights.nbytes:
        return _not_smaller("sparse", size, weights, nnz, weights.nbytes)
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
    """`weights` in the smallest compact form, or why not; int4/uint4 weights come as their
    int8/uint8 integers and are rebuilt in that type, then converted (`_to_four_bit`)."""
    axis = target.reduction_axis
    data_type = target.stored_tensor.data_type
    four_bit = data_type in FOUR_BIT_DATA_TYPES
    value_bits = 4 if four_bit else 0
    dense_bytes = -(-weights.size // 2) if four_bit else weights.nbytes
    if not pattern.is_nm and _already_2_4(weights, axis):
        pattern = Pattern(2, 4)  # pruned before (a re-stored model): the N:M form competes
    m = pattern.m if pattern.is_nm else 0
    rows = chunk_rows(weights.shape, axis, m)
    chunks = [weights[start:stop] for start, stop in rows]
    plans = tensor_plans(chunks, axis, (pattern.n, pattern.m) if pattern.is_nm else None,
                         value_bits)
    if forms is not None:
        plans = [p for p in plans if p.kind in forms] or plans
    best = choose_plan(plans)
    if forms is None and best.bytes >= dense_bytes:
        nnz = int(np.count_nonzero(bits_of(weights)))
        return _not_smaller("compact", best.bytes, weights, nnz, dense_bytes,
                            encoding=best.format)

    graph, kind, index = _stored_at(target)
    label = target.scope_label
    prefix = _unique_prefix(graph, REBUILD_PREFIX + (f"{label}/" if label else ""))
    opset = default_opset(model) if model is not None else None
    builder = TensorBuilder(prefix, best, REBUILT_AS.get(data_type, data_type), axis, opset,
                            value_bits)
    rebuilt = f"{prefix}/rebuilt" if four_bit else target.tensor_name
    chunk_metas, outputs = [], []
    for number, ((start, stop), chunk) in enumerate(zip(rows, chunks, strict=True)):
        payload = encode_chunk(chunk, best, axis)
        output = rebuilt if len(chunks) == 1 else f"{prefix}/c{number}/dense"
        builder.chunk(number, payload, output)
        chunk_meta = {"kind": payload.kind, "rows": [start, stop], "nnz": payload.params["nnz"]}
        for key in ("layout", "values_shape"):
            if key in payload.params:
                chunk_meta[key] = payload.params[key]
        chunk_metas.append(chunk_meta)
        outputs.append(output)
    if len(chunks) > 1:
        builder.op("Concat", outputs, rebuilt, axis=0)
    if four_bit:
        _to_four_bit(builder, rebuilt, target.tensor_name, data_type, opset)

    meta = {"version": 1, "tensor": target.tensor_name, "prefix": prefix,
            "format": best.format, "data_type": data_type,
            "shape": list(weights.shape), "stored_as": kind, **plan_meta(best, axis),
            "chunks": chunk_metas}
    if four_bit:
        meta["value_bits"] = value_bits
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


def _to_four_bit(builder: TensorBuilder, rebuilt: str, output: str, data_type: int,
                 opset: int | None) -> None:
    """`rebuilt` (int8/uint8) converted to `data_type` (int4/uint4) as `output`: Cast from
    opset 21 on, onnxruntime's QuantizeLinear with scale 1 and zero point 0 below it."""
    if opset is None or opset >= CAST_FOUR_BIT_MIN_OPSET:
        builder.op("Cast", [rebuilt], output, to=data_type)
        return
    floats = builder.op("Cast", [rebuilt], to=TensorProto.FLOAT)
    zero = builder.const(np.zeros((), FOUR_BIT_DATA_TYPES[data_type]))
    builder.op("QuantizeLinear", [floats, builder.const(np.float32(1)), zero], output,
               domain=MS_DOMAIN)


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
