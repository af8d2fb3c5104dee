"""Pruning a model file into another without holding the model in memory.

The input is loaded lazily (`io.load_model(lazy=True)`): the proto holds the graph and
references to where every large tensor's bytes lie, in the model file or its external data.
Targets are then read, pruned and handed to a `ModelWriter` one at a time: with external
data each one goes straight to the output's data file, and the untouched tensors are copied
from the input's files at the end. Peak memory is the largest target plus a few MiB (and,
for a model written inline, < 2 GiB by definition, the pruned targets until the write).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .config import PruneConfig
from .io import ModelWriter, load_model
from .pruning import Progress, prune_loaded, store_in_proto
from .report import SkipReport, TargetReport


def prune_file(model: str | os.PathLike, output: str | os.PathLike, config: PruneConfig,
               progress: Progress | None = None, external: bool | None = None,
               durable: bool = False
               ) -> tuple[onnx.ModelProto, list[TargetReport], list[SkipReport]]:
    """Prune the model at `model` into `output` (atomically), streaming tensor data.

    The output has external data when the input has, or when `external` says so. Returns
    the written model's proto, loaded lazily: its large tensors are external references into
    the written files (relative to the output's directory), not values in memory.
    `durable`: fsync the output before renaming it into place (`io.ModelWriter`).
    """
    loaded = load_model(model, lazy=True)
    with ModelWriter(loaded, output, external, durable) as writer:
        store = store_in_proto(loaded, config,
                               write_dense=writer.put)
        targets, skipped = prune_loaded(loaded, config, progress, store)
        writer.commit()
    return load_model(Path(output), lazy=True).proto, targets, skipped
