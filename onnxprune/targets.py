"""Find the prunable weights of a model and the axis along which each one reduces.

A `WeightTarget` is one stored tensor (an initializer, a Constant node's value, or either of
those inside an If/Loop/Scan body) together with the nodes that consume it. Every consumer
says which axis of the weight is its reduction (input-feature) axis; a weight is a target
only when all consumers agree. Everything else is reported as skipped, with its cause (a
`SkipCause` and its particulars, worded by `SkippedTensor.reason`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .config import DEFAULT_MIN_SIZE, Pattern
from .graph import (
    GraphIndex,
    StoredTensor,
    attribute,
    axis_through_transposes,
    is_onnx_domain,
)
from .io import FLOAT_TYPES, iter_chunks, read_array, tensor_nbytes
from .quantized import (
    Grid,
    QuantizedWeight,
    StaticValues,
    Unsupported,
    quantized_weight,
    weight_slot_of,
)

NORMALIZATION_OPS = {
    "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "LpNormalization",
}
RECURRENT_OPS = {"LSTM", "GRU", "RNN"}
CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}
ELEMENTWISE_BIAS_OPS = {"Add", "Sub"}


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
    # None only in a target made by hand for its metadata: `stored_tensor` is then an error
    tensor: TensorProto | None = field(repr=False, compare=False, default=None)
    # the graph that stores the tensor and its name there (for rewriting the storage)
    graph: onnx.GraphProto | None = field(repr=False, compare=False, default=None)
    tensor_name: str = ""
    scope_label: str = ""  # the subgraph that stores it, as `source` names it; "" if main
    # integer weights: how the stored integers map to the values pruned (`read_weights`)
    quant: QuantizedWeight | None = field(repr=False, compare=False, default=None)

    @property
    def stored_tensor(self) -> TensorProto:
        """The tensor that holds the weights (discovery always records it)."""
        if self.tensor is None:
            raise ValueError(f"target {self.name!r} was made without its stored tensor")
        return self.tensor

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.stored_tensor)

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


class SkipCause(enum.Enum):
    """Why a stored tensor is not a target; `SkippedTensor.detail` holds the particulars.

    The value is the stable name reports carry (the "cause" of a skipped entry); the words
    users read come from the cause and its detail (`SkippedTensor.reason`).
    """

    INTEGER = "integer"  # an integer or bool tensor
    NOT_FLOAT = "not_float"  # another type that is not floating point; detail: dtype
    UNUSED = "unused"
    GRAPH_OUTPUT = "graph_output"  # only returned by the graph
    ALSO_GRAPH_OUTPUT = "also_graph_output"  # consumed, and returned by the graph too
    UNKNOWN_OP = "unknown_op"  # consumed by an op of another domain; detail: op
    MATMUL_1D = "matmul_1d"  # a 1-D MatMul operand
    GEMM_NOT_2D = "gemm_not_2d"
    DATA_INPUT = "data_input"  # the data input of a Conv/ConvTranspose; detail: op
    LOW_RANK_WEIGHT = "low_rank_weight"  # a Conv weight of rank < 3; detail: op, rank
    RECURRENT_STATE = "recurrent_state"  # LSTM/GRU/RNN state or lengths; detail: op
    BIAS = "bias"
    NORMALIZATION = "normalization"  # a parameter of a normalization op
    NOT_WEIGHT_INPUT = "not_weight_input"  # detail: op
    EMBEDDING = "embedding"  # read by Gather and not named by --include
    AXIS_DISAGREES = "axis_disagrees"  # consumers reduce along different axes; detail: axes
    NOT_INCLUDED = "not_included"  # --include given and not matching
    EXCLUDED = "excluded"  # matched by --exclude
    BELOW_MIN_SIZE = "below_min_size"  # detail: numel, min_size
    # N:M pattern and a reduction axis (or a group of it) that M does not divide;
    # detail: length, per_group, group, pattern
    AXIS_NOT_MULTIPLE = "axis_not_multiple"
    OVERRIDE_SKIP = "override_skip"  # skip = true in a recipe override; detail: override
    # an integer weight of a quantization op that onnxprune cannot prune; detail: op, why
    QUANTIZED_FORM = "quantized_form"


# causes that the options, not the model, decide: a weight that would otherwise be a target
SELECTION_CAUSES = frozenset({SkipCause.NOT_INCLUDED, SkipCause.EXCLUDED,
                              SkipCause.BELOW_MIN_SIZE, SkipCause.AXIS_NOT_MULTIPLE})

# the words of each cause (str.format with the detail); AXIS_NOT_MULTIPLE is worded below
_REASONS = {
    SkipCause.INTEGER: "integer tensor",
    SkipCause.NOT_FLOAT: "{dtype} tensor",
    SkipCause.UNUSED: "unused",
    SkipCause.GRAPH_OUTPUT: "graph output",
    SkipCause.ALSO_GRAPH_OUTPUT: "also a graph output",
    SkipCause.UNKNOWN_OP: "consumed by {op}, which onnxprune does not know",
    SkipCause.MATMUL_1D: "1-D MatMul operand",
    SkipCause.GEMM_NOT_2D: "Gemm operand is not 2-D",
    SkipCause.DATA_INPUT: "{op} data input",
    SkipCause.LOW_RANK_WEIGHT: "{op} weight of rank {rank}",
    SkipCause.RECURRENT_STATE: "{op} state or sequence-length input",
    SkipCause.BIAS: "bias",
    SkipCause.NORMALIZATION: "normalization parameter",
    SkipCause.NOT_WEIGHT_INPUT: "not a weight input (consumed by {op})",
    SkipCause.EMBEDDING: "embedding (Gather); include it by name with --include to prune it",
    SkipCause.AXIS_DISAGREES: "consumers disagree on the reduction axis ({axes})",
    SkipCause.NOT_INCLUDED: "not matched by --include",
    SkipCause.EXCLUDED: "excluded by --exclude",
    SkipCause.BELOW_MIN_SIZE: "below --min-size ({numel} < {min_size} elements)",
    SkipCause.OVERRIDE_SKIP: "skipped by {override}",
    SkipCause.QUANTIZED_FORM: "quantized weight of {op} not supported: {why}",
}
# shorter words where the reason adds particulars in parentheses (counts per kind)
_SUMMARIES = {
    SkipCause.NOT_WEIGHT_INPUT: "not a weight input",
    SkipCause.EMBEDDING: "embedding",
    SkipCause.AXIS_DISAGREES: "consumers disagree on the reduction axis",
    SkipCause.BELOW_MIN_SIZE: "below --min-size",
    SkipCause.QUANTIZED_FORM: "quantized form not supported",
}


@dataclass(frozen=True)
class SkippedTensor:
    """A stored tensor that is not a target: why as a `SkipCause`, and its particulars."""

    name: str
    cause: SkipCause
    shape: tuple[int, ...] = ()
    dtype: str = ""
    source: str = ""
    detail: Mapping[str, object] = field(default_factory=dict, hash=False)

    @property
    def reason(self) -> str:
        """The cause in words, as reports and `inspect` show it."""
        if self.cause is SkipCause.AXIS_NOT_MULTIPLE:
            return f"{self._axis_words()} (pattern {self.detail['pattern']})"
        return _REASONS[self.cause].format(**self.detail)

    @property
    def summary(self) -> str:
        """The reason without its particulars in parentheses: what `inspect` counts."""
        if self.cause is SkipCause.AXIS_NOT_MULTIPLE:
            return self._axis_words(per_group=False)
        return _SUMMARIES.get(self.cause) or self.reason

    def _axis_words(self, per_group: bool = True) -> str:
        length, groups = self.detail["length"], self.detail["group"]
        each = self.detail["per_group"]
        if per_group and each != length:
            length = f"{length} ({each} per group of {groups})"
        return (f"reduction axis length {length} is not a multiple of "
                f"{self.axis_pattern.m}")

    @property
    def axis_pattern(self) -> Pattern:
        """The N:M pattern an AXIS_NOT_MULTIPLE skip was checked against (detail "pattern")."""
        pattern = self.detail.get("pattern")
        if not isinstance(pattern, Pattern):
            raise ValueError(f"{self.name}: skip {self.cause.value} records no pattern")
        return pattern


@dataclass(frozen=True)
class Selection:
    """Which discovered weights become targets (the part of PruneConfig discovery needs)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = DEFAULT_MIN_SIZE
    pattern: Pattern = Pattern()


