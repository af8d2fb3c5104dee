"""The storage formats as registered parts (`registry.FORMATS`): what `--format` names.

A format has a `name`, a `description` and ``store(target, weights, pattern, model,
write_dense) -> StoreResult | None`` (None: written dense, as it is). Plug-ins register
their own through the ``onnxprune.formats`` entry point group.
"""

from __future__ import annotations

from .storage import store


class Dense:
    name = "dense"
    description = "zeros kept in place"

    def store(self, target, weights, pattern, model, write_dense):
        write_dense(target.tensor, weights)
        return None


class _Stored:
    """A format that `storage.store` writes (where it is smaller; dense otherwise)."""

    name = ""

    def store(self, target, weights, pattern, model, write_dense):
        return store(target, weights, self.name, pattern, model=model, write_dense=write_dense)


class Sparse(_Stored):
    name = "sparse"
    description = "ONNX sparse_initializer where smaller"


class Compact(_Stored):
    name = "compact"
    description = "smallest form onnxruntime loads and folds at session start"
