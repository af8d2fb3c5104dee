"""A Slice of a range of the channels (`structured.rules_sections`): the sections it cuts
the producer's channels into, the bounds it rewrites, the forms it declines (by cause), and
shrink equal to zeroed in onnxruntime with random keep sets on each form it rewrites."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from test_structured_analysis import ints, model, node, weight
from test_structured_surgery import _check_case, _random_keep, _stored

from onnxprune.structured import (
    AttributeEdit,
    ChannelGroup,
    DeclineCause,
    Member,
    MemberRole,
    ShapeEdit,
)
from onnxprune.structured.analysis import find_groups

CHANNELS = 10
END = 2**63 - 1  # "to the end", as exporters write it


def _width(start: int, end: int, step: int = 1) -> int:
    return len(range(CHANNELS)[start:end:step])


def matmul_slice(start: int, end: int, *, second_reader: bool = False, steps: int | None = None,
                 axes: str = "last", opset: int = 17) -> onnx.ModelProto:
    """x[2, 8] @ W1[8, 10] -> h -> Slice [start:end] on the channels -> @ W2 -> y; with
    `second_reader`, h @ W3 -> z as well. `axes`: "last" (1), "negative" (-1) or
    "omitted" (bounds for axes 0 and 1). Before opset 10 the bounds are attributes."""
    omitted = axes == "omitted"
    starts, ends = ([0, start], [END, end]) if omitted else ([start], [end])
    axis_list = [1] if axes == "last" else [-1]
    if opset < 10:
        bounds = {"starts": starts, "ends": ends} | ({} if omitted else {"axes": axis_list})
        slicer, constants = node("Slice", ["h"], ["s"], **bounds), []
    else:
        # inputs starts, ends, axes, steps; an omitted one is "" (or left off at the end)
        inputs, constants = ["h", "starts", "ends"], [ints("starts", *starts),
                                                      ints("ends", *ends)]
        inputs.append("" if omitted else "axes")
        if not omitted:
            constants.append(ints("axes", *axis_list))
        if steps is not None:
            inputs.append("steps")
            constants.append(ints("steps", *([1, steps] if omitted else [steps])))
        slicer = node("Slice", inputs if inputs[-1] else inputs[:-1], ["s"])
    nodes = [node("MatMul", ["x", "W1"], ["h"]), slicer, node("MatMul", ["s", "W2"], ["y"])]
    inits = [weight("W1", 8, CHANNELS), weight("W2", _width(start, end, steps or 1), 3),
             *constants]
    outputs = ["y"]
    if second_reader:
        nodes.append(node("MatMul", ["h", "W3"], ["z"]))
        inits.append(weight("W3", CHANNELS, 3))
        outputs.append("z")
    return model(nodes, [("x", [2, 8])], outputs, inits, opset=opset)


def conv_slice(start: int, end: int, *, second_reader: bool = False, axes: str = "last"
               ) -> onnx.ModelProto:
    """Conv W1 (10 channels, bias) -> Relu -> r -> Slice [start:end] on axis 1 -> Conv W2
    (3x3) -> y; with `second_reader`, Conv W3 reads r too. `axes` as for matmul_slice (the
    channel axis is 1, or -3)."""
    omitted = axes == "omitted"
    starts, ends = ([0, start], [END, end]) if omitted else ([start], [end])
    inputs = ["r", "starts", "ends"] + ([] if omitted else ["axes"])
    nodes = [node("Conv", ["x", "W1", "B1"], ["c"]), node("Relu", ["c"], ["r"]),
             node("Slice", inputs, ["s"]),
             node("Conv", ["s", "W2"], ["y"], pads=[1, 1, 1, 1])]
    inits = [weight("W1", CHANNELS, 3, 1, 1), weight("B1", CHANNELS),
             weight("W2", 5, _width(start, end), 3, 3), ints("starts", *starts),
             ints("ends", *ends)]
    if not omitted:
        inits.append(ints("axes", 1 if axes == "last" else -3))
    outputs = ["y"]
    if second_reader:
        nodes.append(node("Conv", ["r", "W3"], ["z"]))
        inits.append(weight("W3", 4, CHANNELS, 1, 1))
        outputs.append("z")
    return model(nodes, [("x", [1, 3, 4, 4])], outputs, inits)


def _sections(proto: onnx.ModelProto) -> tuple[list[tuple[str, int]], dict[str, DeclineCause]]:
    groups, declined = find_groups(proto)
    return ([(g.name, g.channels) for g in groups],
            {d.value: d.cause for d in declined if "[" in d.value})


def _shrunk(proto: onnx.ModelProto, seed: int
            ) -> tuple[onnx.ModelProto, list[ChannelGroup], dict[str, np.ndarray]]:
    """find_groups, random keep sets on every group, then shrink vs zeroed in onnxruntime
    (`_check_case`: checker, parameters removed, equal outputs)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    del proto.graph.output[:]  # the checker wants the outputs' shapes
    proto.graph.output.extend(inferred.graph.output)
    groups, _ = find_groups(proto)
    keep = _random_keep(groups, np.random.default_rng(seed))
    return _check_case(proto, groups, keep, seed=seed), groups, keep


def _bounds(shrunk: onnx.ModelProto) -> tuple[list[int], list[int]]:
    return [int(v) for v in _stored(shrunk, "starts")], [int(v) for v in _stored(shrunk, "ends")]


# ---- the range is a group; channels no one else reads are declined alone -----------------


