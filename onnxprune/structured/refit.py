"""Refit the consumers of pruned groups on calibration data, stage by stage.

Once the kept channels of every group are chosen, each consumer weight (an INPUT member:
the layer that reads the group's channels) loses the removed channels' input features.
`refit_consumers` rewrites the model so that its consumers compute as well as they can
without them, in the *zeroed* form: the model keeps its shapes, the removed features'
weights are zero and the kept ones refitted (`reconstruction.least_squares`), and each
refitted consumer's bias gains the removed features' mean contribution (bias compensation,
in a bias slot: `bias_slots`). Where no normalization runs over a group's axis the zeroed
model computes what the shrunk model computes, so `surgery.shrink` then cuts the refitted
model as it would cut the original.

With structured OBS (`--method obs`) the kept channels themselves are chosen here, group by
group, on each stage's XᵀX (`reconstruction.obs_select`), where every consumer of the group
is complete in one stage and reads no other pruned group; other groups keep the channels
their dense scores chose, and are refitted by least squares.

Sequential by default, like SparseGPT: the graph is cut into stages
(`calib.ActivationCapture`), and the consumers of stage k are refitted on the layer inputs
of the model already refitted up to stage k−1, so each layer corrects the error of the
layers before it. Memory: one stage's statistics at a time (XᵀX only with least squares).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..calib import ActivationCapture, target_view
from ..calib.layouts import TargetView
from ..calib.stats import ActivationStats
from ..config import Pattern
from ..graph import GraphIndex
from ..inputs import Feed
from ..io import LoadedModel, read_array, write_array
from ..targets import Selection, discover_targets
from .bias_slots import add_bias_slots
from .groups import ChannelGroup, Member, MemberRole
from .reconstruction import bias_shift, centred, least_squares, obs_select

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitSettings:
    """What to do to each consumer: refit its kept weights by least squares (damped by
    `damp`), and/or shift its bias by the removed features' mean contribution."""

    least_squares: bool = False
    compensate: bool = False
    damp: float = 0.01
    sequential: bool = True
    # choose the kept channels here, by structured OBS on each stage's XᵀX (the keep sets
    # given only fix how many each group keeps)
    select: bool = False


@dataclass
class RefitResult:
    model: onnx.ModelProto  # the original's shapes, with bias slots and refitted consumers
    keep: dict[str, np.ndarray]  # the kept channels (changed by OBS selection)
    refitted: list[str] = field(default_factory=list)  # consumer weights refitted
    notes: dict[str, str] = field(default_factory=dict)  # consumers left as cut, and why
    selected: list[str] = field(default_factory=list)  # groups whose channels OBS chose


