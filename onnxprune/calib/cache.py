"""Calibration kept across runs on one model: the samples, read once, and the layer
statistics of one-pass calibration, captured once (a search's trials share them).

One-pass statistics are those of the dense model, so every run that prunes the same model
with the same samples can use them whatever its method, sparsity or pattern. Sequential
calibration depends on what earlier stages pruned and is never cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..inputs import Feed
from .data import calibration_feeds
from .layouts import TargetView
from .stats import ActivationStats


@dataclass
class CalibrationCache:
    """Samples by how they were asked for, statistics by samples and layer input (with or
    without XᵀX), for one model. Shared statistics are read, never modified."""

    _feeds: dict[tuple, list[Feed]] = field(default_factory=dict)
    _stats: dict[tuple, ActivationStats] = field(default_factory=dict)

    def feeds(self, config, model: onnx.ModelProto) -> list[Feed]:
        """`calibration_feeds(config, model)`, read on first use."""
        key = _samples_key(config)
        if key not in self._feeds:
            self._feeds[key] = calibration_feeds(config, model)
        return self._feeds[key]

    def stats(self, view: TargetView, hessian: bool, config) -> ActivationStats | None:
        """Statistics captured before for this view's inputs on the samples `config` asks
        for (with XᵀX when asked)."""
        found = self._stats.get((_samples_key(config), view.inputs))
        if found is None or (hessian and found.hessian is None):
            return None
        return found

    def keep(self, view: TargetView, stats: ActivationStats, config) -> None:
        self._stats[_samples_key(config), view.inputs] = stats

    def moved(self, old: str, new: str) -> CalibrationCache:
        """The cache for runs that read the same samples from `new` instead of `old` (a
        remote worker's copy of the calibration file)."""
        def rekey(key: tuple) -> tuple:
            return (new, *key[1:]) if key[0] == old else key

        return CalibrationCache({rekey(k): v for k, v in self._feeds.items()},
                                {(rekey(k[0]), k[1]): v for k, v in self._stats.items()})

    def __len__(self) -> int:
        return len(self._stats)


def _samples_key(config) -> tuple:
    """What the calibration samples of a run depend on."""
    return (config.calib, config.calib_samples, config.seed,
            tuple(sorted((config.synthetic_dims or {}).items())),
            tuple(sorted((k, tuple(v)) for k, v in (config.synthetic_shapes or {}).items())))
