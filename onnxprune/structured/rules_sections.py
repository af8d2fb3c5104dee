"""Rules for ops that cut the channel axis into sections: Split and Slice.

Each section a Split makes is a channel space of its own (the producer's channels at an
offset range: YOLOv8's C2f split, a fused QKV or gate/up weight); where a cut falls inside a
space, the space is divided (`Walk.divide`). The sizes that spell a section's count (the
`split` input or attribute, a Slice's starts and ends) become edits of the one space that
section is, or pin the channels where a size spans several spaces. A Split without sizes
(equal parts) keeps one set in every part, so that the parts stay equal.

A Slice of a middle range cuts the space in three: the channels before the range, the
range, the channels after it; each is a section of its own, and one that nothing else reads
is declined alone (no consumer) without pinning the range. A start counted from the
beginning counts the channels before the range, an end counted from the end those after
it, so `x[:, a:-r]` is rewritten; an end counted from the beginning (or a start from the
end) counts the kept channels of two sections, which one shape edit (a count of one group)
cannot say, so that range is declined.
"""

from __future__ import annotations

import onnx

from ..graph import attribute
from .groups import AttributeEdit, DeclineCause, ShapeEdit
from .propagation import Flow, Walk
from .rules_pointwise import meet


def split(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    """Split: along another axis each output carries the channels; along the channel axis
    each output carries the sections of its range."""
    label = walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"Split {label}: rank unknown")
        return
    outputs = list(node.output)
    if attribute(node, "axis", 0) % rank != flow.axis + rank:
        for name in outputs:
            walk.flows[name] = flow.moved(flow.axis, rank)
        return
    sizes, spelled_by = _split_sizes(walk, node, flow.channels, len(outputs))
    if sizes is None:
        walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"Split {label}: sizes computed")
        return
    if sum(sizes) != flow.channels or min(sizes) < 1:
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                 f"Split {label}: sizes {sizes} do not cut {flow.channels} channels")
        return
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    parts = cut(walk, node.input[0], list(zip(bounds, bounds[1:], strict=False)), rank)
    if spelled_by is None:  # equal parts: one keep set keeps them equal
        merged = parts[0]
        for part in parts[1:]:
            merged = meet(walk, merged, part, False, f"Split {label} into equal parts")
    for position, (name, part) in enumerate(zip(outputs, parts, strict=True)):
        walk.flows[name] = part
        if spelled_by is None:
            continue
        if len(part.sections) != 1:
            walk.pin(part, DeclineCause.GROUPS_DISAGREE,
                     f"Split {label}: output {position} holds channels of several groups")
            continue
        target = walk.space(part.sections[0][0])
        if spelled_by == "":
            target.attributes[(label, "split", position)] = AttributeEdit(
                label, "split", 1, position)
        else:
            _shape_edit(walk, part, spelled_by, position, 1, label)


def _split_sizes(walk: Walk, node: onnx.NodeProto, channels: int, count: int
                 ) -> tuple[list[int] | None, str | None]:
    """The section sizes of a Split, and what spells them: the name of its `split` input,
    "" for the attribute, None where they are implicit (equal parts)."""
    if len(node.input) > 1 and node.input[1]:
        values = walk.values(node.input[1])
        if values is None:
            return None, node.input[1]
        return [int(v) for v in values.reshape(-1)], node.input[1]
    spelled = attribute(node, "split", None)
    if spelled:
        return [int(v) for v in spelled], ""
    chunk = -(-channels // count)
    return [min(chunk, channels - k * chunk) for k in range(count)], None


def slice_channels(walk: Walk, index: int, node: onnx.NodeProto, flow: Flow) -> None:
    """Slice with constant starts, ends, axes and steps: along other axes the channels pass;
    on the channel axis (step 1) the output carries the sections of the sliced range, and a
    bound inside the channels becomes an edit of the one section it counts (a shape edit of
    the `starts`/`ends` input, or before opset 10 an edit of the attribute when the bound is
    counted from the beginning); a bound that counts several sections pins them all."""
    label = walk.labels[index]
    rank = walk.rank(flow, node.input[0])
    if rank is None:
        walk.pin(flow, DeclineCause.DYNAMIC_SHAPE, f"Slice {label}: rank unknown")
        return
    bounds = _slice_bounds(walk, node)
    if bounds is None:
        walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"Slice {label}: bounds computed")
        return
    starts, ends, axes, steps = bounds
    channel = flow.axis + rank
    positions = [a % rank for a in axes]
    if channel not in positions:
        walk.flows[node.output[0]] = flow.moved(flow.axis, rank)
        return
    k = positions.index(channel)
    total = flow.channels
    start, end = starts[k], ends[k]
    first = max(0, min(total, start + total if start < 0 else start))
    last = max(0, min(total, end + total if end < 0 else end))
    if steps[k] != 1:  # every step-th channel: no range of sections
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                 f"Slice {label}: step {steps[k]} on the channel axis")
        return
    if first >= last:
        walk.pin(flow, DeclineCause.AXIS_MIXED,
                 f"Slice {label}: [{start}:{end}] takes none of the {total} channels")
        return
    pieces = [(0, first), (first, last), (last, total)]
    before, inside, after = cut(walk, node.input[0], pieces, rank)
    walk.flows[node.output[0]] = inside
    attributes = len(node.input) < 3  # before opset 10 the bounds are attributes
    # a bound spells the kept count of the channels before it (or, counted from the end,
    # of those after it): fine where they are one section. Where they are several, each of
    # them is pinned: one that is a group of its own would change the count unseen.
    spelled_by = {(True, True): before, (False, True): _joined(before, inside),
                  (True, False): _joined(inside, after), (False, False): after}
    for value, name, is_start in ((start, "starts", True), (end, "ends", False)):
        if value == 0 or not -total < value < total:
            continue  # the start of the axis, or its end, whatever its new length
        counted = spelled_by[(is_start, value > 0)]
        if len(counted.sections) != 1:
            spans = ", ".join(_span(walk, space, offset, counted.channels)
                              for space, offset in counted.sections)
            walk.pin(counted, DeclineCause.GROUPS_DISAGREE,
                     f"Slice {label}: {name} {value} counts the kept channels of several "
                     f"sections ({spans})")
        elif attributes and value < 0:  # an attribute edit writes a count, never negative
            walk.pin(counted, DeclineCause.GROUPS_DISAGREE,
                     f"Slice {label}: {name} attribute {value} counts from the end")
        elif attributes:
            walk.space(counted.sections[0][0]).attributes[(label, name, k)] = AttributeEdit(
                label, name, 1, k)
        else:
            tensor = node.input[1] if is_start else node.input[2]
            _shape_edit(walk, counted, tensor, k, 1 if value > 0 else -1, label)