# What a consumer slot means: ("weight", axis), ("embedding", axis) or
# ("skip", (SkipCause, detail)).
def _classify(node: onnx.NodeProto, slot: int, rank: int):
    op = node.op_type
    quantized = _classify_quantized(node, slot, rank)
    if quantized is not None:
        return quantized
    if not is_onnx_domain(node):
        return "skip", (SkipCause.UNKNOWN_OP, {"op": f"{node.domain}.{op}"})
    if op == "MatMul":
        if rank < 2:
            return "skip", (SkipCause.MATMUL_1D, {})
        return "weight", rank - 2 if slot == 1 else rank - 1
    if op == "Gemm":
        if slot == 2:
            return "skip", (SkipCause.BIAS, {})
        if rank != 2:
            return "skip", (SkipCause.GEMM_NOT_2D, {})
        if slot == 0:
            return "weight", 0 if attribute(node, "transA", 0) else 1
        return "weight", 1 if attribute(node, "transB", 0) else 0
    if op in ("Conv", "ConvTranspose"):
        if slot == 2:
            return "skip", (SkipCause.BIAS, {})
        if slot != 1:
            return "skip", (SkipCause.DATA_INPUT, {"op": op})
        if rank < 3:
            return "skip", (SkipCause.LOW_RANK_WEIGHT, {"op": op, "rank": rank})
        return "weight", 1 if op == "Conv" else 0
    if op in RECURRENT_OPS:
        if slot in (1, 2):
            return "weight", 2
        if slot == 3:
            return "skip", (SkipCause.BIAS, {})
        return "skip", (SkipCause.RECURRENT_STATE, {"op": op})
    if op == "Gather" and slot == 0:
        return "embedding", rank - 1
    if op in NORMALIZATION_OPS:
        return "skip", (SkipCause.NORMALIZATION, {})
    if op in ELEMENTWISE_BIAS_OPS and rank <= 1:
        return "skip", (SkipCause.BIAS, {})
    return "skip", (SkipCause.NOT_WEIGHT_INPUT, {"op": op})


