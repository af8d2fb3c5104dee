"""How much each channel of a group is worth keeping: the structured scores (`--method` with
`--structure`), registered parts like the unstructured methods (`registry.CHANNEL_SCORES`).

A score reads the group's member tensors (stored values, by tensor name) and returns one
float64 per channel, higher = keep. `magnitude` is the group norm: the L2 norm of channel
c over every coupled tensor, ‖[W_out[c], W_in[:, c], b[c], ...]‖₂ (DepGraph's group
importance with p = 2); `random` is the baseline, seeded by the run's seed and the group.
`wanda` (calibrated) is Wanda's score in structured form: channel c of the group is input
feature c of its consumers, and its score is Σ_i |W_ic|·‖X_c‖₂ over every consumer weight
(the consumer's layer input X gathered on the dense model, as `--method wanda` does).
"""

from __future__ import annotations

import logging
import zlib
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..methods.base import Needs
from ..methods.wanda import wanda_scores
from ..parts import Part
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
            log.warning("%s: no consumer weight was calibrated; channels scored by "
                        "magnitude", group.name)
            return GroupMagnitude().scores(group, tensors, seed)
        return total
