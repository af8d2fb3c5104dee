"""The rewrite of structured pruning: a model with whole channels removed.

`shrink(model, groups, keep)` is a pure function of the model, its channel groups and the
channels each group keeps: it returns a new model in which every member tensor of a group
is cut to the kept positions of its axis, every attribute and shape constant that counts
the group's channels says the new count, and the shape information that no longer holds
(`value_info`) is dropped. Tensors are found wherever they are stored: initializers and
Constant nodes, of the main graph or of any subgraph.

A tensor may carry several groups, or one group several times: a fused QKV weight holds
one section per projection (members with different offsets), a weight is the output of one
group along one axis and the input of another along the other. Each (tensor, axis) is cut
once, with every section of it at the same time; positions outside every section stay.

The rewrite comes in two steps, so that a model larger than memory can be written from
file to file: `Shrinking(model, groups, keep)` checks everything and builds the new model's
structure (cut tensors with their new dims and no values yet), and `Shrinking.values()`
reads, cuts and hands over the cut tensors one at a time, for a `ModelWriter` to stream
to the output (`api._prune_structured`) or for `store()` to keep inline (what `shrink`
does). `replace` gives final values a later step computed for some tensors (a consumer's
reconstructed kept columns, in the shrunk shape), written instead of the plain cut.

`zeroed(model, groups, keep)` is the oracle the rewrite is tested against: the original
model with the removed channels zeroed where they are read, so that they contribute nothing.
Where no normalization runs over a group's axis, the shrunk model computes what the zeroed
one computes. `check_shrunk(model)` runs strict shape inference and the full checker.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from ..errors import OnnxPruneError
from ..graph import GraphIndex, StoredTensor, node_label, walk_graphs
from ..io import load_model, read_array, uses_external_data, write_array
from ..io.tensors import external_info, iter_model_tensors
from .groups import ChannelGroup, Member, MemberRole

logger = logging.getLogger(__name__)


class SurgeryError(OnnxPruneError):
    """A shrunk model fails shape inference or the ONNX checker."""


@dataclass(frozen=True, eq=False)
class _Section:
    """The positions of one member on its tensor's axis, and the channels it keeps."""

    group: ChannelGroup
    member: Member
    kept: np.ndarray  # sorted channel indices of the group

    @property
    def span(self) -> range:
        """Every position of the group's channels on the axis."""
        start = self.member.offset
        return range(start, start + self.group.channels * self.member.block)

    def positions(self, channels: np.ndarray) -> np.ndarray:
        """The positions on the axis of the given channels, in order."""
        block = self.member.block
        return (self.member.offset + channels[:, None] * block + np.arange(block)).reshape(-1)

    def removed(self) -> np.ndarray:
        gone = np.ones(self.group.channels, bool)
        gone[self.kept] = False
        return np.flatnonzero(gone)


