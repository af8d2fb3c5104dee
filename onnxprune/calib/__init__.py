"""Calibration: the data, the layer-input layouts, the statistics and their capture.

- `data`: `load_calibration` reads `.npz` files (or a folder of them), or makes synthetic feeds.
- `layouts`: a target and its layer inputs as OBS matrices (`TargetView`), MatMul/Gemm
  operands (`MatrixInput`) and Conv inputs through im2col (`ConvInput`).
- `stats`: running sums over calibration tokens (`ActivationStats`) and the output error.
- `capture`: runs the graph in onnxruntime stage by stage and sums each target's statistics
  (`ActivationCapture`).

The graph itself is indexed by `onnxprune.graph.GraphIndex` (re-exported here).
"""

from __future__ import annotations

from ..graph import GraphIndex
from .capture import ActivationCapture, Stage
from .data import DEFAULT_SYNTHETIC_SAMPLES, calibration_feeds, load_calibration
from .layouts import (
    CHUNK_ELEMENTS,
    CHUNK_ROWS,
    ConvInput,
    Layout,
    MatrixInput,
    TargetView,
    layer_inputs,
    target_view,
)
from .stats import ActivationStats, relative_output_error

__all__ = [
    "CHUNK_ELEMENTS",
    "CHUNK_ROWS",
    "DEFAULT_SYNTHETIC_SAMPLES",
    "ActivationCapture",
    "ActivationStats",
    "ConvInput",
    "GraphIndex",
    "Layout",
    "MatrixInput",
    "Stage",
    "TargetView",
    "layer_inputs",
    "calibration_feeds",
    "load_calibration",
    "relative_output_error",
    "target_view",
]
