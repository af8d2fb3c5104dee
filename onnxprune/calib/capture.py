"""Capture of every target's layer inputs through onnxruntime, stage by stage.

The inputs are read from onnxruntime, never computed by hand: the graph is cut into stages,
each stage is a small ONNX model whose outputs are the values the later stages need plus the
inputs of the targets' consumer nodes, and it runs over every calibration sample.

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

from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..errors import CalibrationError
from ..graph import GraphIndex, constant_tensor
from ..inputs import Feed
from ..io import LoadedModel
from ..io.tensors import PACKED_TYPES
from ..runtime import create_session, session_options
from ..runtime import first_line as _first_line
from .layouts import Layout, TargetView
from .stats import ActivationStats


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

    `weights`, when given, maps main-graph names of stored tensors (an initializer's name
    or a Constant node's output) to arrays that replace the model's tensors in every stage
    built while they are in it: pruned weights already streamed to an output file and no
    longer in the proto. Add to it between stages as targets are pruned.
    """

    def __init__(self, loaded: LoadedModel, index: GraphIndex, views: Sequence[TargetView],
                 feeds: Sequence[Feed], *, sequential: bool = True, hessian: bool = True,
                 weights: MutableMapping[str, np.ndarray] | None = None):
        if not feeds:
            raise CalibrationError("no calibration samples")
        self.loaded = loaded
        self.index = index
        self.weights = weights if weights is not None else {}
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
        # a consumer may read its input through ops that are not needed (the
        # DynamicQuantizeLinear of a MatMulInteger): its captured input sets the level too
        view_level = {id(view): max([node_level[i] for i in view.consumers]
                                    + [value_stage.get(name, 0) for name, _ in view.inputs])
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

    def last_stage_reading(self) -> dict[str, int]:
        """For every stored tensor a stage session reads (directly or through the static
        nodes it copies), the number of the last stage that reads it: a replacement in
        `weights` may be dropped once that stage is built."""
        last: dict[str, int] = {}
        index = self.index.dataflow
        for stage in self.stage_list:
            node_ids = self._static_producers(stage, replaced=set()) + stage.nodes
            for i in node_ids:
                for name in index.reads[i]:
                    last[name] = stage.number
        return last

    def _static_producers(self, stage: Stage, replaced) -> list[int]:
        """The static nodes a stage needs, in topological order; names in `replaced` come
        from `weights`, so their producers are not needed."""
        index = self.index.dataflow
        wanted: set[int] = set()
        pending = [r for i in stage.nodes for r in index.reads[i]]
        while pending:
            name = pending.pop()
            if name in replaced:
                continue
            producer = index.producer.get(name)
            if producer is None or producer not in index.static_nodes or producer in wanted:
                continue
            wanted.add(producer)
            pending.extend(index.reads[producer])
        return sorted(wanted)

    def _session(self, stage: Stage, store: list[dict[str, np.ndarray]]
                 ) -> ort.InferenceSession:
        proto = self.index.model
        if proto is None:  # a stage runs as a model of its own, with the model's opsets
            raise ValueError("calibration needs the GraphIndex of a model, not of a graph")
        index = self.index.dataflow
        node_ids = self._static_producers(stage, self.weights) + stage.nodes
        # built in place, not by make_model, which would copy the graph and its replacements
        model = onnx.ModelProto(ir_version=proto.ir_version)
        model.opset_import.extend(proto.opset_import)
        model.functions.extend(proto.functions)
        graph = model.graph
        graph.name = f"{proto.graph.name or 'graph'}_stage{stage.number}"
        for i in node_ids:
            graph.node.add().CopyFrom(index.nodes[i])
        used = {r for i in node_ids for r in index.reads[i]}
        for name in sorted(used & (set(index.initializers) | set(self.weights))):
            if name in self.weights:
                graph.initializer.append(self._replacement(name))
            else:
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
                                   f"({_first_line(exc)})") from exc

    def _replacement(self, name: str) -> TensorProto:
        """The initializer a stage uses for `weights[name]`, checked against the tensor
        it replaces (a mismatch is a caller's bug, not a user error)."""
        index = self.index.dataflow
        stored = index.initializers.get(name)
        if stored is None and name in index.producer:
            stored = constant_tensor(index.nodes[index.producer[name]])
        if stored is None:
            raise ValueError(f"weights[{name!r}] replaces no initializer or Constant of the "
                             "main graph")
        array = np.asarray(self.weights[name])
        if stored.data_type in PACKED_TYPES and array.dtype == np.uint8 and array.ndim == 1:
            # a quantized weight's new values as its raw packed bytes (int4, uint4)
            packed = TensorProto(name=name, data_type=stored.data_type, dims=stored.dims)
            packed.raw_data = array.tobytes()
            return packed
        expected = helper.tensor_dtype_to_np_dtype(stored.data_type)
        if array.dtype != expected or array.shape != tuple(stored.dims):
            raise ValueError(f"weights[{name!r}] is {array.dtype}{list(array.shape)}; the "
                             f"tensor it replaces is {expected}{list(stored.dims)}")
        return numpy_helper.from_array(array, name)


def _run(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ..runtime import run_session as run_with_ortvalues

    try:
        return run_with_ortvalues(session, inputs)
    except Exception as exc:  # a bad sample surfaces here as an onnxruntime error
        raise CalibrationError(f"calibration sample fails in onnxruntime "
                               f"({_first_line(exc)})") from exc


def _feed_value(feed: Feed, name: str) -> np.ndarray:
    if name not in feed:
        raise CalibrationError(f"calibration sample lacks input {name!r}")
    return feed[name]