def _classify_quantized(node: onnx.NodeProto, slot: int, rank: int):
    """The reduction axis of an integer weight at a quantization op's weight slot."""
    if not weight_slot_of(node, slot) or node.op_type == "DequantizeLinear":
        return None
    op = node.op_type
    if op in ("QLinearConv", "ConvInteger"):
        if rank < 3:
            return "skip", (SkipCause.LOW_RANK_WEIGHT, {"op": op, "rank": rank})
        return "weight", 1
    if op in ("QLinearMatMul", "MatMulInteger"):
        if rank < 2:
            return "skip", (SkipCause.MATMUL_1D, {})
        return "weight", rank - 2
    if op == "QGemm":
        if rank != 2:
            return "skip", (SkipCause.GEMM_NOT_2D, {})
        return "weight", 1 if attribute(node, "transB", 0) else 0
    if op == "DynamicQuantizeLSTM" and rank != 3:
        return "skip", (SkipCause.LOW_RANK_WEIGHT, {"op": op, "rank": rank})
    return "weight", 1  # MatMulNBits [N, K]; DynamicQuantizeLSTM [dirs, inputs, 4*hidden]


# which cause a weight with several skipping consumers is reported with (else the first's)
_SKIP_PRIORITY = (SkipCause.NORMALIZATION, SkipCause.BIAS)


def discover_targets(model: onnx.ModelProto, selection: Selection | None = None
                     ) -> tuple[list[WeightTarget], list[SkippedTensor]]:
    """All prunable weights of `model` and the stored tensors that were passed over, with why."""
    selection = selection or Selection()
    include = [re.compile(r) for r in selection.include]
    exclude = [re.compile(r) for r in selection.exclude]
    index = GraphIndex(model)
    targets: list[WeightTarget] = []
    skipped: list[SkippedTensor] = []
    names = _unique_names(index.stored)
    static = StaticValues(index.stored)

    for item, name in zip(index.stored, names, strict=True):
        tensor = item.tensor
        shape = tuple(int(d) for d in tensor.dims)
        dtype = FLOAT_TYPES.get(tensor.data_type)
        dtype_name = str(dtype) if dtype is not None else _type_name(tensor.data_type)
        source = _source(item)
        quant = None
        if dtype is None and _is_integer(tensor.data_type):
            try:
                quant = quantized_weight(item, static)
            except Unsupported as exc:
                skipped.append(SkippedTensor(name, SkipCause.QUANTIZED_FORM, shape,
                                             dtype_name, source,
                                             {"op": exc.op, "why": exc.why}))
                continue
            if quant is not None:
                shape, dtype_name = quant.shape, quant.dtype_name

        def skip(cause: SkipCause, detail: Mapping[str, object] | None = None, name=name,
                 shape=shape, dtype_name=dtype_name, source=source) -> None:
            skipped.append(SkippedTensor(name, cause, shape, dtype_name, source,
                                         dict(detail or {})))

        if dtype is None and quant is None:
            if _is_integer(tensor.data_type):
                skip(SkipCause.INTEGER)
            else:
                skip(SkipCause.NOT_FLOAT, {"dtype": dtype_name})
            continue
        rank = len(shape)
        uses, escapes = index.uses(item.name, item.scope)
        if not uses:
            skip(SkipCause.GRAPH_OUTPUT if escapes else SkipCause.UNUSED)
            continue
        if escapes:
            skip(SkipCause.ALSO_GRAPH_OUTPUT)
            continue
        verdicts = []
        for use in uses:
            kind, value = _classify(use.node, use.slot, rank)
            if kind in ("weight", "embedding"):
                value = axis_through_transposes(value, use.perms, rank)
            verdicts.append((kind, value, use))
        named = any(r.search(name) for r in include)
        declined = _skip_cause(verdicts, named)
        if declined:
            skip(*declined)
            continue
        axes = {value for _, value, _ in verdicts}
        if len(axes) > 1:
            skip(SkipCause.AXIS_DISAGREES, {"axes": sorted(axes)})
            continue
        if include and not named:
            skip(SkipCause.NOT_INCLUDED)
            continue
        if any(r.search(name) for r in exclude):
            skip(SkipCause.EXCLUDED)
            continue
        numel = int(np.prod(shape, dtype=np.int64))
        if numel < selection.min_size:
            skip(SkipCause.BELOW_MIN_SIZE, {"numel": numel, "min_size": selection.min_size})
            continue
        axis = axes.pop()
        first = verdicts[0][2].node
        is_conv = first.op_type in CONV_OPS
        group = int(attribute(first, "group", 1)) if is_conv else 1
        if selection.pattern.is_nm:
            m = selection.pattern.m
            # ConvTranspose keeps all groups on its reduction axis; a group of M must not
            # straddle two of them (Conv's axis is already one group's channels)
            per_group = shape[axis] // group if first.op_type == "ConvTranspose" else shape[axis]
            if shape[axis] % m or per_group % m:
                skip(SkipCause.AXIS_NOT_MULTIPLE, {"length": shape[axis], "per_group": per_group,
                                                   "group": group,
                                                   "pattern": selection.pattern})
                continue
        consumers = tuple(Consumer(use.node.name or use.node.op_type, use.node.op_type, use.slot)
                          for _, _, use in verdicts)
        targets.append(WeightTarget(name, first.op_type, shape, dtype_name, axis, source,
                                    consumers, group, tensor, item.scope.graph, item.name,
                                    "" if item.scope.is_main else item.scope.label, quant))
    return targets, skipped


