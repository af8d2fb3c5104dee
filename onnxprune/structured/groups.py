"""Coupled channel groups as data: what structured pruning removes whole.

A channel group is a set of stored tensors (its `members`) that must lose the same channel
indices for the model to stay valid: the weights that make a channel (a producer's output
axis), the weights that read it (a consumer's input axis), and every per-channel tensor on
the way (biases, BatchNormalization parameters, per-channel constants of element-wise ops,
PRelu slopes, DequantizeLinear scales). Where the channel axis is cut into sections (a
Concat branch, a fused QKV weight, a grouped Conv) a member names the section by `offset`;
where one channel is several consecutive positions (a head of `head_dim` columns, a
flattened C×H×W), by `block`. Attributes and shape constants that count channels are edits
of the group too (`group` of a grouped Conv, `num_heads`, a Reshape target).

A candidate that no rule proves safe to shrink is `Declined`, with a `DeclineCause` and a
detail (as data: tests and tools test the cause, never the text).

The analysis (`structured.analysis`) builds groups from a model; the rewrite
(`structured.surgery`) is a pure function of (model, groups, kept channels per group).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StructureKind(enum.Enum):
    """What a group is, for `--structure`: output channels of Conv/Gemm/MatMul layers,
    hidden units of a feed-forward block, or attention heads."""

    CHANNELS = "channels"
    FFN = "ffn"
    HEADS = "heads"


class MemberRole(enum.Enum):
    """How a member tensor carries the group's channels."""

    OUTPUT = "output"  # a producer's weight, along its output-channel axis
    INPUT = "input"  # a consumer's weight, along its input-channel axis
    PER_CHANNEL = "per_channel"  # a bias, norm parameter or per-channel constant


@dataclass(frozen=True)
class Member:
    """One stored tensor of a group and where the group's channels lie in it.

    Channel c of the group is positions ``offset + c * block + j`` (0 <= j < block) of
    `axis` of the stored tensor `tensor` (an initializer, or the output of a Constant node,
    named as it is stored).
    """

    tensor: str
    axis: int
    role: MemberRole
    offset: int = 0
    block: int = 1


@dataclass(frozen=True)
class AttributeEdit:
    """An integer attribute of a node that counts the group's channels: after pruning it
    becomes ``kept // channels_per_unit`` (a grouped Conv's `group` when every group keeps
    the same count; `num_heads` of an attention op, with `channels_per_unit` = 1 head).
    Where `index` is set the attribute is a list of integers and only that entry counts the
    channels (a section's size in the `split` attribute of a Split before opset 13). Where
    one channel is several units (a KV head with its query heads: `q_num_heads` counts
    `units_per_channel` per channel) it becomes ``kept * units_per_channel //
    channels_per_unit``."""

    node: str  # the node's name
    attribute: str
    channels_per_unit: int = 1
    index: int | None = None
    units_per_channel: int = 1


@dataclass(frozen=True)
class ShapeEdit:
    """An entry of a shape constant (a Reshape target, a Split's sizes, a Slice's starts or
    ends, stored as `tensor`) that counts the group's channels: after pruning it becomes
    ``kept * per_channel`` (negative for a position counted from the end). Where `node` is
    set, the edit is of that node's reading of the tensor: if other nodes read the tensor
    too (exporters share equal shape constants between layers), the node is given a copy
    of its own."""

    tensor: str
    index: int
    per_channel: int = 1
    node: str | None = None  # the reading node's name


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together.

    `channels` is their number before pruning; a kept count must be a multiple of
    `multiple_of` (a GroupNorm's groups, a grouped Conv's groups) and at least one.
    `params` counts the members' parameters that carry the channels, `macs` an estimate
    of the multiply-accumulates per inference they take part in (batch 1; 0 where the
    model's static shapes do not tell, as with dynamic image sizes). Where the user
    allowed a normalization over the channel axis to be shrunk, `output_preserving` is
    False: the pruned model's outputs then differ from the zeroed model's.
    """

    name: str
    kind: StructureKind
    channels: int
    members: tuple[Member, ...]
    attributes: tuple[AttributeEdit, ...] = ()
    shapes: tuple[ShapeEdit, ...] = ()
    multiple_of: int = 1
    params: int = 0
    macs: int = 0
    output_preserving: bool = True


class DeclineCause(enum.Enum):
    """Why a candidate channel axis cannot be shrunk."""

    GRAPH_OUTPUT = "graph_output"  # the channels reach a graph output
    GRAPH_INPUT = "graph_input"  # ... or come from a graph input
    SHARED_WEIGHT = "shared_weight"  # a member is also read elsewhere (tied weights)
    SUBGRAPH_CAPTURE = "subgraph_capture"  # an If/Loop/Scan body reads the activation
    NORMALIZATION = "normalization"  # a norm over the channel axis (allow with an option)
    RESIDUAL_STREAM = "residual_stream"  # a transformer's hidden size (opt-in)
    UNKNOWN_OP = "unknown_op"  # an op no rule knows how the channel axis passes through
    AXIS_MIXED = "axis_mixed"  # an op mixes the channel axis with others (Reshape, ...)
    NOT_PER_CHANNEL = "not_per_channel"  # a constant operand that is not per channel
    NOT_A_CONSTANT = "not_a_constant"  # a weight that is computed, not stored
    GROUPS_DISAGREE = "groups_disagree"  # sections or groups that cannot keep one set
    DYNAMIC_SHAPE = "dynamic_shape"  # the channel count is not known statically
    TOO_FEW_CHANNELS = "too_few_channels"
    # a member's stored shape does not hold the group's channels (a model onnxruntime would
    # refuse, or attributes read another way than the tensors were made for)
    SHAPE_MISMATCH = "shape_mismatch"
    SHAPE_READ = "shape_read"  # a Shape/Size op reads the channel count


@dataclass(frozen=True)
class Declined:
    """A candidate channel axis (of activation `value`) that is not a group, and why."""

    value: str
    cause: DeclineCause
    detail: str = ""
    # further causes that pin the same candidate (`cause` is the most specific one)
    also: tuple[DeclineCause, ...] = ()

    @property
    def reason(self) -> str:
        words = self.cause.value.replace("_", " ")
        return f"{words}: {self.detail}" if self.detail else words
