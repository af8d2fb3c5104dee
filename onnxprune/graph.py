"""One index over a model's graphs: who produces and who consumes every value.

`GraphIndex(model)` walks the main graph and every If/Loop/Scan body below it, at any depth,
once. For each graph (a `Scope`) it records the names defined there, and for each name the
nodes that read it, with the input slot and the scope the reading node lives in; a
subgraph's reference to an outer-scope name is recorded on the scope that defines the name.
It lists the stored tensors (initializers and Constant-node values) in walk order, and
`uses(name)` follows a value through the ops that keep its layout (Cast, Identity,
DequantizeLinear, CastLike) and through Transpose, collecting the permutations on the way.

`GraphIndex.dataflow` is the main graph as a computation: its nodes in topological order,
what each node reads (outer-scope names its subgraphs use included), who produces each value,
and which values are static (initializers, Constant outputs and everything computed from
them alone).

Target discovery, calibration staging and the storage formats all use this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cache, cached_property

import onnx
import onnx.defs
from onnx import AttributeProto, TensorProto

from .errors import OnnxPruneError

# Ops that pass a value on with the same layout; Transpose is looked through on its own.
PASS_THROUGH_OPS = frozenset({"Cast", "Identity", "DequantizeLinear", "CastLike"})
# Ops whose output changes from run to run: never static, even with static inputs.
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
# How many look-through ops `GraphIndex.uses` follows in a row (a guard, not a real limit).
MAX_LOOK_THROUGH = 8


class GraphError(OnnxPruneError):
    """The main graph cannot be ordered: it has a cycle or reads a value nothing defines."""


def is_onnx_domain(node: onnx.NodeProto) -> bool:
    """Whether `node` is a standard ONNX op (default domain)."""
    return node.domain in ("", "ai.onnx")


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The Python value of attribute `name` of `node`, or `default` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graphs held in `node`'s attributes, each with its attribute label
    (``then_branch``; ``name[i]`` for the i-th graph of a GRAPHS attribute)."""
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for position, graph in enumerate(attr.graphs):
                yield f"{attr.name}[{position}]", graph


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or ``<op_type>_<index in its graph>`` when it has none."""
    return node.name or f"{node.op_type}_{index}"


def walk_graphs(graph: onnx.GraphProto, label: str = ""
                ) -> Iterator[tuple[onnx.GraphProto, str]]:
    """The graph and every subgraph below it (depth first, in node order), each with the
    label of the node that owns it ("" for `graph` itself unless given)."""
    yield graph, label
    for index, node in enumerate(graph.node):
        for _, sub in subgraphs(node):
            yield from walk_graphs(sub, node_label(node, index))


def constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The dense tensor a standard Constant node holds in its `value` attribute, if any."""
    if node.op_type != "Constant" or not is_onnx_domain(node):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t
    return None


@cache
def _arity(op_type: str, domain: str, version: int
           ) -> tuple[int, int, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]] | None:
    """(min inputs, min outputs, required input slots, required output slots) of an op at
    an opset version, or None when onnx does not know the op there. A required slot
    (position, formal name) must be present and named."""
    try:  # (a version past int32 means the newest one; odd strings are unknown ops)
        schema = onnx.defs.get_schema(op_type, min(version, 2**31 - 1), domain)
    except (onnx.defs.SchemaError, TypeError):
        return None
    single = onnx.defs.OpSchema.FormalParameterOption.Single

    def required(formals) -> tuple[tuple[int, str], ...]:
        return tuple((i, f.name) for i, f in enumerate(formals) if f.option == single)

    return (schema.min_input, schema.min_output, required(schema.inputs),
            required(schema.outputs))


def arity_problem(node: onnx.NodeProto, label: str, opsets: Mapping[str, int]) -> str | None:
    """Why `node` has fewer inputs or outputs than its op's schema requires (onnx.checker
    rejects such a node), or None. `opsets` maps domains ("" for ai.onnx) to the model's
    versions; ops of a domain without a version, or unknown to onnx, are not checked, except
    that a standard Constant must have its one output."""
    head = f"node {label!r} ({node.op_type})"
    if node.op_type == "Constant" and is_onnx_domain(node) and not any(node.output[:1]):
        return f"{head} has no output"
    domain = "" if is_onnx_domain(node) else node.domain
    version = opsets.get(domain)
    arity = _arity(node.op_type, domain, version) if version else None
    if arity is None:
        return None
    min_inputs, min_outputs, required_inputs, required_outputs = arity
    for kind, names, least, required in (("input", node.input, min_inputs, required_inputs),
                                         ("output", node.output, min_outputs,
                                          required_outputs)):
        if len(names) < least:
            have = f"{len(names)} {kind}{'s' if len(names) > 1 else ''}" if names else \
                f"no {kind}"
            need = f"; {node.op_type} needs at least {least}" if least > 1 else ""
            return f"{head} has {have}{need}"
        for position, formal in required:
            if position < len(names) and not names[position]:
                return f"{head} leaves its required {kind} {formal!r} empty"
    return None


