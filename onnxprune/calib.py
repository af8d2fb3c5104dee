"""Calibration: the inputs, the capture of each target's layer inputs through onnxruntime, and
the streaming statistics kept of them.

**The OBS matrix.** Every calibrated method sees a target as W2 [outputs, inputs] per group
and its calibration inputs as X [tokens, inputs], so that the layer's output (before any
bias) is X·W2ᵀ. MatMul / Gemm: W2 is `WeightTarget.to_matrix` (outputs × reduction axis) and
X the other operand with its reduction axis last and every other axis folded into tokens.
Conv with weight [O, I/g, k1, k2, ...]: one matrix per group g, W2_g [O/g, k1·k2·…·I/g] whose
columns run over kernel offsets (slowest) then input channels (fastest), so that M
consecutive columns are M consecutive input channels at one kernel offset, which is exactly an
N:M group along the input-channel axis. X_g is the im2col of the input, with the same column
order, one row per (batch item, output position), honouring strides, pads, auto_pad and
dilations.

**Capture.** The inputs are read from onnxruntime, never computed by hand: the graph is
cut into stages, each stage is a small ONNX model whose outputs are the values the later
stages need plus the inputs of the targets' consumer nodes, and it runs over every
calibration sample. Only running sums are kept per target input: ‖X_j‖² for every input
feature and, where asked, H = XᵀX (float64 sums of float32 products over chunks of at most
`CHUNK_ROWS` tokens). The activations themselves are dropped as soon as they are added.

**Stages.** In sequential mode a target's *level* is the number of target layers on the
longest path before it; stage k holds the nodes that need the pruned weights of level k−1,
so the targets of level k are captured on the model already pruned up to level k−1, as
SparseGPT does block by block. The values crossing a cut (the residual stream of a
transformer, masks) are kept per sample between stages. Cost: each node still runs once per
sample, but there is one onnxruntime session per level (a few ms to a few hundred ms each)
and the values that cross a cut are held in memory. One-pass mode runs the whole graph once,
captures every target on the dense model and holds all targets' statistics at once.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from .errors import CalibrationError
from .graph import GraphIndex, attribute, is_onnx_domain
from .inputs import Feed, load_npz_inputs, synthetic_inputs
from .io import LoadedModel
from .runtime import create_session, session_options
from .runtime import first_line as _first_line
from .targets import WeightTarget

log = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_SAMPLES = 16
# Tokens per chunk when summing XᵀX: float32 products over at most this many rows, then
# added into float64.
CHUNK_ROWS = 2048
CHUNK_ELEMENTS = 1 << 22  # and at most this many floats per chunk (im2col of large inputs)


# --------------------------------------------------------------------------- inputs

def load_calibration(path: str | os.PathLike | None, model: onnx.ModelProto,
                     samples: int | None = None, seed: int = 0) -> list[Feed]:
    """Calibration feeds from an `.npz` or a folder of them; synthetic ones when `path` is None.

    The synthetic fallback (random values, `samples` of them, 16 by default) makes every
    calibrated method run, but its statistics describe noise, not data: a warning says so.
    """
    if path is not None:
        return load_npz_inputs(path, model, samples)
    count = DEFAULT_SYNTHETIC_SAMPLES if samples is None else samples
    log.warning("no calibration data given (--calib): calibrating on %d synthetic random "
                "samples; pruning quality will reflect noise, not your data", count)
    return synthetic_inputs(model, count, seed)


# --------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class MatrixInput:
    """A MatMul / Gemm operand: reduction axis last (second to last if `transposed`)."""

    features: int
    transposed: bool = False

    groups = 1

    def rows(self, activation: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(group, X chunk [tokens, features] float32) pairs covering the activation."""
        array = np.asarray(activation)
        if self.transposed and array.ndim >= 2:
            array = np.swapaxes(array, -1, -2)
        if array.shape[-1:] != (self.features,):
            raise CalibrationError(f"layer input of shape {list(np.shape(activation))} does not "
                                   f"have {self.features} input features where expected")
        matrix = array.reshape(-1, self.features)
        step = max(1, min(CHUNK_ROWS, CHUNK_ELEMENTS // max(1, self.features)))
        for start in range(0, matrix.shape[0], step):
            yield 0, np.ascontiguousarray(matrix[start:start + step], dtype=np.float32)


@dataclass(frozen=True)
class ConvInput:
    """A Conv data input, seen through im2col with the weight's column order."""

    channels: int  # input channels per group
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begin pads, then end pads (ONNX order)
    auto_pad: str = "NOTSET"

    @property
    def features(self) -> int:
        return math.prod(self.kernel) * self.channels

    def geometry(self, spatial: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...],
                                                        tuple[int, ...]]:
        """Output spatial shape, begin pads and end pads for an input of `spatial` shape."""
        rank = len(self.kernel)
        spans = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = tuple(-(-size // s) for size, s in zip(spatial, self.strides, strict=True))
            totals = [max(0, (o - 1) * s + span - size) for o, s, span, size
                      in zip(out, self.strides, spans, spatial, strict=True)]
            small = [t // 2 for t in totals]
            large = [t - t // 2 for t in totals]
            begin, end = (small, large) if self.auto_pad == "SAME_UPPER" else (large, small)
            return out, tuple(begin), tuple(end)
        if self.auto_pad == "VALID":
            begin = end = (0,) * rank
        else:
            begin, end = self.pads[:rank], self.pads[rank:]
        out = tuple((size + b + e - span) // s + 1 for size, b, e, span, s
                    in zip(spatial, begin, end, spans, self.strides, strict=True))
        return out, tuple(begin), tuple(end)

    def rows(self, activation: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(group, im2col chunk [positions, features] float32), per batch item and group."""
        x = np.asarray(activation)
        rank = len(self.kernel)
        if x.ndim != rank + 2 or x.shape[1] != self.channels * self.groups:
            raise CalibrationError(f"Conv input of shape {list(x.shape)} does not have "
                                   f"{self.channels * self.groups} channels and {rank} "
                                   "spatial axes")
        out, begin, end = self.geometry(x.shape[2:])
        if min(out) <= 0:
            return
        offsets = list(itertools.product(*(range(k) for k in self.kernel)))
        per_first = math.prod(out[1:]) * self.features
        step = max(1, CHUNK_ELEMENTS // max(1, per_first))
        pad_width = [(0, 0)] + list(zip(begin, end, strict=True))
        for item in range(x.shape[0]):
            for group in range(self.groups):
                channels = x[item, group * self.channels:(group + 1) * self.channels]
                padded = np.pad(channels.astype(np.float32, copy=False), pad_width)
                for first in range(0, out[0], step):
                    count = min(step, out[0] - first)
                    part = (count,) + out[1:]
                    columns = np.empty(part + (len(offsets), self.channels), dtype=np.float32)
                    for index, offset in enumerate(offsets):
                        window = [slice(None)]
                        for axis in range(rank):
                            origin = offset[axis] * self.dilations[axis]
                            if axis == 0:
                                origin += first * self.strides[0]
                            window.append(slice(origin,
                                                origin + (part[axis] - 1) * self.strides[axis] + 1,
                                                self.strides[axis]))
                        columns[..., index, :] = np.moveaxis(padded[tuple(window)], 0, -1)
                    yield group, columns.reshape(-1, self.features)


Layout = MatrixInput | ConvInput


def layer_inputs(layout: Layout, activation: np.ndarray) -> list[np.ndarray]:
    """The whole X [tokens, features] of each group for one activation (for tests/tools)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(layout.groups)]
    for group, rows in layout.rows(activation):
        parts[group].append(rows)
    return [np.concatenate(p) if p else np.zeros((0, layout.features), np.float32)
            for p in parts]


# --------------------------------------------------------------------------- statistics

class ActivationStats:
    """Running sums over calibration tokens of one layer input: ‖X_j‖² and optionally XᵀX."""

    def __init__(self, groups: int, features: int, hessian: bool):
        self.groups = groups
        self.features = features
        self.tokens = 0
        self.nonfinite = 0
        self._sq_norms = np.zeros((groups, features), dtype=np.float64)
        self.hessian = (np.zeros((groups, features, features), dtype=np.float64)
                        if hessian else None)

    def add(self, group: int, rows: np.ndarray) -> None:
        """Add a chunk of tokens [n, features] (float32) of one group."""
        if not np.isfinite(rows).all():
            bad = ~np.isfinite(rows).all(axis=1)
            self.nonfinite += int(bad.sum())
            rows = rows[~bad]
        if group == 0:
            self.tokens += rows.shape[0]
        if self.hessian is not None:
            gram = rows.T @ rows
            self.hessian[group] += gram
        else:
            self._sq_norms[group] += np.einsum("ij,ij->j", rows, rows)

    def add_activation(self, layout: Layout, activation: np.ndarray) -> None:
        for group, rows in layout.rows(activation):
            self.add(group, rows)

    @property
    def sq_norms(self) -> np.ndarray:
        """‖X_j‖² per group and input feature, [groups, features] float64."""
        if self.hessian is not None:
            return np.diagonal(self.hessian, axis1=1, axis2=2).copy()
        return self._sq_norms

    def merge(self, other: ActivationStats) -> None:
        """Add another consumer's sums (a weight shared by several nodes)."""
        self.tokens += other.tokens
        self.nonfinite += other.nonfinite
        self._sq_norms += other._sq_norms
        if self.hessian is not None and other.hessian is not None:
            self.hessian += other.hessian


def relative_output_error(original: np.ndarray, pruned: np.ndarray,
                          hessian: np.ndarray) -> tuple[float, float]:
    """(‖ΔW Xᵀ‖², ‖W Xᵀ‖²) for W [rows, features] given H = XᵀX, computed as traces with H."""
    hessian32 = hessian.astype(np.float32)
    original = np.asarray(original, dtype=np.float32)
    delta = original - np.asarray(pruned, dtype=np.float32)
    error = float(np.einsum("ij,ij->", delta @ hessian32, delta, dtype=np.float64))
    total = float(np.einsum("ij,ij->", original @ hessian32, original, dtype=np.float64))
    return max(error, 0.0), max(total, 0.0)


# --------------------------------------------------------------------------- target views

@dataclass
class TargetView:
    """One target as OBS matrices [groups, outputs/groups, features], and where its inputs are.

    `inputs` holds one (activation name, layout) per consumer node; the weight sees the sum
    of their statistics. `consumers` are the consumer nodes' indices in the main graph's
    `Dataflow.nodes`.
    """

    target: WeightTarget
    inputs: tuple[tuple[str, Layout], ...]
    consumers: tuple[int, ...]  # indices into `GraphIndex.dataflow.nodes`
    groups: int = 1
    features: int = 0

    def to_obs(self, weights: np.ndarray) -> np.ndarray:
        """The weights as float32 [groups, rows, features] (a new array)."""
        weights = np.asarray(weights)
        if self.target.op_type == "Conv":
            out_channels, channels = weights.shape[:2]
            grouped = weights.reshape(self.groups, out_channels // self.groups, channels,
                                      -1)
            moved = np.swapaxes(grouped, 2, 3)  # [g, O/g, kernel positions, channels]
            return np.ascontiguousarray(moved, dtype=np.float32).reshape(
                self.groups, out_channels // self.groups, self.features)
        return np.ascontiguousarray(self.target.to_matrix(weights), dtype=np.float32)[None]

    def from_obs(self, matrices: np.ndarray) -> np.ndarray:
        """Inverse of `to_obs`: the stored layout (dtype kept), C-contiguous."""
        if self.target.op_type == "Conv":
            shape = self.target.shape
            out_channels, channels = shape[:2]
            positions = math.prod(shape[2:])
            grouped = matrices.reshape(self.groups, out_channels // self.groups, positions,
                                       channels)
            return np.ascontiguousarray(np.swapaxes(grouped, 2, 3)).reshape(shape)
        return self.target.from_matrix(matrices[0])


def target_view(target: WeightTarget, index: GraphIndex) -> TargetView | str:
    """How `target` lines up with its consumers' inputs, or why it cannot be calibrated."""
    if target.graph is not index.model.graph or target.source not in ("initializer",
                                                                      "constant_node"):
        return f"stored in {target.source}; only main-graph weights can be calibrated"
    uses, _ = index.uses(target.tensor_name)
    if any(not use.scope.is_main for use in uses):
        return "some consumers sit inside subgraphs, whose inputs cannot be captured"
    flow = index.dataflow
    inputs, nodes, consumers = [], [], []
    groups = 1
    features = None
    for use in uses:
        node, slot = use.node, use.slot
        layout, activation = None, None
        if node.op_type == "MatMul" and is_onnx_domain(node):
            if any(d != 1 for d in target.shape[:-2]):
                return "MatMul weight with batch dimensions"
            activation = node.input[1 - slot]
            layout = MatrixInput(target.reduction_length, transposed=slot == 0)
        elif node.op_type == "Gemm" and is_onnx_domain(node) and slot in (0, 1):
            activation = node.input[1 - slot]
            if slot == 1:
                transposed = bool(attribute(node, "transA", 0))
            else:
                transposed = not attribute(node, "transB", 0)
            layout = MatrixInput(target.reduction_length, transposed=transposed)
        elif node.op_type == "Conv" and is_onnx_domain(node) and slot == 1:
            if use.perms:
                return "Conv weight reached through a Transpose"
            groups = int(attribute(node, "group", 1))
            rank = len(target.shape) - 2
            kernel = tuple(int(k) for k in target.shape[2:])
            layout = ConvInput(
                channels=int(target.shape[1]), groups=groups, kernel=kernel,
                strides=tuple(attribute(node, "strides", [1] * rank)),
                dilations=tuple(attribute(node, "dilations", [1] * rank)),
                pads=tuple(attribute(node, "pads", [0] * (2 * rank))),
                auto_pad=_text(attribute(node, "auto_pad", "NOTSET")))
            activation = node.input[0]
            if target.shape[0] % groups:
                return f"Conv with {target.shape[0]} outputs and group={groups}"
        else:
            return f"{node.op_type} consumers are not supported by calibrated methods"
        if activation in flow.static:
            return "the layer input is a constant"
        if features is not None and layout.features != features:
            return "consumers disagree on the number of input features"
        features = layout.features
        inputs.append((activation, layout))
        nodes.append(node)
        consumers.append(flow.index_of(use))
    ops = {n.op_type for n in nodes}
    if "Conv" in ops and len(ops) > 1:
        return "weight used both by Conv and by other ops"
    return TargetView(target, tuple(inputs), tuple(consumers), groups, features or 0)


# --------------------------------------------------------------------------- capture

@dataclass
class Stage:
    """One cut of the graph: its nodes, and the targets whose statistics are complete after it."""

    number: int
    nodes: list[int]
    reads: list[str]  # values it takes from earlier stages or the feeds
    outputs: list[str]  # values it hands to later stages or to the statistics
    captures: list[str]  # activations whose statistics are summed during this stage
    views: list[TargetView]  # targets complete after this stage


class ActivationCapture:
    """Runs the graph stage by stage over the calibration feeds, summing layer-input stats.

    Iterate `stages()`: after each stage is yielded its targets' statistics are complete
    (`stats_of(view)`); write their pruned weights into the model before asking for the next
    stage, which is built from the model as it is then. `release(view)` frees the sums.
    """

    def __init__(self, loaded: LoadedModel, index: GraphIndex, views: Sequence[TargetView],
                 feeds: Sequence[Feed], *, sequential: bool = True, hessian: bool = True):
        if not feeds:
            raise CalibrationError("no calibration samples")
        self.loaded = loaded
        self.index = index
        self.views = list(views)
        self.feeds = list(feeds)
        self.hessian = hessian
        self._stats: dict[tuple[str, Layout], ActivationStats] = {}
        self._pending: dict[tuple[str, Layout], int] = {}
        for view in self.views:
            for key in view.inputs:
                self._pending[key] = self._pending.get(key, 0) + 1
        self.stage_list = self._plan(sequential)

    @property
    def levels(self) -> int:
        return len(self.stage_list)

    def _plan(self, sequential: bool) -> list[Stage]:
        index = self.index.dataflow
        dynamic = lambda name: name not in index.static  # noqa: E731
        captures = {name for view in self.views for name, _ in view.inputs}
        # nodes needed to compute the captured values (static ones are added per stage)
        needed: set[int] = set()
        pending = [index.producer[name] for name in captures if name in index.producer]
        while pending:
            node = pending.pop()
            if node in needed or node in index.static_nodes:
                continue
            needed.add(node)
            pending.extend(index.producer[r] for r in index.reads[node]
                           if dynamic(r) and r in index.producer)
        consumer_nodes = {i for view in self.views for i in view.consumers}
        value_stage: dict[str, int] = {}
        node_stage: dict[int, int] = {}
        node_level: dict[int, int] = {}
        for node_index, node in enumerate(index.nodes):
            if node_index in index.static_nodes:
                continue
            is_consumer = node_index in consumer_nodes
            if node_index not in needed and not is_consumer:
                continue
            level = max((value_stage.get(r, 0) for r in index.reads[node_index]
                         if dynamic(r)), default=0)
            node_level[node_index] = level
            stage = level + 1 if (sequential and is_consumer) else level
            node_stage[node_index] = stage
            for out in node.output:
                if out:
                    value_stage[out] = stage
        view_level = {id(view): max(node_level[i] for i in view.consumers)
                      for view in self.views}
        count = max(view_level.values(), default=0) + 1
        # where each needed value is read last, so stored values can be dropped
        last_read: dict[str, int] = {}
        for node_index in needed:
            for r in index.reads[node_index]:
                if dynamic(r):
                    last_read[r] = max(last_read.get(r, -1), node_stage[node_index])
        stages = []
        for number in range(count):
            nodes = sorted(i for i in needed if node_stage[i] == number)
            produced = {o for i in nodes for o in index.nodes[i].output if o}
            reads = sorted({r for i in nodes for r in index.reads[i]
                            if dynamic(r) and r not in produced})
            stage_captures = sorted(name for name in captures
                                    if value_stage.get(name, 0) == number
                                    and (name in produced or name not in index.producer))
            outputs = sorted({o for o in produced
                              if last_read.get(o, -1) > number or o in stage_captures})
            stage_views = [v for v in self.views if view_level[id(v)] == number]
            stages.append(Stage(number, nodes, reads, outputs, stage_captures, stage_views))
        self._last_read = last_read
        return stages

    def stages(self) -> Iterator[Stage]:
        store: list[dict[str, np.ndarray]] = [{} for _ in self.feeds]
        for stage in self.stage_list:
            keys = [(name, layout) for name in stage.captures
                    for layout in sorted({lay for (n, lay) in self._pending if n == name},
                                         key=repr)]
            for key in keys:
                if key not in self._stats:
                    layout = key[1]
                    self._stats[key] = ActivationStats(layout.groups, layout.features,
                                                       self.hessian)
            session = self._session(stage, store) if stage.nodes else None
            for sample, feed in enumerate(self.feeds):
                values = {}
                if session is not None:
                    inputs = {name: store[sample][name] if name in store[sample]
                              else _feed_value(feed, name) for name in stage.reads}
                    values = _run(session, inputs)
                for name, layout in keys:
                    activation = values[name] if name in values else _feed_value(feed, name)
                    self._stats[(name, layout)].add_activation(layout, activation)
                for name in stage.outputs:
                    if self._last_read.get(name, -1) > stage.number:
                        store[sample][name] = values[name]
                for name in list(store[sample]):
                    if self._last_read.get(name, -1) <= stage.number:
                        del store[sample][name]
            del session
            yield stage

    def stats_of(self, view: TargetView) -> ActivationStats:
        """The summed statistics of all the target's consumer inputs (shared, do not modify)."""
        if len(view.inputs) == 1:
            return self._stats[view.inputs[0]]
        total = ActivationStats(view.groups, view.features, self.hessian)
        for key in view.inputs:
            total.merge(self._stats[key])
        return total

    def release(self, view: TargetView) -> None:
        for key in view.inputs:
            self._pending[key] -= 1
            if self._pending[key] == 0:
                del self._pending[key]
                self._stats.pop(key, None)

    def _session(self, stage: Stage, store: list[dict[str, np.ndarray]]
                 ) -> ort.InferenceSession:
        proto = self.index.model
        index = self.index.dataflow
        # static producers this stage needs, in topological order
        wanted: set[int] = set()
        pending = [r for i in stage.nodes for r in index.reads[i]]
        while pending:
            name = pending.pop()
            producer = index.producer.get(name)
            if producer is None or producer not in index.static_nodes or producer in wanted:
                continue
            wanted.add(producer)
            pending.extend(index.reads[producer])
        node_ids = sorted(wanted) + stage.nodes
        graph = onnx.GraphProto(name=f"{proto.graph.name or 'graph'}_stage{stage.number}")
        for i in node_ids:
            graph.node.add().CopyFrom(index.nodes[i])
        used = {r for i in node_ids for r in index.reads[i]}
        for name in sorted(used & set(index.initializers)):
            graph.initializer.add().CopyFrom(index.initializers[name])
        sample = store[0]
        for name in stage.reads:
            if name in index.graph_inputs:
                graph.input.add().CopyFrom(index.graph_inputs[name])
            else:
                value = sample[name]
                elem = helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
                graph.input.append(helper.make_tensor_value_info(name, elem, None))
        for name in stage.outputs:
            graph.output.append(onnx.ValueInfoProto(name=name))
        model = helper.make_model(graph, opset_imports=list(proto.opset_import))
        model.ir_version = proto.ir_version
        model.functions.extend(proto.functions)
        # idle onnxruntime threads must not spin while numpy sums the statistics;
        # tensors may be external data, or a lazy load's references into the model file
        folder = (self.loaded.base_dir
                  if self.loaded.uses_external_data or self.loaded.lazy else None)
        options = session_options(spinning=False, data_folder=folder)
        try:
            data = model.SerializeToString()
            del model, graph
            return create_session(data, options)
        except Exception as exc:  # onnxruntime raises its own unrelated types
            raise CalibrationError(f"onnxruntime cannot run calibration stage {stage.number} "
                                   f"({_first_line(exc)})") from None


def _run(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from .validate import run_session as run_with_ortvalues

    try:
        return run_with_ortvalues(session, inputs)
    except Exception as exc:  # a bad sample surfaces here as an onnxruntime error
        raise CalibrationError(f"calibration sample fails in onnxruntime "
                               f"({_first_line(exc)})") from None


def _feed_value(feed: Feed, name: str) -> np.ndarray:
    if name not in feed:
        raise CalibrationError(f"calibration sample lacks input {name!r}")
    return feed[name]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