def _span(walk: Walk, space: int, offset: int, channels: int) -> str:
    """A section as the producers' positions it holds (where a Split or Slice divided
    them), else as its place in the counted range."""
    section = walk.space(space).section
    if section is not None:
        return f"[{section[0]}:{section[1]}]"
    return f"[{offset}:{offset + walk.space(space).channels}] of {channels}"


def _joined(first: Flow, second: Flow) -> Flow:
    """Two consecutive ranges of one flow as one."""
    sections = first.sections + tuple((space, offset + first.channels)
                                      for space, offset in second.sections)
    return Flow(sections, first.channels + second.channels, first.axis, first.rank)


def _slice_bounds(walk: Walk, node: onnx.NodeProto
                  ) -> tuple[list[int], list[int], list[int], list[int]] | None:
    if len(node.input) < 3:
        starts, ends = attribute(node, "starts", None), attribute(node, "ends", None)
        if starts is None or ends is None:
            return None
        axes = attribute(node, "axes", None) or list(range(len(starts)))
        return list(starts), list(ends), list(axes), [1] * len(starts)
    found: list[list[int] | None] = []
    for slot in range(1, 5):
        name = node.input[slot] if len(node.input) > slot else ""
        if not name:
            found.append(None)
            continue
        values = walk.values(name)
        if values is None:
            return None
        found.append([int(v) for v in values.reshape(-1)])
    starts, ends, axes, steps = found
    if starts is None or ends is None:
        return None
    return (starts, ends, axes or list(range(len(starts))), steps or [1] * len(starts))


def cut(walk: Walk, name: str, ranges: list[tuple[int, int]], rank: int) -> list[Flow]:
    """The flow of value `name` cut into consecutive channel ranges: spaces that a bound
    falls inside are divided first; each range's flow holds the sections in it."""
    flow = walk.flows[name]
    cuts: dict[int, set[int]] = {}
    for bound in {stop for _, stop in ranges[:-1]}:
        for space, offset in flow.sections:
            channels = walk.space(space).channels
            if offset < bound < offset + channels:
                cuts.setdefault(walk.root(space), set()).add(bound - offset)
    for space, inner in cuts.items():
        walk.divide(space, sorted(inner))
    flow = walk.flows[name]
    parts = []
    for start, stop in ranges:
        sections = tuple((space, offset - start) for space, offset in flow.sections
                         if start <= offset < stop)
        parts.append(Flow(sections, stop - start, flow.axis, rank))
    return parts


def _shape_edit(walk: Walk, flow: Flow, tensor: str, position: int, per_channel: int,
                reader: str) -> None:
    """Entry `position` of the stored integer vector `tensor`, as node `reader` reads it,
    spells the count of the one space of `flow` (a tensor other nodes read too is given to
    the reader as a copy of its own by the rewrite)."""
    if tensor not in walk.stored:
        walk.pin(flow, DeclineCause.NOT_A_CONSTANT, f"{reader}: {tensor} computed")
        return
    space = walk.space(flow.sections[0][0])
    node = reader if walk.uses(tensor) > 1 else None
    space.shapes[(tensor, position, node)] = ShapeEdit(tensor, position, per_channel, node)
