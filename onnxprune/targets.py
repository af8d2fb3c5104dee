"""Find the prunable weights of a model and the axis along which each one reduces.

A `WeightTarget` is one stored tensor (an initializer, a Constant node's value, or either of
those inside an If/Loop/Scan body) together with the nodes that consume it. Every consumer
says which axis of the weight is its reduction (input-feature) axis; a weight is a target
only when all consumers agree. Everything else is reported as skipped, with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .config import DEFAULT_MIN_SIZE, Pattern
from .errors import ModelLoadError
from .io import FLOAT_TYPES, tensor_nbytes

# Ops that pass a weight through unchanged in layout (Transpose is handled on its own).
PASS_THROUGH_OPS = {"Cast", "Identity", "DequantizeLinear", "CastLike"}
NORMALIZATION_OPS = {
    "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "LpNormalization",
}
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}
ELEMENTWISE_BIAS_OPS = {"Add", "Sub"}
SUBGRAPH_ATTRS = ("then_branch", "else_branch", "body")


@dataclass(frozen=True)
class Consumer:
    """One use of a weight: the node, its op, and the input slot the weight fills."""

    node: str
    op_type: str
    slot: int


@dataclass
class WeightTarget:
    """One prunable tensor and how to view it as a [outputs, inputs] matrix."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    dtype: str
    reduction_axis: int
    source: str
    consumers: tuple[Consumer, ...]
    group: int = 1
    tensor: TensorProto = field(repr=False, compare=False, default=None)
    # the graph that stores the tensor and its name there (for rewriting the storage)
    graph: onnx.GraphProto = field(repr=False, compare=False, default=None)
    tensor_name: str = ""

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.tensor)

    @property
    def reduction_length(self) -> int:
        return self.shape[self.reduction_axis]

    @property
    def matrix_rows(self) -> int:
        """Rows of `to_matrix`: the product of every axis but the reduction axis."""
        others = [d for i, d in enumerate(self.shape) if i != self.reduction_axis]
        return int(np.prod(others, dtype=np.int64))

    def to_matrix(self, array: np.ndarray) -> np.ndarray:
        """[rows, reduction] view: the reduction axis last, every other axis folded into rows.

        Conv [O, I, kh, kw] becomes [O*kh*kw, I], so N:M groups run along input channels.
        """
        moved = np.moveaxis(array, self.reduction_axis, -1)
        # rows spelled out: reshape(-1, 0) is ambiguous for a tensor with a zero dimension
        return moved.reshape(self.matrix_rows, self.reduction_length)

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        """Inverse of `to_matrix`, returned C-contiguous in the stored layout."""
        moved_shape = [d for i, d in enumerate(self.shape) if i != self.reduction_axis]
        moved = matrix.reshape(*moved_shape, self.shape[self.reduction_axis])
        return np.ascontiguousarray(np.moveaxis(moved, -1, self.reduction_axis))


@dataclass(frozen=True)
class SkippedTensor:
    name: str
    reason: str
    shape: tuple[int, ...] = ()
    dtype: str = ""
    source: str = ""