@pytest.mark.parametrize("start, end", [(2, -4), (3, -2), (-12, -4), (5, -3)])
def test_middle_range_is_a_group_and_the_unread_channels_are_declined_alone(start, end):
    proto = matmul_slice(start, end)
    first, last = range(CHANNELS)[start:end][0], range(CHANNELS)[start:end][-1] + 1
    groups, declined = find_groups(proto)
    assert [(g.name, g.channels) for g in groups] == [(f"h[{first}:{last}]", last - first)]
    assert set(groups[0].members) == {Member("W1", 1, MemberRole.OUTPUT, first),
                                      Member("W2", 0, MemberRole.INPUT)}
    # both bounds count channels that keep their number: nothing to rewrite
    assert groups[0].shapes == ()
    unread = {d.value: (d.cause, d.also) for d in declined if d.value.startswith("h[")}
    expected = {name: (DeclineCause.UNKNOWN_OP, ()) for name in
                ([f"h[0:{first}]"] if first else []) + [f"h[{last}:{CHANNELS}]"]}
    assert unread == expected
    for seed in (0, 1, 2):
        shrunk, _, keep = _shrunk(matmul_slice(start, end), seed)
        assert _bounds(shrunk) == ([start], [end])
        assert _stored(shrunk, "W1").shape == (8, CHANNELS - (last - first)
                                               + len(keep[groups[0].name]))


@pytest.mark.parametrize("producer", [matmul_slice, conv_slice])
@pytest.mark.parametrize("axes", ["last", "negative", "omitted"])
def test_with_a_second_reader_each_section_is_a_group_and_the_bounds_are_rewritten(
        producer, axes):
    proto = producer(2, -3, second_reader=True, axes=axes)
    name = "h" if producer is matmul_slice else "c"
    entry = 1 if axes == "omitted" else 0
    groups, _ = find_groups(proto)
    by_name = {g.name: g for g in groups}
    assert [(g.name, g.channels) for g in groups] == [
        (f"{name}[0:2]", 2), (f"{name}[2:7]", 5), (f"{name}[7:10]", 3)]
    # the start counts the channels before the range, the end (from the end) those after it
    assert by_name[f"{name}[0:2]"].shapes == (ShapeEdit("starts", entry, 1),)
    assert by_name[f"{name}[2:7]"].shapes == ()
    assert by_name[f"{name}[7:10]"].shapes == (ShapeEdit("ends", entry, -1),)
    assert {m.tensor for m in by_name[f"{name}[2:7]"].members} >= {"W1", "W2", "W3"}
    for seed in (0, 1, 2):
        shrunk, _, keep = _shrunk(producer(2, -3, second_reader=True, axes=axes), seed)
        starts, ends = _bounds(shrunk)
        assert starts[entry] == len(keep[f"{name}[0:2]"])
        assert ends[entry] == -len(keep[f"{name}[7:10]"])


def test_before_opset_10_a_start_counted_from_the_beginning_is_an_attribute_edit():
    proto = matmul_slice(4, END, second_reader=True, opset=9)
    groups, _ = find_groups(proto)
    assert [(g.name, g.attributes) for g in groups] == [
        ("h[0:4]", (AttributeEdit("s_node", "starts", 1, 0),)), ("h[4:10]", ())]
    for seed in (0, 1):
        shrunk, _, keep = _shrunk(matmul_slice(4, END, second_reader=True, opset=9), seed)
        slicer = next(n for n in shrunk.graph.node if n.op_type == "Slice")
        starts = next(a for a in slicer.attribute if a.name == "starts")
        assert list(helper.get_attribute_value(starts)) == [len(keep["h[0:4]"])]


# ---- declined, each by its cause ----------------------------------------------------------


@pytest.mark.parametrize("start, end, counted", [
    (2, 6, ["h[0:2]", "h[2:6]"]),  # the end counts the channels before the range and in it
    (-8, -4, ["h[2:6]", "h[6:10]"]),  # the start (from the end): in it and after it
])
def test_a_bound_counting_several_sections_pins_them(start, end, counted):
    _, causes = _sections(matmul_slice(start, end))
    for name in counted:
        assert causes[name] is DeclineCause.GROUPS_DISAGREE
    # a section the bound does not count is declined for its own reason only
    assert {n: c for n, c in causes.items() if n not in counted} == {
        n: DeclineCause.UNKNOWN_OP for n in causes if n not in counted}


@pytest.mark.parametrize("start, end", [(2, 6), (-8, -4)])
def test_a_section_a_bound_counts_is_pinned_even_where_it_is_read_elsewhere(start, end):
    # were h[0:2] (or h[6:10]) pruned, the end 6 (the start -8) would no longer say where
    # the range lies
    groups, causes = _sections(matmul_slice(start, end, second_reader=True))
    assert len(groups) == 1
    assert list(causes.values()) == [DeclineCause.GROUPS_DISAGREE] * 2
    for seed in (0, 1):
        _shrunk(matmul_slice(start, end, second_reader=True), seed)


def test_a_step_on_the_channel_axis_is_declined():
    _, declined = find_groups(matmul_slice(1, 9, steps=2))
    assert [(d.value, d.cause) for d in declined if d.value == "h"] == [
        ("h", DeclineCause.AXIS_MIXED)]
    # a step of 1, spelled, is no step
    assert _sections(matmul_slice(2, -4, steps=1))[0] == [("h[2:6]", 4)]
    assert _sections(matmul_slice(2, -4, steps=1, axes="omitted"))[0] == [("h[2:6]", 4)]


def test_an_empty_range_is_declined():
    proto = matmul_slice(6, 2)
    proto.graph.initializer[1].CopyFrom(weight("W2", 1, 3))  # a consumer of no rows is no model
    causes = {d.value: d.cause for d in find_groups(proto)[1]}
    assert causes["h"] is DeclineCause.AXIS_MIXED


def test_before_opset_10_a_bound_counted_from_the_end_is_declined():
    _, causes = _sections(matmul_slice(0, -4, second_reader=True, opset=9))
    assert causes == {"h[6:10]": DeclineCause.GROUPS_DISAGREE}