def refit_consumers(loaded: LoadedModel, groups: Sequence[ChannelGroup],
                    keep: Mapping[str, np.ndarray], feeds: Sequence[Feed],
                    settings: RefitSettings) -> RefitResult:
    """A copy of the model in which the consumers of the groups named in `keep` are
    refitted for the removal of their channels (see the module doc)."""
    keep = dict(keep)
    consumers = _consumers(groups, keep)
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto)
    slots = add_bias_slots(model, consumers) if settings.compensate else {}
    for name in sorted(set(consumers) - set(slots) if settings.compensate else ()):
        log.info("%s: not compensated (no bias can be written for its node)", name)
    copy = LoadedModel(model, loaded.path, loaded.base_dir, loaded.uses_external_data,
                       loaded.lazy)
    index = GraphIndex(model)
    targets, _ = discover_targets(model, Selection((), (), 0, Pattern()))
    result = RefitResult(model, keep)
    views: list[TargetView] = []
    for target in (t for t in targets if t.name in consumers):
        view = target_view(target, index)
        if isinstance(view, str):
            result.notes[target.name] = view
        else:
            views.append(view)
    for name in sorted(set(consumers) - {v.target.name for v in views} - set(result.notes)):
        result.notes[name] = "not a prunable weight of a MatMul, Gemm or Conv"
    stored = {s.name: s.tensor for s in index.stored if s.scope.is_main}
    by_name = {group.name: group for group in groups}
    if views:
        capture = ActivationCapture(copy, index, views, feeds, sequential=settings.sequential,
                                    hessian=settings.least_squares or settings.select)
        for stage in capture.stages():
            complete = {}
            for view in stage.views:
                complete[view.target.name] = (view, capture.stats_of(view))
                capture.release(view)
            done: set[str] = set()
            if settings.select:
                for group in _selectable(groups, keep, consumers, complete):
                    why = _select(group, keep, complete, stored, slots, settings, loaded)
                    if why:
                        log.info("%s: channels kept as scored (%s)", group.name, why)
                        continue
                    result.selected.append(group.name)
                    members = [m.tensor for m in group.members if m.role is MemberRole.INPUT]
                    result.refitted.extend(members)
                    done.update(members)
            for name, (view, stats) in complete.items():
                if name in done:
                    continue
                removed = _removed(consumers[name], by_name, keep)
                why = _refit(view, stats, stored, slots.get(name), removed, settings, loaded)
                if why:
                    result.notes[name] = why
                else:
                    result.refitted.append(name)
    for name, why in result.notes.items():  # at least cut, so the zeroed form holds
        log.info("%s: not refitted (%s)", name, why)
        tensor = stored[name]
        array = np.array(read_array(tensor, loaded.base_dir), copy=True)
        _zero(array, _removed(consumers[name], by_name, keep))
        write_array(tensor, array)
    return result


def _consumers(groups: Sequence[ChannelGroup], keep: Mapping[str, np.ndarray]
               ) -> dict[str, list[tuple[str, Member]]]:
    """By consumer weight: the (group name, INPUT member) of each pruned group it reads."""
    found: dict[str, list[tuple[str, Member]]] = {}
    for group in groups:
        if group.name in keep:
            for member in group.members:
                if member.role is MemberRole.INPUT:
                    found.setdefault(member.tensor, []).append((group.name, member))
    return found


