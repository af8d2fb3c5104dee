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
from .groups import ChannelGroup, MemberRole
from .reconstruction import bias_shift, centred, least_squares

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefitSettings:
    """What to do to each consumer: refit its kept weights by least squares (damped by
    `damp`), and/or shift its bias by the removed features' mean contribution."""

    least_squares: bool = False
    compensate: bool = False
    damp: float = 0.01
    sequential: bool = True


@dataclass
class RefitResult:
    model: onnx.ModelProto  # the original's shapes, with bias slots and refitted consumers
    refitted: list[str] = field(default_factory=list)  # consumer weights refitted
    notes: dict[str, str] = field(default_factory=dict)  # consumers left as cut, and why


def refit_consumers(loaded: LoadedModel, groups: Sequence[ChannelGroup],
                    keep: Mapping[str, np.ndarray], feeds: Sequence[Feed],
                    settings: RefitSettings) -> RefitResult:
    """A copy of the model in which the consumers of the groups named in `keep` are
    refitted for the removal of their channels (see the module doc)."""
    removed = _removed_positions(groups, keep)
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto)
    slots = add_bias_slots(model, removed) if settings.compensate else {}
    copy = LoadedModel(model, loaded.path, loaded.base_dir, loaded.uses_external_data,
                       loaded.lazy)
    index = GraphIndex(model)
    targets, _ = discover_targets(model, Selection((), (), 0, Pattern()))
    result = RefitResult(model)
    views: list[TargetView] = []
    for target in (t for t in targets if t.name in removed):
        view = target_view(target, index)
        if isinstance(view, str):
            result.notes[target.name] = view
        else:
            views.append(view)
    for name in sorted(set(removed) - {v.target.name for v in views} - set(result.notes)):
        result.notes[name] = "not a prunable weight of a MatMul, Gemm or Conv"
    stored = {s.name: s.tensor for s in index.stored if s.scope.is_main}
    if views:
        capture = ActivationCapture(copy, index, views, feeds, sequential=settings.sequential,
                                    hessian=settings.least_squares)
        for stage in capture.stages():
            for view in stage.views:
                stats = capture.stats_of(view)
                capture.release(view)
                name = view.target.name
                why = _refit(view, stats, stored, slots.get(name), removed[name], settings,
                             loaded)
                if why:
                    result.notes[name] = why
                else:
                    result.refitted.append(name)
    for name, why in result.notes.items():  # at least cut, so the zeroed form holds
        log.info("%s: not refitted (%s)", name, why)
        tensor = stored[name]
        array = np.array(read_array(tensor, loaded.base_dir), copy=True)
        _zero(array, removed[name])
        write_array(tensor, array)
    return result


def _removed_positions(groups: Sequence[ChannelGroup], keep: Mapping[str, np.ndarray]
                       ) -> dict[str, list[tuple[int, np.ndarray]]]:
    """By consumer weight: (axis, positions) its removed channels occupy on that axis."""
    removed: dict[str, list[tuple[int, np.ndarray]]] = {}
    for group in groups:
        if group.name not in keep:
            continue
        gone = np.ones(group.channels, bool)
        gone[np.asarray(keep[group.name])] = False
        channels = np.flatnonzero(gone)
        for member in group.members:
            if member.role is not MemberRole.INPUT:
                continue
            positions = (member.offset + channels[:, None] * member.block
                         + np.arange(member.block)).reshape(-1)
            removed.setdefault(member.tensor, []).append((member.axis, positions))
    return removed


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
        if settings.compensate:
            hessian = centred(hessian, stats.sums[0], stats.tokens)
        refitted = least_squares(matrix, hessian, kept, settings.damp)
    else:
        refitted = np.zeros_like(matrix)
        refitted[:, kept] = matrix[:, kept]
    if settings.compensate and slot is not None:
        bias = stored[slot]
        values = np.asarray(read_array(bias, loaded.base_dir), dtype=np.float64)
        shifted = values + bias_shift(matrix, refitted, stats.means[0])
        write_array(bias, shifted.astype(_dtype(bias)))
    write_array(tensor, view.from_obs(refitted[None].astype(np.float32)).astype(weights.dtype))
    return ""


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
