"""The part of a model downstream of some weights, run on its own.

A structured sensitivity sweep replaces one group's weights at several points; every node
before the first that reads them computes the same values at every point. The *suffix* is
the main graph from that node on (ONNX graphs are in topological order), a model whose
inputs are the values crossing the cut; `CutValues` computes those once on the dense model
for a few upcoming suffixes at a time, one pass of the full model per batch, and holds at
most about `budget` bytes of them.

Where the cut cannot be drawn simply (a node with a subgraph, whose captured values the
node list does not show; a graph output computed before the cut; the weights read by the
first node), `suffix_plan` gives None and the caller runs the whole model.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, helper

from .inputs import Feed

_SUBGRAPH_ATTRIBUTES = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
# default memory for cached cut values: a SmolLM2-135M layer's 5 or so values of
# [1, 256, 576] float32 on 8 windows are ~25 MB
DEFAULT_BUDGET = 1 << 30


@dataclass(frozen=True)
class SuffixPlan:
    start: int  # index of the suffix's first node in the main graph
    cut: tuple[str, ...]  # values computed before it (or graph inputs) that it reads
    initializers: tuple[str, ...]  # main-graph initializers it reads


def suffix_plan(proto: onnx.ModelProto, weights: Collection[str]) -> SuffixPlan | None:
    """Where the graph can be cut before the first node reading any of `weights`, and what
    crosses the cut; None where it cannot (see the module doc)."""
    graph = proto.graph
    nodes = list(graph.node)
    if any(a.type in _SUBGRAPH_ATTRIBUTES for node in nodes for a in node.attribute):
        return None
    readers = [i for i, node in enumerate(nodes) if any(x in weights for x in node.input)]
    if not readers or min(readers) == 0:
        return None
    start = min(readers)
    initializers = {t.name for t in graph.initializer}
    produced = {i.name for i in graph.input} - initializers  # a defaulted input stays one
    for node in nodes[:start]:
        produced.update(name for name in node.output if name)
    if any(o.name in produced or o.name in initializers for o in graph.output):
        return None
    needed = list(dict.fromkeys(name for node in nodes[start:] for name in node.input
                                if name))
    return SuffixPlan(start, tuple(n for n in needed if n in produced),
                      tuple(n for n in needed if n in initializers and n not in produced))


def suffix_model(proto: onnx.ModelProto, plan: SuffixPlan, sample: Feed) -> onnx.ModelProto:
    """The suffix as a model: its cut values as inputs (typed as in `sample`, one feed of
    cut values), the original outputs, the initializers it reads (and the graph inputs
    they default)."""
    graph = proto.graph
    model = onnx.ModelProto()
    model.ir_version = proto.ir_version
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    suffix = model.graph
    suffix.name = f"{graph.name}_suffix"
    suffix.node.extend(graph.node[plan.start:])
    for name in plan.cut:
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(sample[name]).dtype)
        suffix.input.append(helper.make_tensor_value_info(name, elem, None))
    wanted = set(plan.initializers)
    suffix.input.extend(i for i in graph.input if i.name in wanted)
    suffix.initializer.extend(t for t in graph.initializer if t.name in wanted)
    suffix.output.extend(graph.output)
    return model


class CutValues:
    """The cut values of each plan in `plans`, one feed list per plan, computed on the dense
    model when first asked for: for that plan and as many following ones as the memory
    budget allows (measured from the first batch), in one pass per feed; values of plans
    before the one asked for are dropped (ask in order)."""

    def __init__(self, proto: onnx.ModelProto, plans: Sequence[SuffixPlan | None],
                 feeds: Sequence[Feed], session_of, outputs_of, budget: int = DEFAULT_BUDGET):
        self.proto = proto
        self.plans = list(plans)
        self.feeds = list(feeds)
        self.session_of = session_of  # serialized model -> session
        self.outputs_of = outputs_of  # (session, feed, names) -> list of arrays
        self.budget = budget
        self.per_plan: int | None = None  # bytes one plan's values took, once measured
        self.cached: dict[int, list[dict[str, np.ndarray]]] = {}

    def values(self, index: int) -> list[dict[str, np.ndarray]]:
        for done in [i for i in self.cached if i < index]:
            del self.cached[done]
        if index not in self.cached:
            self._compute(index)
        return self.cached[index]

    def _compute(self, index: int) -> None:
        count = 1 if not self.per_plan else max(1, self.budget // self.per_plan)
        chosen = {i: plan for i, plan in enumerate(self.plans) if i >= index and plan}
        chosen = dict(list(chosen.items())[:count]) if index in chosen else {}
        inputs = {i.name for i in self.proto.graph.input}
        names = list(dict.fromkeys(name for plan in chosen.values() for name in plan.cut
                                   if name not in inputs))
        probe = onnx.ModelProto()
        probe.CopyFrom(self.proto)
        present = {o.name for o in probe.graph.output}
        probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names
                                  if n not in present)
        session = self.session_of(probe.SerializeToString())
        del probe
        computed = []
        for feed in self.feeds:
            arrays = dict(zip(names, self.outputs_of(session, feed, names), strict=True))
            computed.append({**{k: np.asarray(v) for k, v in feed.items()}, **arrays})
        size = 0
        for i, plan in chosen.items():
            self.cached[i] = [{name: values[name] for name in plan.cut} for values in computed]
            size += sum(a.nbytes for values in self.cached[i] for a in values.values())
        if chosen and self.per_plan is None:
            self.per_plan = max(1, size // len(chosen))