def _removed(reads: Sequence[tuple[str, Member]], groups: Mapping[str, ChannelGroup],
             keep: Mapping[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
    """(axis, positions) the removed channels of each group the consumer reads occupy."""
    removed = []
    for name, member in reads:
        gone = np.ones(groups[name].channels, bool)
        gone[np.asarray(keep[name])] = False
        channels = np.flatnonzero(gone)
        positions = (member.offset + channels[:, None] * member.block
                     + np.arange(member.block)).reshape(-1)
        removed.append((member.axis, positions))
    return removed


def _selectable(groups: Sequence[ChannelGroup], keep: Mapping[str, np.ndarray],
                consumers: Mapping[str, list[tuple[str, Member]]],
                complete: Mapping[str, tuple[TargetView, ActivationStats]]
                ) -> list[ChannelGroup]:
    """The pruned groups whose every consumer is complete in this stage and reads no other
    pruned group: OBS chooses their channels over all their consumers at once."""
    chosen = []
    for group in groups:
        if group.name not in keep:
            continue
        readers = {m.tensor for m in group.members if m.role is MemberRole.INPUT}
        if readers and readers <= set(complete) and all(
                len(consumers[name]) == 1 for name in readers):
            chosen.append(group)
    return chosen


def _select(group: ChannelGroup, keep: dict[str, np.ndarray],
            complete: Mapping[str, tuple[TargetView, ActivationStats]],
            stored: Mapping[str, onnx.TensorProto], slots: Mapping[str, str],
            settings: RefitSettings, loaded: LoadedModel) -> str:
    """Choose the group's kept channels by structured OBS over its consumers and write
    their refitted weights (and bias shifts); '' when done, else why not."""
    readers = [m for m in group.members if m.role is MemberRole.INPUT]
    matrices, hessians, features, originals = [], [], [], []
    for member in readers:
        view, stats = complete[member.tensor]
        if stats.tokens == 0 or view.groups != 1 or stats.hessian is None:
            return f"{member.tensor}: no usable XᵀX"
        weights = np.asarray(read_array(stored[member.tensor], loaded.base_dir))
        hessian = stats.hessian[0]
        if settings.compensate and member.tensor in slots:
            hessian = centred(hessian, stats.sums[0], stats.tokens)
        matrices.append(view.to_obs(weights)[0].astype(np.float64))
        hessians.append(hessian)
        features.append(_channel_features(view, member, group.channels))
        originals.append(weights)
    if len({f.shape for f in features}) > 1:
        return "its consumers see a channel as different numbers of features"
    kept, refitted = obs_select(matrices, hessians, features, len(keep[group.name]),
                                settings.damp)
    keep[group.name] = kept
    for member, view_matrix, new, weights in zip(readers, matrices, refitted, originals,
                                                  strict=True):
        view, stats = complete[member.tensor]
        _store(view, stored, slots.get(member.tensor), view_matrix, new, weights, stats,
               settings, loaded)
    return ""


def _channel_features(view: TargetView, member: Member, channels: int) -> np.ndarray:
    """[channels, per]: the features (columns of `view.to_obs`) that carry each channel."""
    shape = view.target.shape
    obs_shape = view.to_obs(np.zeros(shape, dtype=np.float32)).shape
    ids = view.from_obs(np.broadcast_to(np.arange(obs_shape[-1], dtype=np.float64),
                                        obs_shape).copy())
    moved = np.moveaxis(ids, member.axis, 0)
    section = moved[member.offset:member.offset + channels * member.block]
    rows = section.reshape(channels, -1)
    return np.stack([np.unique(row) for row in rows]).astype(np.int64)


def _zero(array: np.ndarray, removed: Sequence[tuple[int, np.ndarray]]) -> None:
    for axis, positions in removed:
        np.moveaxis(array, axis, 0)[positions] = 0


def _refit(view: TargetView, stats: ActivationStats, stored: Mapping[str, onnx.TensorProto],
           slot: str | None, removed: Sequence[tuple[int, np.ndarray]],
           settings: RefitSettings, loaded: LoadedModel) -> str:
    """Refit one consumer in the model (its weight, and its bias slot); '' when done, else
    why it was not (the caller then only cuts it)."""
    if stats.tokens == 0:
        return "no calibration tokens reached this layer"
    if view.groups != 1:
        return f"a grouped Conv ({view.groups} groups)"
    tensor = stored[view.target.name]
    weights = np.asarray(read_array(tensor, loaded.base_dir))
    mask = np.ones(weights.shape, dtype=np.float32)
    _zero(mask, removed)
    kept = np.flatnonzero(view.to_obs(mask)[0, 0])
    matrix = view.to_obs(weights)[0].astype(np.float64)
    if settings.least_squares and stats.hessian is not None:
        hessian = stats.hessian[0]
        if settings.compensate and slot is not None:  # an intercept only where it lands
            hessian = centred(hessian, stats.sums[0], stats.tokens)
        refitted = least_squares(matrix, hessian, kept, settings.damp)
    else:
        refitted = np.zeros_like(matrix)
        refitted[:, kept] = matrix[:, kept]
    _store(view, stored, slot, matrix, refitted, weights, stats, settings, loaded)
    return ""


def _store(view: TargetView, stored: Mapping[str, onnx.TensorProto], slot: str | None,
           matrix: np.ndarray, refitted: np.ndarray, weights: np.ndarray,
           stats: ActivationStats, settings: RefitSettings, loaded: LoadedModel) -> None:
    """Write a consumer's refitted weights into the model, and its bias shift to its slot."""
    if settings.compensate and slot is not None:
        bias = stored[slot]
        values = np.asarray(read_array(bias, loaded.base_dir), dtype=np.float64)
        shifted = values + bias_shift(matrix, refitted, stats.means[0])
        write_array(bias, shifted.astype(_dtype(bias)))
    write_array(stored[view.target.name],
                view.from_obs(refitted[None].astype(np.float32)).astype(weights.dtype))


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
