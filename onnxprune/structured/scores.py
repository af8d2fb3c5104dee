"""How much each channel of a group is worth keeping: the structured scores (`--method` with
`--structure`), registered parts like the unstructured methods (`registry.CHANNEL_SCORES`).

A score reads the group's member tensors (stored values, by tensor name) and returns one
float64 per channel, higher = keep. `magnitude` is the group norm: the L2 norm of channel
c over every coupled tensor, ‖[W_out[c], W_in[:, c], b[c], ...]‖₂ (DepGraph's group
importance with p = 2); `random` is the baseline, seeded by the run's seed and the group.
`wanda` (calibrated) is Wanda's score in structured form: channel c of the group is input
feature c of its consumers, and its score is Σ_i |W_ic|·‖X_c‖₂ over every consumer weight
(the consumer's layer input X gathered on the dense model, as `--method wanda` does).
`flap` (calibrated) is FLAP's fluctuation metric: Σ_i W_ic²·Var(X_c) over every consumer
weight, the channels whose removal changes the consumers' output least *around its mean*;
the mean part is restored by bias compensation (`--bias-compensation`, on by default: the
removed channels' mean contribution is added to the consumers' biases, see `refit`).
FLAP's scores are standardized per group (column by column, then averaged over a channel's
columns) before global allocation ranks them across groups, as FLAP's adaptive structure
does. `obs` (calibrated) allocates with FLAP's scores, then chooses each group's channels
while its consumers are refitted, by structured OBS on each stage's XᵀX (`refit`).
"""

from __future__ import annotations

import logging
import zlib
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..methods.base import Needs
from ..methods.wanda import wanda_scores
from ..parts import Part, option
from .groups import ChannelGroup, Member, MemberRole

if TYPE_CHECKING:
    from ..calib import ActivationStats, TargetView

    # by consumer weight name: its layer input's view and statistics on the dense model
    Calibration = Mapping[str, tuple[TargetView, ActivationStats]]

log = logging.getLogger(__name__)


def channel_slices(member: Member, array: np.ndarray, channels: int) -> np.ndarray:
    """The member's values as [channels, everything else] (float64): row c holds every
    value of channel c (its `block` positions on the axis, all other axes)."""
    moved = np.moveaxis(np.asarray(array), member.axis, 0)
    section = moved[member.offset:member.offset + channels * member.block]
    return section.reshape(channels, -1).astype(np.float64)


class ChannelScore(Part):
    """A structured score: one value per channel of a group (higher = keep). A score that
    `needs` calibration statistics gets them for the group's consumer weights."""

    needs: ClassVar[Needs] = Needs.NOTHING
    # how global allocation puts different groups' scores on one scale: divided by their
    # group's mean ("mean"), standardized within their group ("standard"), or as they are
    # ("none": the score already puts them on one)
    normalization: ClassVar[str] = "mean"
    # the channels are chosen again while the consumers are refitted (structured OBS): the
    # scores here only allocate how many each group keeps
    selects: ClassVar[bool] = False

    @property
    def compensates(self) -> bool:
        """Whether the consumers' biases take the removed channels' mean contribution."""
        return bool(getattr(self.options, "bias_compensation", False))

    @abstractmethod
    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0, calibration: Calibration | None = None) -> np.ndarray:
        """float64 [group.channels]; `tensors` holds every member's stored values."""


class GroupMagnitude(ChannelScore):
    name = "magnitude"
    description = "L2 norm of each channel over every coupled tensor (group norm)"

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0, calibration: Calibration | None = None) -> np.ndarray:
        energy = np.zeros(group.channels, dtype=np.float64)
        for member in group.members:
            rows = channel_slices(member, tensors[member.tensor], group.channels)
            energy += np.einsum("ij,ij->i", rows, rows)
        return np.sqrt(energy)


class RandomChannels(ChannelScore):
    name = "random"
    description = "uniform random scores (a baseline), seeded by --seed and the group"

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0, calibration: Calibration | None = None) -> np.ndarray:
        stream = zlib.crc32(group.name.encode("utf-8"))
        return np.random.default_rng([seed, stream]).random(group.channels)


