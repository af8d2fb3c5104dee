"""One structured prune: groups → scores → kept channels → the rewrite, and what it removed.

`prune_structured(loaded, config)` finds the coupled channel groups of the model
(`analysis.find_groups`), keeps those of the structures asked for (`--structure channels`:
every group but attention heads; `ffn`: hidden units of feed-forward blocks; `heads`) and
selected by `--include/--exclude` (a regular expression on the group's name or any member
tensor) and `--min-size` (the group's parameters; `select_groups`, which `inspect
--structured` uses too), scores their channels with the
registered score `config.method` (`registry.CHANNEL_SCORES`), chooses kept counts
(`selection`; under `--latency-budget`, from latency tables measured on this machine,
`latency`; with `--allocation sensitivity`, from per-group output-error curves,
`sensitivity`), and returns the shrunk model (`surgery.Shrinking`; the caller checks it, on
its file or in memory) with one report entry per group: channels before → after,
parameters and estimated MACs removed. With `stream`, the cut tensors' values are left
for the caller to write one at a time (`StructuredResult.shrinking`).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..config import PruneConfig, structure_names
from ..errors import ConfigError, NothingToPruneError
from ..graph import GraphIndex
from ..io import LoadedModel, read_array
from ..io.tensors import tensor_numel
from ..methods.base import Needs
from .analysis import find_groups
from .groups import ChannelGroup, DeclineCause, Declined, Member, MemberRole, StructureKind
from .scores import ChannelScore
from .selection import global_counts, keep_sets, uniform_counts
from .surgery import Shrinking

log = logging.getLogger(__name__)

# what each --structure names
STRUCTURES: dict[str, frozenset[StructureKind]] = {
    "channels": frozenset({StructureKind.CHANNELS, StructureKind.FFN}),
    "ffn": frozenset({StructureKind.FFN}),
    "heads": frozenset({StructureKind.HEADS}),
}


@dataclass
class GroupReport:
    name: str
    kind: str
    channels: int
    kept: int
    params: int  # parameters the group's channels carry, before pruning
    params_removed: int  # as if this group alone were pruned
    macs: int  # estimated multiply-accumulates per inference (batch 1), before
    macs_removed: int
    tensors: list[str]
    output_preserving: bool = True


@dataclass
class StructuredResult:
    model: onnx.ModelProto
    groups: list[GroupReport]
    declined: list[Declined]
    keep: dict[str, np.ndarray]  # kept channel indices of every pruned group
    params_before: int = 0  # every stored float parameter of the model
    params_after: int = 0
    # parameters of the selected groups' member tensors (each tensor once: a tensor between
    # two groups, like the middle weight of a 3-layer MLP, belongs to both)
    selected_params: int = 0
    skipped_groups: list[str] = field(default_factory=list)  # found, not selected
    # with `stream`: the rewrite whose cut tensors `model` does not hold yet
    shrinking: Shrinking | None = None
    # with --latency-budget: the budget, dense and predicted latency, the tables and what
    # they took (`_budget_counts`); the caller adds the measured latency of the output
    latency: dict | None = None


def parse_structures(text: str) -> frozenset[StructureKind]:
    """The kinds of groups `channels`, `ffn`, `heads` or a comma-separated combination
    name; a ConfigError for another word."""
    return frozenset(kind for name in structure_names(text) for kind in STRUCTURES[name])


def prune_structured(loaded: LoadedModel, config: PruneConfig, *, stream: bool = False
                     ) -> StructuredResult:
    """The model with the selected groups' weakest channels removed (see the module doc).

    With `stream`, `result.model` holds the cut tensors' new dims but not their values:
    `result.shrinking.values()` gives them one at a time (for a `ModelWriter` made with
    `expect=result.shrinking.tensors`), read from `loaded`, which must not change until then.
    """
    scored = score_groups(loaded, config)
    selected, scores, per_channel = scored.groups, scored.scores, scored.per_channel
    score = scored.score
    sparsity = config.target_sparsity
    round_to = config.round_to
    latency = None
    if config.latency_budget is not None:
        counts, latency = _budget_counts(loaded, scored, config)
    elif config.allocation_name == "global":
        counts = global_counts(selected, scores, per_channel, sparsity, round_to,
                               score.normalization)
    elif config.allocation_name == "sensitivity":
        from .sensitivity import sensitivity_counts

        counts = sensitivity_counts(loaded, scored, config)
    else:
        counts = uniform_counts(selected, sparsity, round_to)
    keep = keep_sets(selected, scores, counts)
    source, groups_cut = loaded.proto, selected
    if keep and (config.update != "none" or score.compensates or score.selects):
        source, groups_cut, keep = _refitted(loaded, selected, keep, config, score)
    shrinking = Shrinking(source, groups_cut, keep, base_dir=loaded.base_dir)
    if not stream:
        shrinking.store()
    shrunk = shrinking.model
    reports = [_report(g, counts[g.name], per_channel[g.name]) for g in selected]
    return StructuredResult(shrunk, reports, scored.declined, keep,
                            _float_params(loaded.proto), _float_params(shrunk),
                            sum(tensor_numel(t) for t in scored.stored.values()),
                            scored.skipped, shrinking if stream else None, latency)


@dataclass
class ScoredGroups:
    """The groups a structured prune selected, their channels' scores and what the rest of
    the prune needs of them."""

    groups: list[ChannelGroup]
    scores: dict[str, np.ndarray]  # by group name: one score per channel
    per_channel: dict[str, float]  # by group name: the parameters one channel carries
    stored: dict[str, onnx.TensorProto]  # every member's stored tensor, by name
    score: ChannelScore
    declined: list[Declined]
    skipped: list[str]  # found, not selected


def score_groups(loaded: LoadedModel, config: PruneConfig) -> ScoredGroups:
    """The model's groups selected by `config` (`select_groups`), each channel scored by
    `config.method`; a ConfigError or NothingToPruneError when there is nothing to prune."""
    from ..registry import CHANNEL_SCORES

    if _has_sparse_initializers(loaded.proto):  # calibration and timing read them dense
        raise ConfigError("structured pruning needs dense initializers; the model holds "
                          "sparse ones (`onnxprune densify` writes a dense copy)")
    kinds = parse_structures(config.structure)
    groups, declined = find_groups(loaded.proto, allow_norm=config.allow_norm,
                                   allow_hidden=config.allow_hidden,
                                   dims=config.synthetic_dims,
                                   input_shapes=config.synthetic_shapes)
    selected, skipped = select_groups(groups, config, kinds)
    found = _member_tensors(loaded, selected)
    selected, misfits = _fitting(selected, found)
    declined = [*declined, *misfits]
    if not selected:
        raise NothingToPruneError(
            f"nothing to prune: no channel group of --structure {config.structure} qualified "
            f"({len(groups)} groups found, {len(skipped)} not selected, {len(declined)} "
            "candidates declined; run `onnxprune inspect --structured` to see why)")
    stored = {m.tensor: found[m.tensor] for g in selected for m in g.members}
    score = CHANNEL_SCORES.build(config.method, config.options)
    calibration = (_consumer_statistics(loaded, selected, config)
                   if score.needs > Needs.NOTHING else None)
    # one group's members in memory at a time (a tensor between two groups is read twice)
    scores = {g.name: score.scores(g, _values(g, stored, loaded), config.seed, calibration)
              for g in selected}
    per_channel = {g.name: _params_per_channel(g, stored) for g in selected}
    return ScoredGroups(selected, scores, per_channel, stored, score, declined,
                        [g.name for g, _ in skipped])


def _budget_counts(loaded: LoadedModel, scored: ScoredGroups, config: PruneConfig
                   ) -> tuple[dict[str, int], dict]:
    """Kept counts under `--latency-budget` (`latency.allocate`: measured latency tables,
    `selection.budget_counts`, one calibration by a timed trial), and what the report says
    of it. With `--allocation sensitivity` a move costs the groups' measured error
    (`sensitivity.error_costs`), else their normalized channel scores."""
    from .latency import allocate, timing_feeds

    costs = None
    if config.allocation_name == "sensitivity":
        from .sensitivity import error_costs

        costs = error_costs(loaded, scored, config)
    feed = timing_feeds(loaded.proto, config.synthetic_dims, config.synthetic_shapes,
                        config.seed)
    return allocate(loaded, scored.groups, scored.scores, scored.per_channel, feed,
                    budget=float(config.latency_budget or 1.0), round_to=config.round_to,
                    normalization=scored.score.normalization, threads=config.latency_threads,
                    table_file=config.latency_table, calibrate=config.latency_calibrate,
                    costs=costs)


def _refitted(loaded: LoadedModel, groups: Sequence[ChannelGroup], keep: dict[str, np.ndarray],
              config: PruneConfig, score: ChannelScore
              ) -> tuple[onnx.ModelProto, list[ChannelGroup], dict[str, np.ndarray]]:
    """The model with the pruned groups' consumers refitted in the zeroed form (`refit`),
    its groups (found again, as the bias slots it gained are members of some) and the kept
    channels (chosen again by a score that `selects`)."""
    from ..calib import calibration_feeds
    from ..registry import STRUCTURED_UPDATES
    from .refit import RefitSettings, refit_consumers

    update = (STRUCTURED_UPDATES.build(config.update, config.options)
              if config.update != "none" else None)
    damp = update.damp if update is not None else float(getattr(score.options, "damp", 0.01))
    settings = RefitSettings(least_squares=update is not None or score.selects,
                             compensate=score.compensates, damp=damp,
                             sequential=config.calib_mode != "one-pass", select=score.selects)
    refit = refit_consumers(loaded, groups, keep, calibration_feeds(config, loaded.proto),
                            settings)
    log.info("%d consumer weights refitted, %d cut only%s", len(refit.refitted),
             len(refit.notes), f", channels of {len(refit.selected)} groups chosen by OBS"
             if score.selects else "")
    found, _ = find_groups(refit.model, allow_norm=config.allow_norm,
                           allow_hidden=config.allow_hidden)
    by_name = {group.name: group for group in found}
    missing = sorted(g.name for g in groups if g.name not in by_name)
    if missing:  # the slots only add members; a group that vanished is a bug
        raise RuntimeError(f"groups lost by adding bias slots: {missing}")
    return refit.model, [by_name[g.name] for g in groups], refit.keep


class Unselected(enum.Enum):
    """Why a group that the analysis found is left whole (the first that applies)."""

    KIND = "kind"  # not of a kind that --structure names
    EXCLUDE = "exclude"  # an --exclude pattern matches its name or a member's
    INCLUDE = "include"  # no --include pattern matches its name or a member's
    MIN_SIZE = "min_size"  # fewer parameters than --min-size


def select_groups(groups: Sequence[ChannelGroup], config: PruneConfig,
                  kinds: frozenset[StructureKind] | None = None
                  ) -> tuple[list[ChannelGroup], list[tuple[ChannelGroup, Unselected]]]:
    """The groups a structured prune removes channels of, and the others with why not:
    of `kinds` (every kind when None, as `inspect --structured` lists them), their name or
    a member tensor's matched by an `--include` pattern (when there are any) and by no
    `--exclude` pattern, with at least `--min-size` parameters."""
    selected: list[ChannelGroup] = []
    skipped: list[tuple[ChannelGroup, Unselected]] = []
    for group in groups:
        names = [group.name, *(m.tensor for m in group.members)]
        if kinds is not None and group.kind not in kinds:
            skipped.append((group, Unselected.KIND))
        elif any(re.search(p, n) for p in config.exclude for n in names):
            skipped.append((group, Unselected.EXCLUDE))
        elif config.include and not any(re.search(p, n) for p in config.include
                                        for n in names):
            skipped.append((group, Unselected.INCLUDE))
        elif group.params < config.min_size:
            skipped.append((group, Unselected.MIN_SIZE))
        else:
            selected.append(group)
    return selected, skipped


def _has_sparse_initializers(model: onnx.ModelProto) -> bool:
    from ..graph import walk_graphs

    return any(len(graph.sparse_initializer) for graph, _ in walk_graphs(model.graph))


def _member_tensors(loaded: LoadedModel, groups: Sequence[ChannelGroup]
                    ) -> dict[str, onnx.TensorProto]:
    """The stored tensor of every member that is stored, by name (values not read)."""
    by_name = {stored.name: stored.tensor for stored in GraphIndex(loaded.proto).stored}
    return {m.tensor: by_name[m.tensor] for g in groups for m in g.members
            if m.tensor in by_name}


def _fitting(groups: Sequence[ChannelGroup], stored: dict[str, onnx.TensorProto]
             ) -> tuple[list[ChannelGroup], list[Declined]]:
    """The groups whose members' stored shapes hold their channels, and declines for the
    others (a bias of the wrong length, a transpose attribute of an unreadable type)."""
    fitting: list[ChannelGroup] = []
    misfits: list[Declined] = []
    for group in groups:
        problems = (_misfit(group, m, stored.get(m.tensor)) for m in group.members)
        problem = next((p for p in problems if p), "")
        if problem:
            misfits.append(Declined(group.name, DeclineCause.SHAPE_MISMATCH, problem))
        else:
            fitting.append(group)
    return fitting, misfits


def _misfit(group: ChannelGroup, member: Member, tensor: onnx.TensorProto | None) -> str:
    if tensor is None:
        return f"{member.tensor} is not a stored tensor"
    dims = list(tensor.dims)
    if not 0 <= member.axis < len(dims):
        return f"{member.tensor} has no axis {member.axis}"
    needed = member.offset + group.channels * member.block
    if dims[member.axis] < needed:
        return (f"axis {member.axis} of {member.tensor} has {dims[member.axis]} positions, "
                f"the group needs {needed}")
    return ""


def _consumer_statistics(loaded: LoadedModel, groups: Sequence[ChannelGroup],
                         config: PruneConfig) -> dict:
    """(view, ‖X_j‖²) of every consumer weight of the groups, on the dense model, in one
    pass over the calibration data (`--calib`, or synthetic inputs with a warning)."""
    from ..calib import calibration_feeds
    from ..calib.one_pass import dense_statistics
    from ..config import Pattern
    from ..targets import Selection, discover_targets

    consumers = {m.tensor for g in groups for m in g.members if m.role is MemberRole.INPUT}
    targets, _ = discover_targets(loaded.proto, Selection((), (), 0, Pattern()))
    chosen = [t for t in targets if t.name in consumers]
    feeds = calibration_feeds(config, loaded.proto)
    found = dense_statistics(loaded, chosen, feeds)
    for name, entry in found.items():
        if isinstance(entry, str):
            log.warning("%s: not calibrated (%s)", name, entry)
    return {name: entry for name, entry in found.items() if not isinstance(entry, str)}


def _values(group: ChannelGroup, stored: dict[str, onnx.TensorProto], loaded: LoadedModel
            ) -> dict[str, np.ndarray]:
    """The values of one group's members, by name."""
    return {m.tensor: read_array(stored[m.tensor], loaded.base_dir) for m in group.members}


def _params_per_channel(group: ChannelGroup, stored: dict[str, onnx.TensorProto]) -> float:
    """Parameters one channel of the group carries over all its members."""
    return float(sum(_member_per_channel(m, stored[m.tensor]) for m in group.members))


def _member_per_channel(member: Member, tensor: onnx.TensorProto) -> int:
    dims = list(tensor.dims)
    return int(np.prod(dims, dtype=np.int64)) // dims[member.axis] * member.block


def _report(group: ChannelGroup, kept: int, per_channel: float) -> GroupReport:
    removed = group.channels - kept
    params = round(per_channel * group.channels)
    return GroupReport(group.name, group.kind.value, group.channels, kept, params,
                       round(per_channel * removed), group.macs,
                       group.macs * removed // max(1, group.channels),
                       sorted({m.tensor for m in group.members}), group.output_preserving)


def _float_params(model: onnx.ModelProto) -> int:
    """Elements of every stored floating-point tensor (initializers and Constant values)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.DOUBLE}
    return sum(tensor_numel(s.tensor) for s in GraphIndex(model).stored
               if s.tensor.data_type in floats)
