"""The state of the structured analysis's walk, and the moves every rule makes on it.

A producer opens a *channel space* (`Space`): one keep set under construction, a
union-find node whose data lives on its root. Each activation that carries channels has a
`Flow`: the spaces it is made of side by side along its channel axis. Rules (the
`rules_*` modules) move flows from a node's inputs to its outputs, add members to the
spaces, and pin a space where no rule proves a rewrite safe; `Walk` holds the flows and
spaces and the helpers they share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..graph import GraphIndex, node_label
from .groups import AttributeEdit, DeclineCause, Declined, Member, MemberRole, ShapeEdit
from .op_tables import ATTENTION_OPS, RESHAPE_OPS, UNARY_OPS
from .shapes import Dim, infer_shapes, small_array


@dataclass
class Space:
    """One keep set under construction (a union-find node; data lives on the root)."""

    channels: int
    producers: list[int] = field(default_factory=list)  # dataflow indices
    members: dict[tuple[str, int, int], Member] = field(default_factory=dict)
    attributes: dict[tuple[str, str, int | None], AttributeEdit] = field(default_factory=dict)
    # by (tensor, entry, reading node): a shared constant is edited per reader
    shapes: dict[tuple[str, int, str | None], ShapeEdit] = field(default_factory=dict)
    pins: list[tuple[DeclineCause, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # op types reading the channels
    multiple_of: int = 1
    preserving: bool = True
    residual: bool = False  # two spaces were added together
    hidden: bool = False  # the channels reach a LayerNorm-family norm
    macs: int = 0
    # the positions of the producers' output channels this space holds, where a Split or
    # Slice divided them (None: all of them)
    section: tuple[int, int] | None = None
    heads: bool = False  # attention heads: the channels meet on a batch axis of a MatMul


@dataclass(frozen=True)
class Flow:
    """The channels an activation carries: `sections` (space, offset) side by side along
    `axis` (negative: counted from the end), `channels` in all; `rank` when known. Where a
    Flatten or Reshape merged the channel axis with the axes after it, each channel is
    `block` consecutive positions of `axis` (offsets still count channels)."""

    sections: tuple[tuple[int, int], ...]
    channels: int
    axis: int
    rank: int | None = None
    block: int = 1

    def moved(self, axis: int, rank: int | None) -> Flow:
        return Flow(self.sections, self.channels, axis, rank, self.block)


class Walk:
    """Flows, spaces and the model's facts (stored tensors, shapes, labels) of one analysis."""

    def __init__(self, model: onnx.ModelProto, allow_norm: bool, allow_hidden: bool):
        self.model = model
        self.allow_norm = allow_norm
        self.allow_hidden = allow_hidden
        self.index = GraphIndex(model)
        self.dataflow = self.index.dataflow
        self.opset = next((entry.version for entry in model.opset_import
                           if entry.domain in ("", "ai.onnx")), 1)
        self.stored = {s.name: s.tensor for s in self.index.stored if s.scope.is_main}
        self.shapes = infer_shapes(model)
        for name, tensor in self.stored.items():
            self.shapes[name] = tuple(tensor.dims)
        self.mac_shapes = self.shapes  # the shapes MACs are counted at (see `macs_factor`)
        positions = {id(node): position for position, node in enumerate(model.graph.node)}
        self.labels = [node_label(node, positions[id(node)]) for node in self.dataflow.nodes]
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.flows: dict[str, Flow] = {}
        self.not_candidates: list[tuple[int, Declined]] = []  # producers declined at once

    def new_space(self, channels: int, producer: int | None = None) -> int:
        space = Space(channels, [producer] if producer is not None else [])
        self.spaces.append(space)
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def space(self, space: int) -> Space:
        return self.spaces[self.root(space)]

    def union(self, a: int, b: int, residual: bool) -> None:
        a, b = self.root(a), self.root(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        keep, gone = self.spaces[a], self.spaces[b]
        self.parent[b] = a
        keep.producers.extend(gone.producers)
        keep.members.update(gone.members)
        keep.attributes.update(gone.attributes)
        keep.shapes.update(gone.shapes)
        keep.pins.extend(gone.pins)
        keep.consumers.extend(gone.consumers)
        keep.multiple_of = math.lcm(keep.multiple_of, gone.multiple_of)
        keep.preserving = keep.preserving and gone.preserving
        keep.residual = keep.residual or gone.residual or residual
        keep.hidden = keep.hidden or gone.hidden
        keep.heads = keep.heads or gone.heads
        keep.macs += gone.macs

    def divide(self, space: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
        """Cut the channels of `space` at the increasing positions `cuts` (each strictly
        inside) into new spaces, one per piece, returned as (space, first channel). Each piece
        holds every member at the piece's offset and every pin, and every flow that carried
        the space carries the pieces instead; the divided space is left empty. Attributes and
        shape constants that count all the channels cannot follow the pieces: they pin them."""
        root = self.root(space)
        whole = self.spaces[root]
        bounds = [0, *cuts, whole.channels]
        base = whole.section[0] if whole.section else 0
        pieces: list[tuple[int, int]] = []
        for start, stop in zip(bounds, bounds[1:], strict=False):
            piece_id = self.new_space(stop - start)
            piece = self.spaces[piece_id]
            piece.producers = list(whole.producers)
            piece.section = (base + start, base + stop)
            for member in whole.members.values():
                offset = member.offset + start * member.block
                piece.members[(member.tensor, member.axis, offset)] = replace(member,
                                                                              offset=offset)
            piece.pins = list(whole.pins)
            piece.consumers = list(whole.consumers)
            piece.multiple_of = whole.multiple_of
            piece.preserving, piece.residual = whole.preserving, whole.residual
            piece.hidden, piece.heads = whole.hidden, whole.heads
            piece.macs = whole.macs * (stop - start) // whole.channels
            if (stop - start) % whole.multiple_of:
                piece.pins.append((DeclineCause.GROUPS_DISAGREE,
                                   f"{stop - start} channels, not a multiple of "
                                   f"{whole.multiple_of}"))
            counts = [f"attribute {edit.attribute} of {edit.node}"
                      for edit in whole.attributes.values()]
            counts += [f"shape {edit.tensor}" for edit in whole.shapes.values()]
            for where in counts:
                piece.pins.append((DeclineCause.GROUPS_DISAGREE,
                                   f"{where} counts channels that a Split or Slice divides"))
            pieces.append((piece_id, start))
        self.spaces[root] = Space(whole.channels)  # empty: no producer, not a result
        for name, flow in list(self.flows.items()):
            if all(self.root(s) != root for s, _ in flow.sections):
                continue
            sections: list[tuple[int, int]] = []
            for s, offset in flow.sections:
                if self.root(s) == root:
                    sections.extend((piece, offset + start) for piece, start in pieces)
                else:
                    sections.append((s, offset))
            self.flows[name] = Flow(tuple(sections), flow.channels, flow.axis, flow.rank,
                                    flow.block)
        return pieces

    def reblock(self, space: int, factor: int) -> str | None:
        """Make every `factor` consecutive channels of `space` one channel (a Reshape that
        splits the channels into heads of `factor` each): its members' blocks, shape edits
        and every flow that carries it follow. Returns why it cannot, or None where done: a
        count that `factor` does not divide, a member or a flow that holds the space at an
        offset inside a unit, an attribute that counts the channels."""
        root = self.root(space)
        whole = self.spaces[root]
        if whole.channels % factor:
            return f"{whole.channels} channels are not whole units of {factor}"
        if whole.attributes:
            return "an attribute counts the channels one by one"
        if any(member.offset % (member.block * factor) for member in whole.members.values()):
            return "a member holds the channels at an offset inside a unit"
        carrying = {name: flow for name, flow in self.flows.items()
                    if any(self.root(s) == root for s, _ in flow.sections)}
        if any(len(flow.sections) != 1 or flow.sections[0][1] for flow in carrying.values()):
            return "the channels are concatenated with others"
        whole.channels //= factor
        whole.members = {key: replace(member, block=member.block * factor)
                         for key, member in whole.members.items()}
        whole.shapes = {key: replace(edit, per_channel=edit.per_channel * factor)
                        for key, edit in whole.shapes.items()}
        whole.multiple_of //= math.gcd(whole.multiple_of, factor)
        for name, flow in carrying.items():
            self.flows[name] = Flow(flow.sections, flow.channels // factor, flow.axis,
                                    flow.rank, flow.block * factor)
        return None

    def pin(self, flow: Flow | None, cause: DeclineCause, detail: str) -> None:
        if flow is None:
            return
        for space, _ in flow.sections:
            self.space(space).pins.append((cause, detail))

    def uses(self, name: str) -> int:
        """How many times a stored tensor is read (a graph output counts as a read)."""
        return len(self.index.main.consumers.get(name, ())) + (name in self.index.main.escaping)

    def add_member(self, flow: Flow, tensor: str, axis: int, role: MemberRole) -> None:
        """Add `tensor` (channel axis `axis`) to every space of `flow`, at its offsets (in
        positions: a channel of a blocked flow is `block` positions)."""
        shared = self.uses(tensor) > 1
        for space, offset in flow.sections:
            target = self.space(space)
            start = offset * flow.block
            target.members.setdefault((tensor, axis, start),
                                      Member(tensor, axis, role, start, flow.block))
            if shared:
                target.pins.append((DeclineCause.SHARED_WEIGHT,
                                    f"{tensor} is also read by another node"))

    def rank(self, flow: Flow, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else flow.rank

    def abs_axis(self, flow: Flow, name: str) -> int | None:
        rank = self.rank(flow, name)
        return None if rank is None else flow.axis + rank

    def origin(self, name: str) -> tuple[DeclineCause, str]:
        """Why a value meeting some channels carries no flow of its own."""
        for _ in range(32):
            if name in self.dataflow.graph_inputs:
                return DeclineCause.GRAPH_INPUT, f"meets graph input {name}"
            producer = self.dataflow.producer.get(name)
            if producer is None:
                break
            node = self.dataflow.nodes[producer]
            if node.op_type in UNARY_OPS and node.input:
                name = node.input[0]
                continue
            cause = (DeclineCause.AXIS_MIXED if node.op_type in RESHAPE_OPS | {"Transpose",
                     "Concat", "Split", "Slice", "Gather"} | ATTENTION_OPS
                     else DeclineCause.UNKNOWN_OP)
            return cause, f"meets the output of {node.op_type} {self.labels[producer]}"
        return DeclineCause.UNKNOWN_OP, f"meets {name}, of unknown origin"

    def dim_at(self, name: str, axis: int) -> Dim:
        """The size of value `name` at negative `axis` (1 where it has fewer axes)."""
        shape = self.shapes.get(name)
        if shape is None:
            return None
        return shape[axis] if len(shape) + axis >= 0 else 1

    def macs_factor(self, name: str, skip_axes: Sequence[int]) -> int:
        """Product of the output's dims other than `skip_axes` (batch taken as 1) in
        `mac_shapes`; 0 where one is unknown."""
        shape = self.mac_shapes.get(name)
        if shape is None:
            return 0
        factor = 1
        for position, dim in enumerate(shape):
            if position in skip_axes or position - len(shape) in skip_axes:
                continue
            if isinstance(dim, int) and dim > 0:
                factor *= dim
            elif position != 0:
                return 0
        return factor

    def values(self, name: str | None) -> np.ndarray | None:
        return small_array(self.stored.get(name)) if name else None
