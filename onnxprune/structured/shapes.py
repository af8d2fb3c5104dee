"""Static shapes and small constant values, as the structured analysis reads them: tensor
dims from onnx shape inference on a copy without large data, and the values of small
constants stored inline (pads, scales, axes, shape targets)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from ..io import uses_external_data

log = logging.getLogger(__name__)

# Constants read for their values (pads, scales, axes, shape targets) are at most this big.
SMALL_CONSTANT = 4096

Dim = int | str | None  # a known size, a symbolic one, or unknown


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Static shapes of the main graph's values, by onnx shape inference on a copy whose
    large initializers keep their dims but not their data (empty where inference fails)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    light.graph.value_info.extend(model.graph.value_info)
    light.graph.node.extend(model.graph.node)
    for tensor in model.graph.initializer:
        if small_inline(tensor):
            light.graph.initializer.append(tensor)
        else:
            stub = light.graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
    shapes: dict[str, tuple[Dim, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception as exc:  # onnx raises several types for models it cannot infer
        log.debug("shape inference failed (%s); using the shapes the model declares", exc)
        inferred = light
    graph = inferred.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim)
    for tensor in model.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def small_inline(tensor: TensorProto) -> bool:
    return not uses_external_data(tensor) and math.prod(tensor.dims) <= SMALL_CONSTANT


def small_array(tensor: TensorProto | None) -> np.ndarray | None:
    """The values of a small tensor stored inline, or None."""
    if tensor is None or not small_inline(tensor):
        return None
    try:
        return onnx.numpy_helper.to_array(tensor)
    except Exception:  # an odd or corrupt small tensor: treat its values as unknown
        return None


def product(dims: Sequence[Dim]) -> tuple[int, tuple[str, ...]] | None:
    """The product of dims as (known part, sorted symbols), None where one is unknown."""
    known, symbols = 1, []
    for dim in dims:
        if isinstance(dim, int):
            known *= dim
        elif isinstance(dim, str):
            symbols.append(dim)
        else:
            return None
    return known, tuple(sorted(symbols))
