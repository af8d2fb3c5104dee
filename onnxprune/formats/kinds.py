"""The storage formats as registered parts (`registry.FORMATS`): what `--format` names.

A format subclasses `StorageFormat`: ``store(target, weights, pattern, model, write_dense,
write_payload) -> StoreResult | None`` (None: written dense, as it is).
`write_dense(tensor, values)` writes a tensor that stays dense, `write_payload` (None, or a
streaming writer's) takes new tensors a format adds. Plug-ins register their own through
the ``onnxprune.formats`` entry point group.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from ..parts import Part
from .storage import StoreResult, store


class StorageFormat(Part):
    """How a pruned weight is written (`--format`)."""

    @abstractmethod
    def store(self, target: Any, weights: np.ndarray, pattern: Any, model: Any,
              write_dense: Callable[..., Any], write_payload: Callable[..., Any] | None = None
              ) -> StoreResult | None:
        """Write `weights` for `target`; None when they were written dense."""


class Dense(StorageFormat):
    name = "dense"
    description = "zeros kept in place"

    def store(self, target, weights, pattern, model, write_dense, write_payload=None):
        write_dense(target.tensor, weights)
        return None


class _Stored(StorageFormat):
    """A format that `storage.store` writes (where it is smaller; dense otherwise)."""

    def store(self, target, weights, pattern, model, write_dense, write_payload=None):
        return store(target, weights, self.name, pattern, model=model, write_dense=write_dense,
                     write_payload=write_payload)


class Sparse(_Stored):
    name = "sparse"
    description = "ONNX sparse_initializer where smaller"


class Compact(_Stored):
    name = "compact"
    description = "smallest form onnxruntime loads and folds at session start"