def shrink(model: onnx.ModelProto, groups: Sequence[ChannelGroup],
           keep: Mapping[str, np.ndarray], *, base_dir: Path | None = None,
           replace: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of `model` with the channels of each group named in `keep` cut to the kept
    ones; `model` itself is left as it was.

    `keep[name]` holds the kept channel indices of group `name`: sorted, unique, at least
    one, their count a multiple of the group's `multiple_of`. Groups not named in `keep`
    are left whole. `base_dir` is the folder of a model whose tensors are external data
    (a cut tensor is then stored inline). `replace[tensor]`: values to store instead of the
    plain cut (see `Shrinking`).

    Raises ValueError where the groups do not fit the model (a member's tensor missing or
    ambiguous, its axis out of range or too short, two sections overlapping, an attribute's
    node or a shape entry not found), a keep set is not valid for its group, or a
    replacement does not fit its tensor.
    """
    shrinking = Shrinking(model, groups, keep, base_dir=base_dir, replace=replace)
    shrinking.store()
    return shrinking.model


class Shrinking:
    """The rewrite of `shrink` in two steps: the new model's structure at once, the values
    of its cut tensors one at a time (`values()`), so that they can be streamed to a file.

    On construction every argument is checked (the errors of `shrink`) and `model` (the
    copy; the input is left as it was) gets its final structure: attributes, shape
    constants, graph inputs and `value_info` edited, and every tensor it cuts or replaces
    given its new dims and no values (`tensors`). `values()` then yields, one at a time, each
    such tensor (a `StoredTensor` of `model`) with its final values, read from the input model
    (which must not change until then) and cut, or taken from `replace`. Until they are
    stored (`store()`, or a `ModelWriter` given `tensors` as `expect` and each value with
    `put`), `model` is not a valid model.

    `replace[name]`: the final values of stored tensor `name`, of its dtype: in the shrunk
    shape for a cut tensor (a consumer's reconstructed kept columns), in its stored shape
    for one that no group cuts (a bias that compensates the removed channels).
    """

    def __init__(self, model: onnx.ModelProto, groups: Sequence[ChannelGroup],
                 keep: Mapping[str, np.ndarray], *, base_dir: Path | None = None,
                 replace: Mapping[str, np.ndarray] | None = None):
        self.source = model
        self.base_dir = base_dir
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        index = GraphIndex(self.model)
        sections = _sections(index, groups, keep)
        kept_counts = {group.name: len(kept) for group, kept in _kept_sets(groups, keep)}
        stored = _stored_by_name(index)
        # tensor name -> (axis, its sections), in the order they are cut (a tensor cut on two
        # axes has two entries)
        self._cuts: dict[str, list[tuple[int, list[_Section]]]] = {}
        self._pending: dict[str, StoredTensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for found, axis, parts in sections:
            if base_dir is None and uses_external_data(found.tensor):
                raise ValueError(f"tensor {found.name!r} is external data: pass the model's "
                                 "folder as base_dir")
            dims = list(shapes.get(found.name, tuple(found.tensor.dims)))
            dims[axis] = len(_kept_positions(dims[axis], parts))
            shapes[found.name] = tuple(dims)
            self._cuts.setdefault(found.name, []).append((axis, parts))
            self._pending[found.name] = found
        self._replace = dict(replace or {})
        for name, values in self._replace.items():
            found = _find(stored, name, "replace")
            shape = shapes.get(name, tuple(found.tensor.dims))
            array = np.asarray(values)
            if array.shape != shape or array.dtype != _dtype(found.tensor):
                raise ValueError(f"replace: tensor {name!r} needs {_dtype(found.tensor)}"
                                 f"{shape}, not {array.dtype}{array.shape}")
            shapes[name] = shape
            self._pending[name] = found
        for name, found in self._pending.items():
            _clear_values(found.tensor, shapes[name])
        _edit_attributes(self.model, groups, kept_counts)
        _edit_shapes(self.model, index, groups, kept_counts, base_dir)
        _update_initializer_inputs(self.model)
        for graph, _ in walk_graphs(self.model.graph):
            del graph.value_info[:]
        logger.debug("shrinking %d tensor axes of %d groups", len(sections), len(kept_counts))

    @property
    def tensors(self) -> list[TensorProto]:
        """The tensors of `model` whose values `values()` gives (none stored yet)."""
        return [found.tensor for found in self._pending.values()]

    def values(self) -> Iterator[tuple[StoredTensor, np.ndarray]]:
        """Each pending tensor of `model` with its final values, one at a time."""
        sources = _stored_by_name(GraphIndex(self.source))
        for name, found in self._pending.items():
            array = self._replace.get(name)
            if array is None:
                array = _read(sources[name][0], self.base_dir)
                for axis, parts in self._cuts[name]:
                    array = np.take(array, _kept_positions(array.shape[axis], parts),
                                    axis=axis)
            yield found, np.asarray(array)

    def store(self) -> None:
        """Store every pending tensor's values inline in `model`."""
        for found, array in self.values():
            write_array(found.tensor, array)


def zeroed(model: onnx.ModelProto, groups: Sequence[ChannelGroup],
           keep: Mapping[str, np.ndarray], *, base_dir: Path | None = None
           ) -> onnx.ModelProto:
    """A copy of `model` in which the channels `keep` removes are zeroed where they are
    read: the positions of removed channels in a group's INPUT members (the consumers'
    weights along their input axis), so that whatever runs between producer and consumer
    (activations, BatchNormalization, biases), the removed channels never reach the rest of
    the model. A group without INPUT members (channels that meet only each other, as query
    and key dimensions do in a dot product) has its OUTPUT and PER_CHANNEL members zeroed
    instead. Shapes, attributes and shape constants are unchanged.

    For groups with no normalization over their axis, `shrink` with the same arguments
    computes the same outputs: the oracle of the rewrite.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for stored, array in zeroed_values(result, groups, keep, base_dir=base_dir):
        _write(stored.tensor, array)
    return result


def zeroed_values(model: onnx.ModelProto, groups: Sequence[ChannelGroup],
                  keep: Mapping[str, np.ndarray], *, base_dir: Path | None = None
                  ) -> list[tuple[StoredTensor, np.ndarray]]:
    """The tensors `zeroed` changes, each with its zeroed values; `model` is only read."""
    index = GraphIndex(model)
    sections = _sections(index, groups, keep)
    roles = {group.name: zeroed_roles(group) for group in groups}
    changed = []
    for stored, axis, parts in sections:
        chosen = [part for part in parts if part.member.role in roles[part.group.name]]
        if not chosen:
            continue
        array = np.array(_read(stored, base_dir), copy=True)
        moved = np.moveaxis(array, axis, 0)  # a view: writes go to `array`
        for part in chosen:
            moved[part.positions(part.removed())] = 0
        changed.append((stored, array))
    return changed


def zeroed_roles(group: ChannelGroup) -> frozenset[MemberRole]:
    """The members `zeroed` zeroes in a group: its INPUT members (the consumers' weights),
    or, for a group without any, its OUTPUT and PER_CHANNEL members."""
    if any(m.role is MemberRole.INPUT for m in group.members):
        return frozenset({MemberRole.INPUT})
    return frozenset({MemberRole.OUTPUT, MemberRole.PER_CHANNEL})


def check_shrunk(model: onnx.ModelProto) -> None:
    """Raise SurgeryError unless the in-memory `model` passes strict shape inference (types
    checked) and the full ONNX checker."""
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise SurgeryError(f"the shrunk model fails shape inference: {_first_line(exc)}"
                           ) from exc
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SurgeryError(f"the shrunk model fails the ONNX checker: {_first_line(exc)}"
                           ) from exc


def check_shrunk_file(path: Path) -> None:
    """`check_shrunk` for a written model (external data and models over 2 GiB included).

    The checker is given the model's graph without its weights: the model read lazily
    (`load_model(lazy=True)`: tensors of `LAZY_MIN_BYTES` or more become references into
    the file; integer ones, which shape inference may need the values of, are read back),
    saved beside it for the check only (onnx looks for external data beside the file it
    checks). onnx's own check of the file would parse every inline tensor: about 1.2 x the
    output's size in memory for SmolLM2-135M, more than the rewrite itself needs.
    """
    loaded = load_model(path, lazy=True)
    for tensor in iter_model_tensors(loaded.proto):
        if (tensor.data_type in _SHAPE_TYPES and uses_external_data(tensor)
                and external_info(tensor).get("location") == path.name):
            values = read_array(tensor, loaded.base_dir)
            for name in ("external_data", "data_location"):
                tensor.ClearField(name)
            tensor.raw_data = np.ascontiguousarray(values).tobytes()
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".check")
    try:
        with os.fdopen(handle, "wb") as fh:
            fh.write(loaded.proto.SerializeToString())
        onnx.checker.check_model(name, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise SurgeryError(f"the shrunk model fails the ONNX checker: {_first_line(exc)}"
                           ) from exc
    finally:
        os.unlink(name)


# the element types of shape constants (Reshape targets, Slice starts, ...)
_SHAPE_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32})


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _kept_sets(groups: Sequence[ChannelGroup], keep: Mapping[str, np.ndarray]
               ) -> list[tuple[ChannelGroup, np.ndarray]]:
    """Each group named in `keep` with its checked keep set (int64, sorted, unique)."""
    by_name: dict[str, ChannelGroup] = {}
    for group in groups:
        if group.name in by_name:
            raise ValueError(f"two groups are named {group.name!r}")
        by_name[group.name] = group
    unknown = sorted(set(keep) - set(by_name))
    if unknown:
        raise ValueError(f"keep names groups that are not given: {unknown}")
    chosen = []
    for name, indices in keep.items():
        group = by_name[name]
        kept = np.asarray(indices)
        if kept.ndim != 1 or not np.issubdtype(kept.dtype, np.integer):
            raise ValueError(f"group {name!r}: kept channels must be a 1-D integer array, "
                             f"not {kept.dtype}{kept.shape}")
        kept = kept.astype(np.int64)
        if kept.size == 0:
            raise ValueError(f"group {name!r}: no channel kept (at least one must be)")
        if np.any(np.diff(kept) <= 0):
            raise ValueError(f"group {name!r}: kept channels must be sorted and unique")
        if kept[0] < 0 or kept[-1] >= group.channels:
            raise ValueError(f"group {name!r}: kept channels must lie in [0, "
                             f"{group.channels}), not {kept[0]}..{kept[-1]}")
        if kept.size % group.multiple_of:
            raise ValueError(f"group {name!r}: {kept.size} channels kept, not a multiple of "
                             f"{group.multiple_of}")
        chosen.append((group, kept))
    return chosen


def _stored_by_name(index: GraphIndex) -> dict[str, list[StoredTensor]]:
    stored: dict[str, list[StoredTensor]] = {}
    for item in index.stored:
        stored.setdefault(item.name, []).append(item)
    return stored


def _find(stored: Mapping[str, list[StoredTensor]], name: str, what: str) -> StoredTensor:
    found = stored.get(name, [])
    if not found:
        raise ValueError(f"{what}: no initializer or Constant node stores tensor {name!r}")
    if len(found) > 1:
        raise ValueError(f"{what}: tensor {name!r} is stored {len(found)} times (in "
                         "different graphs); the name is ambiguous")
    return found[0]


def _sections(index: GraphIndex, groups: Sequence[ChannelGroup],
              keep: Mapping[str, np.ndarray]
              ) -> list[tuple[StoredTensor, int, list[_Section]]]:
    """The sections to cut, as (stored tensor, axis, its sections), every member checked
    against its tensor."""
    stored = _stored_by_name(index)
    by_axis: dict[tuple[str, int], list[_Section]] = {}
    tensors: dict[str, StoredTensor] = {}
    for group, kept in _kept_sets(groups, keep):
        for member in dict.fromkeys(group.members):  # a member listed twice is cut once
            what = f"group {group.name!r}, member {member.tensor!r} (axis {member.axis})"
            found = _find(stored, member.tensor, what)
            dims = tuple(found.tensor.dims)
            if not -len(dims) <= member.axis < len(dims):
                raise ValueError(f"{what}: axis out of range for shape {list(dims)}")
            if member.offset < 0 or member.block < 1:
                raise ValueError(f"{what}: offset {member.offset} and block {member.block} "
                                 "must be >= 0 and >= 1")
            axis = member.axis % len(dims)
            needed = member.offset + group.channels * member.block
            if dims[axis] < needed:
                raise ValueError(f"{what}: axis length {dims[axis]} is less than offset "
                                 f"{member.offset} + {group.channels} channels x block "
                                 f"{member.block} = {needed}")
            tensors[member.tensor] = found
            by_axis.setdefault((member.tensor, axis), []).append(_Section(group, member, kept))
    for (name, axis), parts in by_axis.items():
        _check_disjoint(name, axis, parts)
    return [(tensors[name], axis, parts) for (name, axis), parts in by_axis.items()]


def _check_disjoint(name: str, axis: int, parts: Sequence[_Section]) -> None:
    ordered = sorted(parts, key=lambda part: part.span.start)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.span.start < before.span.stop:
            raise ValueError(f"tensor {name!r}, axis {axis}: the sections of group "
                             f"{before.group.name!r} (positions {before.span.start}.."
                             f"{before.span.stop - 1}) and group {after.group.name!r} "
                             f"(positions {after.span.start}..{after.span.stop - 1}) overlap")


def _kept_positions(length: int, parts: Iterable[_Section]) -> np.ndarray:
    """The positions of an axis that stay: those of kept channels, and every position that
    no section covers."""
    stays = np.ones(length, bool)
    for part in parts:
        stays[part.span.start:part.span.stop] = False
        stays[part.positions(part.kept)] = True
    return np.flatnonzero(stays)


def _read(stored: StoredTensor, base_dir: Path | None) -> np.ndarray:
    if uses_external_data(stored.tensor) and base_dir is None:
        raise ValueError(f"tensor {stored.name!r} is external data: pass the model's folder "
                         "as base_dir")
    return read_array(stored.tensor, base_dir or Path("."))


def _dtype(tensor: TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def _clear_values(tensor: TensorProto, dims: Sequence[int]) -> None:
    """Give the tensor new dims and no values (whichever field held them)."""
    for name in ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                 "double_data", "uint64_data", "external_data", "data_location"):
        tensor.ClearField(name)
    del tensor.dims[:]
    tensor.dims.extend(dims)


def _write(tensor: TensorProto, array: np.ndarray) -> None:
    """Store `array` inline as the tensor's values, its shape included."""
    del tensor.dims[:]
    tensor.dims.extend(array.shape)
    write_array(tensor, array)


def _edit_attributes(model: onnx.ModelProto, groups: Sequence[ChannelGroup],
                     kept_counts: Mapping[str, int]) -> None:
    nodes = {label: [node for node, _ in found]
             for label, found in _nodes_by_label(model).items()}
    done: dict[tuple[int, str, int | None], str] = {}
    for group in groups:
        if group.name not in kept_counts:
            continue
        kept = kept_counts[group.name]
        for edit in group.attributes:
            what = f"group {group.name!r}, attribute {edit.attribute!r} of node {edit.node!r}"
            found = nodes.get(edit.node, [])
            if len(found) != 1:
                raise ValueError(f"{what}: {len(found)} nodes have that name (one is needed)")
            units = kept * edit.units_per_channel
            if edit.channels_per_unit < 1 or edit.units_per_channel < 1 or (
                    units % edit.channels_per_unit):
                raise ValueError(f"{what}: {kept} kept channels are not whole units of "
                                 f"{edit.channels_per_unit}")
            node = found[0]
            key = (id(node), edit.attribute, edit.index)
            if key in done and done[key] != group.name:
                raise ValueError(f"{what}: also edited by group {done[key]!r}")
            done[key] = group.name
            _set_int_attribute(node, edit.attribute, units // edit.channels_per_unit, what,
                               edit.index)


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int, what: str,
                       index: int | None = None) -> None:
    """Set integer attribute `name`, or entry `index` of integer-list attribute `name`."""
    for attr in node.attribute:
        if attr.name != name:
            continue
        if index is None:
            if attr.type != AttributeProto.INT:
                raise ValueError(f"{what}: the attribute is not an integer")
            attr.i = value
        else:
            if attr.type != AttributeProto.INTS or not 0 <= index < len(attr.ints):
                raise ValueError(f"{what}: entry {index} of an integer list not found")
            attr.ints[index] = value
        return
    if index is not None:
        raise ValueError(f"{what}: the node has no such attribute")
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _edit_shapes(model: onnx.ModelProto, index: GraphIndex, groups: Sequence[ChannelGroup],
                 kept_counts: Mapping[str, int], base_dir: Path | None) -> None:
    stored = _stored_by_name(index)
    # (tensor, reading node or None) -> entry -> (value, group)
    entries: dict[tuple[str, str | None], dict[int, tuple[int, str]]] = {}
    for group in groups:
        if group.name not in kept_counts:
            continue
        for edit in group.shapes:
            what = f"group {group.name!r}, shape entry {edit.index} of {edit.tensor!r}"
            tensor = _find(stored, edit.tensor, what).tensor
            if len(tensor.dims) != 1 or tensor.data_type not in (TensorProto.INT64,
                                                                  TensorProto.INT32):
                raise ValueError(f"{what}: not a 1-D int64/int32 tensor")
            if not 0 <= edit.index < tensor.dims[0]:
                raise ValueError(f"{what}: index out of range for {tensor.dims[0]} entries")
            value = kept_counts[group.name] * edit.per_channel
            edits = entries.setdefault((edit.tensor, edit.node), {})
            earlier = edits.get(edit.index)
            if earlier is not None and earlier[1] != group.name:
                raise ValueError(f"{what}: also edited by group {earlier[1]!r}")
            edits[edit.index] = (value, group.name)
    readers = _nodes_by_label(model) if any(node for _, node in entries) else {}
    for (name, reader), edits in entries.items():
        found = stored[name][0]
        array = np.array(_read(found, base_dir), copy=True)
        for position, (value, _) in edits.items():
            array[position] = value
        if reader is None:
            _write(found.tensor, array)
            continue
        nodes = readers.get(reader, [])
        if len(nodes) != 1 or name not in nodes[0][0].input:
            raise ValueError(f"shape edits of {name!r}: {len(nodes)} nodes named {reader!r} "
                             "read it (one is needed)")
        node, graph = nodes[0]
        # read now by others (earlier readers may have been given copies already)?
        shared = name in index.main.escaping or any(
            other is not node and name in other.input
            for readers_of in readers.values() for other, _ in readers_of)
        if not shared:
            _write(found.tensor, array)
            continue
        private = _unique_name(model, f"{name}__{reader}")
        graph.initializer.append(numpy_helper.from_array(array, private))
        for slot, value_name in enumerate(node.input):
            if value_name == name:
                node.input[slot] = private


def _nodes_by_label(model: onnx.ModelProto
                    ) -> dict[str, list[tuple[onnx.NodeProto, onnx.GraphProto]]]:
    """Every node by its label (an unnamed node as GraphIndex names it), with its graph."""
    nodes: dict[str, list[tuple[onnx.NodeProto, onnx.GraphProto]]] = {}
    for graph, _ in walk_graphs(model.graph):
        for position, node in enumerate(graph.node):
            nodes.setdefault(node_label(node, position), []).append((node, graph))
    return nodes


def _unique_name(model: onnx.ModelProto, wanted: str) -> str:
    taken = {tensor.name for graph, _ in walk_graphs(model.graph) for tensor in graph.initializer}
    taken |= {name for graph, _ in walk_graphs(model.graph) for node in graph.node
              for name in node.output}
    name, count = wanted, 1
    while name in taken:
        name, count = f"{wanted}_{count}", count + 1
    return name


def _update_initializer_inputs(model: onnx.ModelProto) -> None:
    """Give a graph input that an initializer of the same name backs (as models before IR 4
    must list them) the initializer's new shape."""
    for graph, _ in walk_graphs(model.graph):
        shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
        for value in graph.input:
            dims = shapes.get(value.name)
            if dims is None or not value.type.HasField("tensor_type"):
                continue
            shape = value.type.tensor_type.shape
            if tuple(d.dim_value for d in shape.dim) == dims:
                continue
            del shape.dim[:]
            for size in dims:
                shape.dim.add().dim_value = size