def read_weights(target: WeightTarget, base_dir, writable: bool = False,
                 grid: Grid | None = None) -> np.ndarray:
    """The target's values in its shape: the stored tensor, or for a quantized weight its
    dequantized values (float32, always a new array; `grid`: its grid, if already read)."""
    if target.quant is None:
        return read_array(target.stored_tensor, base_dir, writable=writable)
    quant = target.quant
    return (grid or quant.grid(base_dir)).dequantize(
        quant.to_ints(read_array(target.stored_tensor, base_dir)))


def iter_weight_chunks(target: WeightTarget, base_dir, max_elements: int):
    """`read_weights`'s values flat, in read-only pieces of at most `max_elements`."""
    if target.quant is None:
        yield from iter_chunks(target.stored_tensor, base_dir, max_elements)
        return
    flat = read_weights(target, base_dir).reshape(-1)
    flat.flags.writeable = False
    for start in range(0, flat.size, max(1, int(max_elements))):
        yield flat[start:start + max_elements]


def stored_values(target: WeightTarget, weights: np.ndarray, base_dir,
                  grid: Grid | None = None) -> np.ndarray:
    """What to write into the target's stored tensor for these values: themselves, or for a
    quantized weight the grid's integers (a zero value is exactly the zero point) in the
    stored form (`grid`: its grid, if already read)."""
    if target.quant is None:
        return weights
    quant = target.quant
    ints = (grid or quant.grid(base_dir)).quantize(weights)
    return quant.to_stored(ints, read_array(target.stored_tensor, base_dir))


def _skip_cause(verdicts: Sequence, named: bool
                ) -> tuple[SkipCause, Mapping[str, object]] | None:
    """Why the consumers' verdicts make a tensor no target, or None."""
    kinds = [(kind, value) for kind, value, _ in verdicts]
    if any(kind == "embedding" for kind, _ in kinds) and not named:
        return SkipCause.EMBEDDING, {}
    declined = [value for kind, value in kinds if kind == "skip"]
    if not declined:
        return None
    for preferred in _SKIP_PRIORITY:
        for cause, detail in declined:
            if cause is preferred:
                return cause, detail
    return declined[0]


def _source(item: StoredTensor) -> str:
    """Where a stored tensor lives, as reports show it."""
    if not item.scope.is_main:
        return f"subgraph:{item.scope.label}"
    return "initializer" if item.kind == "initializer" else "constant_node"


def _unique_names(stored: Sequence[StoredTensor]) -> list[str]:
    """A name per stored tensor, unique over the model and independent of the selection.

    A tensor name stored once is used as it is. Sibling subgraphs (the two branches of an If)
    may reuse a name; then every occurrence outside the main graph is qualified by its
    subgraph path, e.g. ``If_1.then_branch/W``. Names computed up front, not as targets are
    taken, so --include/--exclude and saved masks see the same names whatever is selected.
    """
    counts: dict[str, int] = {}
    for item in stored:
        counts[item.name] = counts.get(item.name, 0) + 1
    names: list[str] = []
    seen: set[str] = set()
    for item in stored:
        name = item.name
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
