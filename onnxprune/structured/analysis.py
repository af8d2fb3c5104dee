"""Coupled channel groups found on a model's main graph (`find_groups`).

One forward walk over `GraphIndex.dataflow` in topological order. A producer whose weight is
a stored tensor (MatMul B, Gemm B, Conv W, ConvTranspose W) opens a *channel space*: the
channels of its output activation. Each activation that carries channels has a `Flow`: the
spaces it is made of (one, or several side by side after a Concat on the channel axis, each
at an offset) and where its channel axis is, counted from the end so that broadcasting keeps
it. Rules per op move flows from inputs to outputs, add the stored tensors on the way as
members of the spaces (biases, norm parameters, per-channel constants, the consumers' input
axes), and *pin* a space where no rule proves a rewrite safe. Where two flows meet in an
element-wise op their spaces are one keep set: union-find joins them.

At the end every space that has a producer becomes a `ChannelGroup`, or a `Declined` with
the most specific of its pins. Only tensor dims are read, and a few small constants (pads,
scales, axes, shape targets) that are stored inline.

The parts: `propagation` (spaces, flows, union-find and the moves rules share), `op_tables`
(which ops the rules know), `shapes` (static shapes and small constants), and one module of
rules per concern: `rules_layers` (producers and consumers), `rules_pointwise` (ops that
keep each channel to itself, meeting flows), `rules_norms` (normalizations, reductions),
`rules_layout` (Transpose, Reshape, Concat, shape reads), `rules_sections` (Split,
Slice). This module walks the graph,
sends each node to its rule and turns the spaces into results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import onnx

from ..graph import is_onnx_domain
from .groups import ChannelGroup, DeclineCause, Declined, Member, MemberRole, StructureKind
from .op_tables import (
    ELEMENTWISE_OPS,
    LAYER_NORM_OPS,
    POOL_OPS,
    PRODUCER_OPS,
    REDUCE_OPS,
    RESHAPE_OPS,
    SOFTMAX_OPS,
    UNARY_OPS,
)
from .propagation import Space, Walk
from .rules_attention import (
    FUSED_ATTENTION,
    batched_matmul,
    expand,
    finish_repeats,
    fused_attention,
    packed_attention,
)
from .rules_layers import layer, through_transposes
from .rules_layout import concat, reshape, shape_read, transpose
from .rules_norms import norm, reduce, softmax
from .rules_pointwise import at_axis_one, elementwise, quantize, spatial, unary, unknown
from .rules_sections import slice_channels, split
from .shapes import infer_shapes, macs_input_shapes

__all__ = ["find_groups", "infer_shapes"]

# Pins from the most specific to the least: a declined candidate reports the first.
CAUSE_ORDER = (
    DeclineCause.RESIDUAL_STREAM, DeclineCause.NORMALIZATION, DeclineCause.SUBGRAPH_CAPTURE,
    DeclineCause.SHARED_WEIGHT, DeclineCause.GROUPS_DISAGREE, DeclineCause.NOT_PER_CHANNEL,
    DeclineCause.NOT_A_CONSTANT, DeclineCause.AXIS_MIXED, DeclineCause.SHAPE_READ,
    DeclineCause.UNKNOWN_OP, DeclineCause.DYNAMIC_SHAPE, DeclineCause.GRAPH_INPUT,
    DeclineCause.GRAPH_OUTPUT, DeclineCause.TOO_FEW_CHANNELS,
)


def find_groups(model: onnx.ModelProto, *, allow_norm: bool = False,
                allow_hidden: bool = False, dims: Mapping[str, int] | None = None,
                input_shapes: Mapping[str, Sequence[int]] | None = None
                ) -> tuple[list[ChannelGroup], list[Declined]]:
    """The coupled channel groups of `model`'s main graph and the declined candidates.

    `allow_norm` lets a normalization over the channel axis be shrunk (its scale and bias
    become members; the group is then not output-preserving); `allow_hidden` lets a
    transformer's residual stream (its hidden size) be a group. Groups and declines are in
    the order of their first producer in the graph; each is named by that producer's output.
    Only tensor dims are read, so a lazily loaded model (`io.load_model(path, lazy=True)`)
    is analysed without reading its weights. `dims` and `input_shapes` (as `--dim` and
    `--input-shapes` give them) size dynamic inputs for the MACs estimate.
    """
    return _Analysis(model, allow_norm, allow_hidden, dims, input_shapes).run()


class _Analysis(Walk):
    """The walk in topological order, each node to its rule, then the spaces as results."""

    def __init__(self, model: onnx.ModelProto, allow_norm: bool, allow_hidden: bool,
                 dims: Mapping[str, int] | None, input_shapes: Mapping[str, Sequence[int]] | None):
        super().__init__(model, allow_norm, allow_hidden)
        # MACs need every dim: where inputs are dynamic, shapes at one concrete input shape
        concrete = macs_input_shapes(model, dims, input_shapes)
        self.mac_shapes = infer_shapes(model, concrete) if concrete else self.shapes

    def run(self) -> tuple[list[ChannelGroup], list[Declined]]:
        for index, node in enumerate(self.dataflow.nodes):
            if index in self.dataflow.static_nodes:
                continue
            if is_onnx_domain(node) and node.op_type == "MatMul" and self._computed(node):
                batched_matmul(self, index, node)
            elif is_onnx_domain(node) and node.op_type in PRODUCER_OPS:
                layer(self, index, node)
            elif node.domain == "com.microsoft" and node.op_type == "Attention":
                packed_attention(self, index, node)
            elif any(name in self.flows for name in self.dataflow.reads[index]):
                self._propagate(index, node)
        finish_repeats(self)
        self._pin_escapes()
        return self._results()

    def _computed(self, node: onnx.NodeProto) -> bool:
        """Both operands of a MatMul are activations (neither stored, seen through
        Transposes or computed from constants only)."""
        return not any(name in self.stored or name in self.dataflow.static
                       or through_transposes(self, name) is not None
                       for name in node.input[:2])

    def _pin_escapes(self) -> None:
        main = self.index.main
        for name, flow in self.flows.items():
            if name in main.escaping:
                self.pin(flow, DeclineCause.GRAPH_OUTPUT, f"{name} is a graph output")
            if any(not use.scope.is_main for use in main.consumers.get(name, ())):
                self.pin(flow, DeclineCause.SUBGRAPH_CAPTURE,
                          f"{name} is read inside an If/Loop/Scan body")

    def _propagate(self, index: int, node: onnx.NodeProto) -> None:
        op = node.op_type
        flow = self.flows.get(node.input[0]) if node.input else None
        standard = is_onnx_domain(node)
        microsoft = node.domain == "com.microsoft"
        blocked = [self.flows[name] for name in self.dataflow.reads[index]
                   if name in self.flows and self.flows[name].block > 1]
        if blocked and not (standard and op in UNARY_OPS | ELEMENTWISE_OPS):
            for each in blocked:  # channels of several positions each: few rules follow them
                self.pin(each, DeclineCause.AXIS_MIXED, f"{op} {self.labels[index]} reads "
                         f"channels of {each.block} positions each")
        elif (("" if standard else node.domain, op) in FUSED_ATTENTION
              and (not standard or self.opset >= 23)):
            fused_attention(self, index, node)
        elif (standard or microsoft) and op in ELEMENTWISE_OPS:
            elementwise(self, index, node)
        elif (standard or microsoft) and op in UNARY_OPS and flow is not None:
            unary(self, index, node, flow)
        elif standard and op == "BatchNormalization" and flow is not None:
            at_axis_one(self, index, node, flow, node.input[1:5])
        elif standard and op == "InstanceNormalization" and flow is not None:
            # each channel is normalized on its own: it passes like BatchNormalization
            at_axis_one(self, index, node, flow, node.input[1:3])
        elif standard and op in ("QuantizeLinear", "DequantizeLinear") and flow is not None:
            quantize(self, index, node, flow)
        elif standard and op in POOL_OPS and flow is not None:
            at_axis_one(self, index, node, flow, [])
        elif standard and op in ("Pad", "Resize", "Upsample") and flow is not None:
            spatial(self, index, node, flow)
        elif standard and op in REDUCE_OPS and flow is not None:
            reduce(self, index, node, flow)
        elif standard and op in SOFTMAX_OPS and flow is not None:
            softmax(self, index, node, flow)
        elif op in LAYER_NORM_OPS or (standard and op == "GroupNormalization"):
            norm(self, index, node)
        elif standard and op == "Transpose" and flow is not None:
            transpose(self, index, node, flow)
        elif standard and op in RESHAPE_OPS and flow is not None:
            reshape(self, index, node, flow)
        elif standard and op == "Expand" and flow is not None:
            expand(self, index, node, flow)
        elif standard and op == "Concat":
            concat(self, index, node)
        elif standard and op == "Split" and flow is not None:
            split(self, index, node, flow)
        elif standard and op == "Slice" and flow is not None:
            slice_channels(self, index, node, flow)
        elif standard and op in ("Shape", "Size") and flow is not None:
            shape_read(self, index, node, flow)
        else:
            unknown(self, index, node)

    def _results(self) -> tuple[list[ChannelGroup], list[Declined]]:
        ordered: list[tuple[int, ChannelGroup | Declined]] = list(self.not_candidates)
        seen: set[int] = set()
        for space_id in range(len(self.spaces)):
            root = self.root(space_id)
            if root in seen:
                continue
            seen.add(root)
            space = self.spaces[root]
            if not space.producers:
                continue
            first = min(space.producers)
            ordered.append((first, self._finish(space, first)))
        ordered.sort(key=lambda item: (item[0], item[1].name if isinstance(item[1], ChannelGroup)
                                       else item[1].value))
        groups = [item for _, item in ordered if isinstance(item, ChannelGroup)]
        declined = [item for _, item in ordered if isinstance(item, Declined)]
        return groups, declined

    def _finish(self, space: Space, first: int) -> ChannelGroup | Declined:
        name = self.dataflow.nodes[first].output[0]
        if space.section is not None:  # a piece of the producers' channels (Split, Slice)
            name += f"[{space.section[0]}:{space.section[1]}]"
        pins = list(space.pins)
        if space.residual and space.hidden and not self.allow_hidden:
            pins.append((DeclineCause.RESIDUAL_STREAM,
                         "the hidden size of a transformer's residual stream"))
        if space.channels < 2:
            pins.append((DeclineCause.TOO_FEW_CHANNELS, f"{space.channels} channel"))
        roles = {member.role for member in space.members.values()}
        if not pins and MemberRole.INPUT not in roles:
            pins.append((DeclineCause.UNKNOWN_OP, "no consumer reads the channels"))
        if pins:
            causes = sorted({cause for cause, _ in pins}, key=CAUSE_ORDER.index)
            detail = next(detail for cause, detail in pins if cause == causes[0])
            return Declined(name, causes[0], detail, tuple(causes[1:]))
        members = tuple(sorted(space.members.values(),
                               key=lambda m: (_ROLE_ORDER[m.role], m.tensor, m.axis, m.offset)))
        producers = {self.dataflow.nodes[p].op_type for p in space.producers}
        ffn = (producers <= {"MatMul", "Gemm"} and len(space.consumers) == 1
               and space.consumers[0] in ("MatMul", "Gemm") and not space.residual
               and len(space.producers) <= 2)
        params = sum(self._carried(member, space.channels) for member in members)
        kind = (StructureKind.HEADS if space.heads else StructureKind.FFN if ffn
                else StructureKind.CHANNELS)
        return ChannelGroup(
            name=name, kind=kind,
            channels=space.channels, members=members,
            attributes=tuple(sorted(space.attributes.values(),
                                    key=lambda a: (a.node, a.attribute, a.index or 0))),
            shapes=tuple(sorted(space.shapes.values(), key=lambda s: (s.tensor, s.index,
                                                                  s.node or ""))),
            multiple_of=space.multiple_of, params=params, macs=space.macs,
            output_preserving=space.preserving)

    def _carried(self, member: Member, channels: int) -> int:
        dims = list(self.stored[member.tensor].dims)
        if not dims or dims[member.axis] == 0:
            return 0
        return math.prod(dims) // dims[member.axis] * channels * member.block


_ROLE_ORDER = {MemberRole.OUTPUT: 0, MemberRole.PER_CHANNEL: 1, MemberRole.INPUT: 2}