def opset_versions(model: onnx.ModelProto | None) -> dict[str, int]:
    """The model's opset version per domain ("" for ai.onnx); empty without a model."""
    if model is None:
        return {}
    return {("" if entry.domain == "ai.onnx" else entry.domain): entry.version
            for entry in model.opset_import}


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads: its inputs plus the outer-scope names its subgraphs use."""
    reads = [name for name in node.input if name]
    for _, sub in subgraphs(node):
        reads.extend(sorted(outer_names(sub)))
    return list(dict.fromkeys(reads))


def outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names `graph` (or a graph below it) reads but does not define itself."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(node_reads(node))
        defined.update(node.output)
    return used - defined


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Every value and node name defined in `graph` itself (not in its subgraphs)."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {s.values.name for s in graph.sparse_initializer}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


def topological_order(graph: onnx.GraphProto) -> list[int]:
    """Positions in `graph.node` in an order where producers come first (ONNX requires
    that order; check anyway). A graph already in order keeps its order exactly.
    """
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    available.update(t.values.name for t in graph.sparse_initializer)
    remaining = list(range(len(graph.node)))
    ordered: list[int] = []
    while remaining:
        progress = []
        rest = []
        for position in remaining:
            node = graph.node[position]
            if all(name in available for name in node_reads(node)):
                progress.append(position)
                available.update(o for o in node.output if o)
            else:
                rest.append(position)
        if not progress:
            missing = sorted({n for p in rest for n in node_reads(graph.node[p])}
                             - available)[:3]
            raise GraphError(f"graph has a cycle or undefined inputs ({', '.join(missing)})")
        ordered.extend(progress)
        remaining = rest
    return ordered


def axis_through_transposes(axis: int, perms: tuple[tuple[int, ...], ...], rank: int) -> int:
    """Map an axis of the value a consumer sees back to the axis of the stored tensor."""
    for perm in reversed(perms):
        perm = perm or tuple(reversed(range(rank)))  # Transpose without perm reverses
        if sorted(perm) != list(range(rank)):
            raise GraphError(f"a Transpose's perm {list(perm)} is not a permutation of "
                             f"{rank} axes")
        axis = perm[axis]
    return axis


class Scope:
    """One graph (the main graph or a subgraph) and the names it defines.

    `consumers[name]` lists every `Use` (without Transposes) of a name defined here, from
    this graph or from any subgraph below it. `escaping` holds the names
    defined here that some graph returns as an output.
    """

    def __init__(self, graph: onnx.GraphProto, parent: Scope | None, label: str, path: str):
        self.graph = graph
        self.parent = parent
        # the owning node's label ("" for the main graph)
        self.label = label
        # e.g. "Loop_0.body/If_3.then_branch": tells apart sibling branches of one node
        self.path = path
        self.defined: set[str] = {i.name for i in graph.input}
        self.defined.update(t.name for t in graph.initializer)
        self.defined.update(t.values.name for t in graph.sparse_initializer if t.values.name)
        # the node of this graph that makes each value (the first, in a graph that makes a
        # name twice)
        self.producers: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producers.setdefault(out, node)
        self.defined.update(self.producers)
        self.consumers: dict[str, list[Use]] = {}
        self.escaping: set[str] = set()

    @property
    def is_main(self) -> bool:
        return self.parent is None

    def owner_of(self, name: str) -> Scope | None:
        """The innermost scope, from this one outwards, that defines `name`."""
        scope: Scope | None = self
        while scope is not None and name not in scope.defined:
            scope = scope.parent
        return scope


@dataclass(frozen=True)
class StoredTensor:
    """A dense tensor stored in some scope: an initializer or a Constant node's value."""

    name: str
    tensor: TensorProto
    kind: str  # "initializer" | "constant"
    scope: Scope


@dataclass(frozen=True)
class Use:
    """A node reading a value, reached through look-through ops with these Transposes."""

    node: onnx.NodeProto
    slot: int
    scope: Scope  # where the node lives
    position: int  # the node's index in `scope.graph.node`
    perms: tuple[tuple[int, ...], ...] = ()


