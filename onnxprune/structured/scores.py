"""How much each channel of a group is worth keeping: the structured scores (`--method` with
`--structure`), registered parts like the unstructured methods (`registry.CHANNEL_SCORES`).

A score reads the group's member tensors (stored values, by tensor name) and returns one
float64 per channel, higher = keep. `magnitude` is the group norm: the L2 norm of channel
c over every coupled tensor, ‖[W_out[c], W_in[:, c], b[c], ...]‖₂ (DepGraph's group
importance with p = 2); `random` is the baseline, seeded by the run's seed and the group.
"""

from __future__ import annotations

import zlib
from abc import abstractmethod
from collections.abc import Mapping

import numpy as np

from ..parts import Part
from .groups import ChannelGroup, Member


def channel_slices(member: Member, array: np.ndarray, channels: int) -> np.ndarray:
    """The member's values as [channels, everything else] (float64): row c holds every
    value of channel c (its `block` positions on the axis, all other axes)."""
    moved = np.moveaxis(np.asarray(array), member.axis, 0)
    section = moved[member.offset:member.offset + channels * member.block]
    return section.reshape(channels, -1).astype(np.float64)


class ChannelScore(Part):
    """A structured score: one value per channel of a group (higher = keep)."""

    @abstractmethod
    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0) -> np.ndarray:
        """float64 [group.channels]; `tensors` holds every member's stored values."""


class GroupMagnitude(ChannelScore):
    name = "magnitude"
    description = "L2 norm of each channel over every coupled tensor (group norm)"

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0) -> np.ndarray:
        energy = np.zeros(group.channels, dtype=np.float64)
        for member in group.members:
            rows = channel_slices(member, tensors[member.tensor], group.channels)
            energy += np.einsum("ij,ij->i", rows, rows)
        return np.sqrt(energy)


class RandomChannels(ChannelScore):
    name = "random"
    description = "uniform random scores (a baseline), seeded by --seed and the group"

    def scores(self, group: ChannelGroup, tensors: Mapping[str, np.ndarray],
               seed: int = 0) -> np.ndarray:
        stream = zlib.crc32(group.name.encode("utf-8"))
        return np.random.default_rng([seed, stream]).random(group.channels)