@dataclass(frozen=True)
class Selection:
    """Which discovered weights become targets (the part of PruneConfig discovery needs)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = DEFAULT_MIN_SIZE
    pattern: Pattern = Pattern()


@dataclass
class _Stored:
    """A tensor stored in some graph scope."""

    tensor_name: str
    tensor: TensorProto
    source: str
    scope: _Scope


@dataclass
class _Use:
    """A consumer reached from a stored tensor, with the Transpose permutations on the way."""

    node: onnx.NodeProto
    slot: int
    perms: tuple[tuple[int, ...], ...]


class _Scope:
    """One graph (main or a subgraph) with the names it defines and who consumes them."""

    def __init__(self, graph: onnx.GraphProto, parent: _Scope | None, label: str,
                 path: str = ""):
        self.graph = graph
        self.parent = parent
        self.label = label
        # "Loop_0.body/If_3.then_branch": tells apart sibling branches of one node
        self.path = path
        self.defined: set[str] = {i.name for i in graph.input}
        self.defined.update(t.name for t in graph.initializer)
        self.defined.update(t.name for t in graph.sparse_initializer if t.values.name)
        for node in graph.node:
            self.defined.update(o for o in node.output if o)
        # name -> [(consuming node, input slot, scope the node lives in)]
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int, _Scope]]] = {}
        # names defined here that some graph returns as an output
        self.escaping: set[str] = set()

    def owner_of(self, name: str) -> _Scope | None:
        scope: _Scope | None = self
        while scope is not None and name not in scope.defined:
            scope = scope.parent
        return scope


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _build_scopes(graph: onnx.GraphProto) -> tuple[list[_Scope], list[_Stored]]:
    """Walk the graph and its subgraphs; index consumers by the scope that defines a name."""
    scopes: list[_Scope] = []
    stored: list[_Stored] = []

    def walk(graph: onnx.GraphProto, parent: _Scope | None, label: str, path: str) -> None:
        scope = _Scope(graph, parent, label, path)
        scopes.append(scope)
        source = "initializer" if parent is None else f"subgraph:{label}"
        for tensor in graph.initializer:
            stored.append(_Stored(tensor.name, tensor, source, scope))
        for index, node in enumerate(graph.node):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        src = "constant_node" if parent is None else f"subgraph:{label}"
                        stored.append(_Stored(node.output[0], attr.t, src, scope))
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                owner = scope.owner_of(name)
                if owner is not None:
                    owner.consumers.setdefault(name, []).append((node, slot, scope))
            node_label = _node_label(node, index)
            node_path = f"{scope.path}/{node_label}" if scope.path else node_label
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, scope, node_label, f"{node_path}.{attr.name}")
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for position, sub in enumerate(attr.graphs):
                        walk(sub, scope, node_label, f"{node_path}.{attr.name}[{position}]")
        for out in graph.output:
            owner = scope.owner_of(out.name)
            if owner is not None:
                owner.escaping.add(out.name)

    walk(graph, None, "", "")
    return scopes, stored


def _uses(scope: _Scope, name: str, perms: tuple = (), depth: int = 0
          ) -> tuple[list[_Use], bool]:
    """Consumers of `name`, looking through layout-preserving ops and Transpose.

    Returns the uses and whether the value escapes as a graph output on the way.
    """
    uses: list[_Use] = []
    escapes = name in scope.escaping
    for node, slot, node_scope in scope.consumers.get(name, []):
        looks_through = (slot == 0 and depth < 8 and len(node.output) > 0 and node.output[0]
                         and (node.op_type in PASS_THROUGH_OPS or node.op_type == "Transpose"))
        if not looks_through:
            uses.append(_Use(node, slot, perms))
            continue
        step = perms + (tuple(_attr(node, "perm", ())),) if node.op_type == "Transpose" else perms
        inner, inner_escapes = _uses(node_scope, node.output[0], step, depth + 1)
        uses.extend(inner)
        escapes = escapes or inner_escapes
    return uses, escapes


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _axis_through_transposes(axis: int, perms: tuple[tuple[int, ...], ...], rank: int) -> int:
    """Map an axis of the value a consumer sees back to the stored tensor's axis."""
    for perm in reversed(perms):
        perm = perm or tuple(reversed(range(rank)))  # Transpose without perm reverses
        if sorted(perm) != list(range(rank)):
            raise ModelLoadError(f"a Transpose's perm {list(perm)} is not a permutation of "
                                 f"{rank} axes")
        axis = perm[axis]
    return axis


# What a consumer slot means: ("weight", axis_fn) or ("skip", reason).
def _classify(node: onnx.NodeProto, slot: int, rank: int):
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return "skip", f"consumed by {node.domain}.{op}, which onnxprune does not know"
    if op == "MatMul":
        if rank < 2:
            return "skip", "1-D MatMul operand"
        return "weight", rank - 2 if slot == 1 else rank - 1
    if op == "Gemm":
        if slot == 2:
            return "skip", "bias"
        if rank != 2:
            return "skip", "Gemm operand is not 2-D"
        if slot == 0:
            return "weight", 0 if _attr(node, "transA", 0) else 1
        return "weight", 1 if _attr(node, "transB", 0) else 0
    if op in ("Conv", "ConvTranspose"):
        if slot == 2:
            return "skip", "bias"
        if slot != 1:
            return "skip", f"{op} data input"
        if rank < 3:
            return "skip", f"{op} weight of rank {rank}"
        return "weight", 1 if op == "Conv" else 0
    if op in RECURRENT_OPS:
        if slot in (1, 2):
            return "weight", 2
        if slot == 3:
            return "skip", "bias"
        return "skip", f"{op} state or sequence-length input"
    if op == "Gather" and slot == 0:
        return "embedding", rank - 1
    if op in NORMALIZATION_OPS:
        return "skip", "normalization parameter"
    if op in ELEMENTWISE_BIAS_OPS and rank <= 1:
        return "skip", "bias"
    return "skip", f"not a weight input (consumed by {op})"


_SKIP_PRIORITY = ("embedding", "normalization parameter", "bias")


