"""Find sparse and compact tensors in a model, and turn them back into dense ones.

Compact tensors are found by the JSON description on the node that produces them (its
doc_string starts with ``onnxprune:compact``); their rebuild nodes and payload are the
nodes and initializers named under the description's prefix. They are rebuilt in numpy
from the payload, independently of the ONNX rebuild graph. Sparse tensors are any
`sparse_initializer` entry and any Constant node with a `sparse_value`, whoever wrote them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import ModelLoadError
from ..graph import arity_problem, node_label
from ..io import read_array, tensor_nbytes
from ..io.load import check_sparse
from .compact import decode_chunk, parse_meta
from .graphs import (
    COMPACT_MARK,
    FLOAT_DATA_TYPES,
    FOUR_BIT_DATA_TYPES,
    REBUILT_AS,
    STORED_DATA_TYPES,
    make_tensor,
    remove_metadata_format,
    walk_graphs,
)
from .sparse import (
    constant_sparse_value,
    set_constant_attribute,
    sparse_to_dense,
    stored_sparse_bytes,
)

log = logging.getLogger(__name__)


@dataclass
class StoredInfo:
    """One tensor stored sparse or compact: what it is and how to get its dense values."""

    name: str  # the tensor's name in its graph
    format: str  # sparse, compact-gaps, compact-bitmask, compact-nm, compact-zeros
    bytes: int  # payload bytes it takes in the model (values, positions, indices)
    dense_bytes: int  # bytes the same tensor takes dense
    nnz: int  # stored non-zero bit patterns (a stored -0.0 counts)
    shape: tuple[int, ...]
    dtype: str
    source: str  # initializer, constant_node or subgraph:<node>
    _load: Callable[[], np.ndarray] = field(repr=False, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    def dense(self) -> np.ndarray:
        """The dense array, bit-identical to what the stored form rebuilds."""
        return self._load()


@dataclass
class _Found:
    info: StoredInfo
    graph: onnx.GraphProto
    kind: str  # sparse_initializer | sparse_constant | compact
    meta: dict | None = None

    @property
    def compact_meta(self) -> dict:
        """The description of a compact tensor (found with every compact one)."""
        if self.meta is None:
            raise ValueError(f"{self.info.name}: a {self.kind} tensor has no compact "
                             "description")
        return self.meta


def stored_formats(model: onnx.ModelProto, base_dir: str | os.PathLike = "."
                   ) -> dict[str, StoredInfo]:
    """Every sparse or compact tensor of the model, by tensor name.

    A name that repeats in another graph is keyed `<owning node>/<name>`, as in discovery.
    """
    found: dict[str, StoredInfo] = {}
    for item in _find(model, Path(base_dir)):
        key = item.info.name
        if key in found:
            key = f"{item.info.source.removeprefix('subgraph:')}/{key}"
        found[key] = item.info
    return found


def densify_model(model: onnx.ModelProto, base_dir: str | os.PathLike = ".") -> int:
    """Turn every sparse and compact tensor into a plain dense one, in place, bit-exact.

    Initializers become initializers again and Constant nodes Constant nodes with a
    `value`. Returns how many tensors were turned dense.
    """
    items = _find(model, Path(base_dir))
    for graph, _ in walk_graphs(model.graph):
        mine = [item for item in items if item.graph is graph]
        if mine:
            _densify_graph(graph, mine)
    if items:
        remove_metadata_format(model)
    return len(items)


def _find(model: onnx.ModelProto, base_dir: Path) -> list[_Found]:
    found: list[_Found] = []
    for graph, label in walk_graphs(model.graph):
        in_subgraph = graph is not model.graph
        source = f"subgraph:{label}" if in_subgraph else "initializer"
        initializers = None
        for sparse in graph.sparse_initializer:
            found.append(_Found(_sparse_info(sparse, source, base_dir), graph,
                                "sparse_initializer"))
        for position, node in enumerate(graph.node):
            sparse = constant_sparse_value(node)
            if sparse is not None:
                problem = arity_problem(node, node_label(node, position), {})
                if problem is not None:  # (a Constant without its one output)
                    raise ModelLoadError(problem)
                info = _sparse_info(sparse, source if in_subgraph else "constant_node",
                                    base_dir, node.output[0])
                found.append(_Found(info, graph, "sparse_constant"))
                continue
            meta = parse_meta(node.doc_string) if node.doc_string else None
            if meta is None:
                continue
            _check_meta(meta, node)
            if initializers is None:
                initializers = {t.name: t for t in graph.initializer}
            node_source = source if in_subgraph or meta["stored_as"] == "initializer" \
                else "constant_node"
            found.append(_Found(_compact_info(meta, initializers, node_source, base_dir),
                                graph, "compact", meta))
    return found


def _sparse_info(sparse: onnx.SparseTensorProto, source: str, base_dir: Path,
                 name: str | None = None) -> StoredInfo:
    check_sparse(sparse)  # (models built in memory were not checked by load_model)
    dtype = FLOAT_DATA_TYPES.get(sparse.values.data_type)
    dtype_name = str(dtype) if dtype is not None else \
        TensorProto.DataType.Name(sparse.values.data_type).lower()
    shape = tuple(int(d) for d in sparse.dims)
    nnz = math.prod(sparse.values.dims)
    itemsize = tensor_nbytes(sparse.values) // nnz if nnz else \
        (dtype.itemsize if dtype is not None else 0)
    return StoredInfo(name or sparse.values.name, "sparse", stored_sparse_bytes(sparse),
                      math.prod(shape) * itemsize, nnz, shape, dtype_name, source,
                      lambda: sparse_to_dense(sparse, base_dir))


def _compact_info(meta: dict, initializers: dict[str, TensorProto], source: str,
                  base_dir: Path) -> StoredInfo:
    dtype = STORED_DATA_TYPES[meta["data_type"]]
    # int4/uint4: decoded as the int8/uint8 the rebuild writes, then given their own type
    rebuilt = STORED_DATA_TYPES[REBUILT_AS.get(meta["data_type"], meta["data_type"])]
    stem = meta["prefix"] + "/"
    stored = sum(tensor_nbytes(t) for name, t in initializers.items() if name.startswith(stem))

    label = f"compact tensor {_short(meta['tensor'])!r}"

    def load() -> np.ndarray:
        def read(name: str) -> np.ndarray:
            if name not in initializers:
                raise ModelLoadError(f"{label}: payload {_short(name)!r} is missing from the "
                                     "graph")
            return read_array(initializers[name], base_dir)

        try:
            chunks = [decode_chunk(meta, number, chunk, rebuilt, read)
                      for number, chunk in enumerate(meta["chunks"])]
            dense = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)
            return dense.reshape(meta["shape"]).astype(dtype, copy=False)
        except (KeyError, IndexError, ValueError, TypeError, OverflowError) as exc:
            # the description and payload come from the file: what does not fit is corrupt
            text = str(exc).strip().splitlines()
            raise ModelLoadError(f"{label}: its stored form cannot be decoded "
                                 f"({type(exc).__name__}: {_short(text[0] if text else '')})"
                                 ) from exc

    shape = tuple(meta["shape"])
    nnz = sum(chunk.get("nnz", 0) for chunk in meta["chunks"])
    numel = math.prod(shape)
    dense_bytes = -(-numel // 2) if meta["data_type"] in FOUR_BIT_DATA_TYPES else \
        numel * dtype.itemsize
    return StoredInfo(meta["tensor"], meta["format"], stored, dense_bytes, nnz, shape,
                      str(dtype), source, load)


def _check_meta(meta: dict, node: onnx.NodeProto) -> None:
    """Refuse a compact description whose fields densify and inspect use directly are
    missing or of the wrong kind (the fields only decoding reads are checked by decoding)."""
    def fail(what: str) -> NoReturn:
        raise ModelLoadError(f"node {_short(node.name)!r}: its compact tensor description is "
                             f"corrupt ({what})")

    if not isinstance(meta, dict):
        fail("not a JSON object")
    for key in ("tensor", "prefix", "format"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            fail(f"{key!r} is not a name")
    if type(meta.get("data_type")) is not int or meta["data_type"] not in STORED_DATA_TYPES:
        fail(f"data_type {meta.get('data_type')!r} is not a float or 4/8/16-bit integer "
             "type")
    shape, chunks = meta.get("shape"), meta.get("chunks")
    if not isinstance(shape, list) or not shape or not all(_is_count(d) for d in shape) or \
            math.prod(shape) >= 2**59:
        fail(f"shape {_short(str(shape))}")
    if meta.get("stored_as") not in ("initializer", "constant"):
        fail(f"stored_as {_short(str(meta.get('stored_as')))}")
    if not isinstance(meta.get("node_name", ""), str):
        fail("node_name is not a name")
    # int4/uint4 values are stored 4 bits each, and each chunk says how many it holds
    four_bit = meta["data_type"] in FOUR_BIT_DATA_TYPES
    if meta.get("value_bits", 0) != (4 if four_bit else 0) or \
            type(meta.get("value_bits", 0)) is not int:
        fail(f"value_bits {_short(str(meta.get('value_bits')))} for data_type "
             f"{meta['data_type']}")
    if not isinstance(chunks, list) or not chunks:
        fail("no chunks")
    for chunk in chunks:
        rows = chunk.get("rows") if isinstance(chunk, dict) else None
        if not (isinstance(rows, list) and len(rows) == 2 and all(_is_count(r) for r in rows)
                and rows[0] <= rows[1] <= shape[0] and isinstance(chunk.get("kind"), str)
                and _is_count(chunk.get("nnz", 0))):
            fail(f"chunk {_short(str(chunk))}")
        values_shape = chunk.get("values_shape", [])
        if not (isinstance(values_shape, list) and all(_is_count(d) for d in values_shape)
                and math.prod(values_shape) < 2**59):
            fail(f"chunk {_short(str(chunk))}")


def _is_count(value) -> bool:
    return type(value) is int and value >= 0


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_rebuild_node(node: onnx.NodeProto, stem: str) -> bool:
    return node.name == stem + "rebuild" or any(o.startswith(stem) for o in node.output)


def _densify_graph(graph: onnx.GraphProto, items: list[_Found]) -> None:
    # Dense values first: decoding reads the payload that is removed below.
    dense = {id(item): item.info.dense() for item in items}
    for item in items:
        if item.kind == "sparse_constant":
            node = next(n for n in graph.node if constant_sparse_value(n) is not None
                        and n.output[0] == item.info.name)
            set_constant_attribute(node, helper.make_attribute(
                "value", make_tensor(item.info.name, dense[id(item)], doc=None)))

    if graph.sparse_initializer:
        for item in items:
            if item.kind == "sparse_initializer":
                graph.initializer.append(make_tensor(item.info.name, dense[id(item)], doc=None))
        del graph.sparse_initializer[:]

    compact = [item for item in items if item.kind == "compact"]
    if not compact:
        return
    stems = {item.compact_meta["prefix"] + "/": item for item in compact}
    # A Constant goes back where its rebuild began, which is where the Constant was.
    owners: list[_Found | None] = []
    first_node: dict[int, int] = {}
    for index, node in enumerate(graph.node):
        owner = next((item for stem, item in stems.items() if _is_rebuild_node(node, stem)),
                     None)
        owners.append(owner)
        if owner is not None:
            first_node.setdefault(id(owner), index)
    for index in reversed(range(len(graph.node))):
        owner = owners[index]
        if owner is None:
            continue
        if owner.compact_meta["stored_as"] == "constant" and first_node[id(owner)] == index:
            name = owner.info.name
            graph.node[index].CopyFrom(helper.make_node(
                "Constant", [], [name], name=owner.compact_meta.get("node_name", ""),
                value=make_tensor(name, dense[id(owner)], doc=None)))
        else:
            del graph.node[index]
    prefixes = tuple(stems)
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name.startswith(prefixes):
            del graph.initializer[index]
    names = {item.info.name for item in compact}
    for index in reversed(range(len(graph.value_info))):
        info = graph.value_info[index]
        if info.name in names and info.doc_string == COMPACT_MARK:
            del graph.value_info[index]
    for item in compact:
        if item.compact_meta["stored_as"] == "initializer":
            graph.initializer.append(make_tensor(item.info.name, dense[id(item)], doc=None))