class StructuredWanda(ChannelScore):
    name = "wanda"
    description = "sum over the consumers' input column of |W|·‖X_j‖ (calibrated)"
    needs = Needs.SQ_NORMS

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0, calibration: Calibration | None = None) -> np.ndarray:
        total = np.zeros(group.channels, dtype=np.float64)
        used = 0
        for member in group.members:
            found = (calibration or {}).get(member.tensor)
            if member.role is not MemberRole.INPUT or found is None:
                continue
            view, stats = found
            weights = tensors[member.tensor]
            stored = view.from_obs(wanda_scores(view.to_obs(weights),
                                                stats.sq_norms[:, np.newaxis, :]))
            total += channel_slices(member, stored, group.channels).sum(axis=1)
            used += 1
        if not used:  # no consumer weight could be calibrated: the group norm decides
            return _uncalibrated(group, tensors, seed)
        return total


BIAS_COMPENSATION_HELP = ("add the removed channels' mean contribution to the consumers' "
                          "biases (an Add is inserted where a consumer has none)")


class Flap(ChannelScore):
    name = "flap"
    description = ("FLAP's fluctuation: sum over the consumers' input column of "
                   "W²·Var(X_j), standardized per group, with bias compensation (calibrated)")
    needs = Needs.SQ_NORMS
    normalization = "none"  # the scores are standardized already (see `scores`)

    @dataclass(frozen=True)
    class Options:
        bias_compensation: bool = option(True, flag="bias-compensation",
                                         help=BIAS_COMPENSATION_HELP)

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0, calibration: Calibration | None = None) -> np.ndarray:
        return standardized_fluctuation(group, tensors, seed, calibration)


def standardized_fluctuation(group: ChannelGroup, tensors: Mapping[str, np.ndarray],
                             seed: int = 0, calibration: Calibration | None = None
                             ) -> np.ndarray:
    """FLAP's score: per channel, the mean over its input columns of each column's
    fluctuation Σ_i W_ij²·Var(X_j), standardized over every column of the group (FLAP
    standardizes columns, then averages a head's): a head of many columns is judged by how
    its columns compare with all the layer's columns, not only with the layer's few other
    heads. Higher = keep; on one scale across groups, as global allocation needs."""
    columns: np.ndarray | None = None  # [channels, block]: fluctuation per column
    for member in group.members:
        found = (calibration or {}).get(member.tensor)
        if member.role is not MemberRole.INPUT or found is None:
            continue
        view, stats = found
        obs = view.to_obs(tensors[member.tensor]).astype(np.float64)
        stored = view.from_obs(obs ** 2 * stats.variances[:, np.newaxis, :])
        per_column = channel_slices(member, stored, group.channels).reshape(
            group.channels, member.block, -1).sum(axis=2)
        if columns is not None and columns.shape != per_column.shape:
            # consumers that block the channels differently: one value per channel
            columns = columns.sum(axis=1, keepdims=True)
            per_column = per_column.sum(axis=1, keepdims=True)
        columns = per_column if columns is None else columns + per_column
    if columns is None:
        return _normalized_fallback(group, tensors, seed)
    spread = float(np.std(columns))
    standard = ((columns - np.mean(columns)) / spread if spread > 0
                else np.zeros_like(columns))
    return standard.mean(axis=1)


class StructuredObs(ChannelScore):
    name = "obs"
    description = ("structured OBS (ZipLM): channels removed by the smallest OBS error "
                   "from each stage's XᵀX, the consumers updated after each; counts "
                   "allocated by FLAP's score (calibrated)")
    needs = Needs.SQ_NORMS
    normalization = "none"
    selects = True

    @dataclass(frozen=True)
    class Options:
        damp: float = option(0.01, minimum=0.0, metavar="D",
                             help="damping, as a fraction of XᵀX's mean diagonal")
        bias_compensation: bool = option(True, flag="bias-compensation",
                                         help=BIAS_COMPENSATION_HELP)

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0, calibration: Calibration | None = None) -> np.ndarray:
        """For allocation only (how many channels each group keeps): FLAP's standardized
        fluctuation, whose adaptive structure allocated best on SmolLM2 (the diagonal OBS
        error, mean-normalized, emptied single FFN blocks); which channels go is chosen
        stage by stage by OBS (see `refit`)."""
        return standardized_fluctuation(group, tensors, seed, calibration)


def _normalized_fallback(group: ChannelGroup, tensors: Mapping[str, np.ndarray], seed: int
                         ) -> np.ndarray:
    from .selection import normalized

    return normalized(_uncalibrated(group, tensors, seed), "standard")


def _uncalibrated(group: ChannelGroup, tensors: Mapping[str, np.ndarray], seed: int
                  ) -> np.ndarray:
    log.warning("%s: no consumer weight was calibrated; channels scored by magnitude",
                group.name)
    return GroupMagnitude().scores(group, tensors, seed)