def discover_targets(model: onnx.ModelProto, selection: Selection | None = None
                     ) -> tuple[list[WeightTarget], list[SkippedTensor]]:
    """All prunable weights of `model` and the stored tensors that were passed over, with why."""
    selection = selection or Selection()
    include = [re.compile(r) for r in selection.include]
    exclude = [re.compile(r) for r in selection.exclude]
    scopes, stored = _build_scopes(model.graph)
    targets: list[WeightTarget] = []
    skipped: list[SkippedTensor] = []
    names = _unique_names(stored)

    for item, name in zip(stored, names, strict=True):
        tensor = item.tensor
        shape = tuple(int(d) for d in tensor.dims)
        dtype = FLOAT_TYPES.get(tensor.data_type)
        dtype_name = str(dtype) if dtype is not None else _type_name(tensor.data_type)

        def skip(reason: str, name=name, shape=shape, dtype_name=dtype_name, item=item) -> None:
            skipped.append(SkippedTensor(name, reason, shape, dtype_name, item.source))

        if dtype is None:
            kind = "integer tensor" if _is_integer(tensor.data_type) else f"{dtype_name} tensor"
            skip(kind)
            continue
        rank = len(shape)
        uses, escapes = _uses(item.scope, item.tensor_name)
        if not uses:
            skip("graph output" if escapes else "unused")
            continue
        if escapes:
            skip("also a graph output")
            continue
        verdicts = []
        for use in uses:
            kind, value = _classify(use.node, use.slot, rank)
            if kind in ("weight", "embedding"):
                value = _axis_through_transposes(value, use.perms, rank)
            verdicts.append((kind, value, use))
        named = any(r.search(name) for r in include)
        reason = _skip_reason(verdicts, named)
        if reason:
            skip(reason)
            continue
        axes = {value for _, value, _ in verdicts}
        if len(axes) > 1:
            skip(f"consumers disagree on the reduction axis ({sorted(axes)})")
            continue
        if include and not named:
            skip("not matched by --include")
            continue
        if any(r.search(name) for r in exclude):
            skip("excluded by --exclude")
            continue
        numel = int(np.prod(shape, dtype=np.int64))
        if numel < selection.min_size:
            skip(f"below --min-size ({numel} < {selection.min_size} elements)")
            continue
        axis = axes.pop()
        first = verdicts[0][2].node
        group = int(_attr(first, "group", 1)) if first.op_type in ("Conv", "ConvTranspose") else 1
        if selection.pattern.is_nm:
            m = selection.pattern.m
            # ConvTranspose keeps all groups on its reduction axis; a group of M must not
            # straddle two of them (Conv's axis is already one group's channels)
            per_group = shape[axis] // group if first.op_type == "ConvTranspose" else shape[axis]
            if shape[axis] % m or per_group % m:
                length = (f"{shape[axis]} ({per_group} per group of {group})"
                          if per_group != shape[axis] else f"{shape[axis]}")
                skip(f"reduction axis length {length} is not a multiple of {m}"
                     f" (pattern {selection.pattern})")
                continue
        consumers = tuple(Consumer(use.node.name or use.node.op_type, use.node.op_type, use.slot)
                          for _, _, use in verdicts)
        targets.append(WeightTarget(name, first.op_type, shape, dtype_name, axis, item.source,
                                    consumers, group, tensor, item.scope.graph,
                                    item.tensor_name))
    return targets, skipped


def _skip_reason(verdicts: Sequence, named: bool) -> str | None:
    kinds = [(kind, value) for kind, value, _ in verdicts]
    if any(kind == "embedding" for kind, _ in kinds) and not named:
        return "embedding (Gather); include it by name with --include to prune it"
    reasons = [value for kind, value in kinds if kind == "skip"]
    if not reasons:
        return None
    for preferred in _SKIP_PRIORITY[1:]:
        if preferred in reasons:
            return preferred
    return reasons[0]


def _unique_names(stored: Sequence[_Stored]) -> list[str]:
    """A name per stored tensor, unique over the model and independent of the selection.

    A tensor name stored once is used as it is. Sibling subgraphs (the two branches of an If)
    may reuse a name; then every occurrence outside the main graph is qualified by its
    subgraph path, e.g. ``If_1.then_branch/W``. Names computed up front, not as targets are
    taken, so --include/--exclude and saved masks see the same names whatever is selected.
    """
    counts: dict[str, int] = {}
    for item in stored:
        counts[item.tensor_name] = counts.get(item.tensor_name, 0) + 1
    names: list[str] = []
    seen: set[str] = set()
    for item in stored:
        name = item.tensor_name
        if counts[name] > 1 and item.scope.path:
            name = f"{item.scope.path}/{name}"
        unique, suffix = name, 1
        while unique in seen:  # only for models that already break single assignment
            suffix += 1
            unique = f"{name}#{suffix}"
        seen.add(unique)
        names.append(unique)
    return names


def _is_integer(data_type: int) -> bool:
    return data_type in {
        TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
        TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
        TensorProto.INT4, TensorProto.UINT4, TensorProto.BOOL,
    }


def _type_name(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type).lower()