class GraphIndex:
    """Producers, consumers, scopes and stored tensors of a model, built in one walk.

    Raises `GraphError` for a node with fewer inputs or outputs than its op's schema at the
    model's opset requires (`arity_problem`; a GraphProto alone is checked for Constant
    nodes without output only): code that reads the index may rely on every required slot.
    """

    def __init__(self, model: onnx.ModelProto | onnx.GraphProto):
        self.model = model if isinstance(model, onnx.ModelProto) else None
        self.graph = model.graph if isinstance(model, onnx.ModelProto) else model
        self.scopes: list[Scope] = []
        self.stored: list[StoredTensor] = []
        self._opsets = opset_versions(self.model)
        self._walk(self.graph, None, "", "")

    @property
    def main(self) -> Scope:
        return self.scopes[0]

    def _walk(self, graph: onnx.GraphProto, parent: Scope | None, label: str,
              path: str) -> None:
        # one pass, in the order that fixes target order: a graph's initializers, then per
        # node its Constant value, its reads, and the subgraphs it holds
        scope = Scope(graph, parent, label, path)
        self.scopes.append(scope)
        for tensor in graph.initializer:
            self.stored.append(StoredTensor(tensor.name, tensor, "initializer", scope))
        for index, node in enumerate(graph.node):
            problem = arity_problem(node, node_label(node, index), self._opsets)
            if problem is not None:
                raise GraphError(problem)
            value = constant_tensor(node)
            if value is not None:
                self.stored.append(StoredTensor(node.output[0], value, "constant", scope))
            for slot, name in enumerate(node.input):
                if not name:
                    continue
                owner = scope.owner_of(name)
                if owner is not None:
                    owner.consumers.setdefault(name, []).append(Use(node, slot, scope, index))
            label_here = node_label(node, index)
            node_path = f"{scope.path}/{label_here}" if scope.path else label_here
            for attr_label, sub in subgraphs(node):
                self._walk(sub, scope, label_here, f"{node_path}.{attr_label}")
        for out in graph.output:
            owner = scope.owner_of(out.name)
            if owner is not None:
                owner.escaping.add(out.name)

    def uses(self, name: str, scope: Scope | None = None) -> tuple[list[Use], bool]:
        """The nodes that use `name` (defined in `scope`, the main graph by default), looking
        through PASS_THROUGH_OPS and Transpose on their first input.

        Returns the uses and whether the value, or a look-through result of it, is also a
        graph output.
        """
        return self._uses(scope or self.main, name, (), 0)

    def _uses(self, scope: Scope, name: str, perms: tuple, depth: int
              ) -> tuple[list[Use], bool]:
        uses: list[Use] = []
        escapes = name in scope.escaping
        for use in scope.consumers.get(name, []):
            node = use.node
            looks_through = (use.slot == 0 and depth < MAX_LOOK_THROUGH
                             and len(node.output) > 0 and node.output[0]
                             and (node.op_type in PASS_THROUGH_OPS or node.op_type == "Transpose"))
            if not looks_through:
                uses.append(replace(use, perms=perms))
                continue
            step = (perms + (tuple(attribute(node, "perm", ())),)
                    if node.op_type == "Transpose" else perms)
            inner, inner_escapes = self._uses(use.scope, node.output[0], step, depth + 1)
            uses.extend(inner)
            escapes = escapes or inner_escapes
        return uses, escapes

    @cached_property
    def dataflow(self) -> Dataflow:
        """The main graph in topological order (built on first use; raises `GraphError`
        when the graph has a cycle or undefined inputs)."""
        return Dataflow(self.graph)


class Dataflow:
    """The main graph as a computation: ordered nodes, their reads, and the static values.

    Nodes are referred to by their position in `nodes` (topological order).
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        order = topological_order(graph)
        self.nodes = [graph.node[position] for position in order]
        self._index_of_position = {position: index for index, position in enumerate(order)}
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name: v for v in graph.input if v.name not in self.initializers}
        self.reads: list[list[str]] = [node_reads(node) for node in self.nodes]
        self.producer: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = index
        # values that do not depend on any graph input: initializers, Constant nodes and
        # whatever is computed from them alone
        self.static: set[str] = set(self.initializers)
        self.static_nodes: set[int] = set()
        for index, node in enumerate(self.nodes):
            if node.op_type in RANDOM_OPS:
                continue
            if all(name in self.static for name in self.reads[index]):
                self.static_nodes.add(index)
                self.static.update(o for o in node.output if o)

    def index_of(self, use: Use) -> int:
        """Where the node of a main-graph `use` sits in `nodes`."""
        if not use.scope.is_main:
            raise ValueError("not a use in the main graph")
        return self._index_of_position[use.position]
