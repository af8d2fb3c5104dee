"""Static shapes and small constant values, as the structured analysis reads them: tensor
dims from onnx shape inference on a copy without large data, and the values of small
constants stored inline (pads, scales, axes, shape targets).

MACs need every dim of a layer's output. Where the model's inputs have dynamic sizes (an
image model's H and W), they are estimated at one concrete shape, `macs_input_shapes`:
the shape synthetic calibration inputs take (`inputs.resolve_shapes`: 1 for a batch-like
dim, 16 for the others), and the reports say so."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from ..io import uses_external_data

log = logging.getLogger(__name__)

# Constants read for their values (pads, scales, axes, shape targets) are at most this big.
SMALL_CONSTANT = 4096

Dim = int | str | None  # a known size, a symbolic one, or unknown


def infer_shapes(model: onnx.ModelProto,
                 inputs: Mapping[str, Sequence[int]] | None = None
                 ) -> dict[str, tuple[Dim, ...]]:
    """Static shapes of the main graph's values, by onnx shape inference on a copy whose
    large initializers keep their dims but not their data (empty where inference fails).
    `inputs`: concrete shapes for graph inputs, instead of the dims the model declares."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    light.graph.input.extend(model.graph.input)
    for value in light.graph.input:
        shape = (inputs or {}).get(value.name)
        if shape is not None and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in shape:
                dims.add().dim_value = size
    light.graph.output.extend(model.graph.output)
    if not inputs:  # (declared for the declared input shapes)
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


def macs_input_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                      input_shapes: Mapping[str, Sequence[int]] | None = None
                      ) -> dict[str, tuple[int, ...]]:
    """The concrete shapes MACs are estimated at, by input name, where some input has a
    dynamic dim: the sizes given (`--dim`, `--input-shapes`) as they are, the others as
    synthetic calibration inputs take them (`inputs.resolve_shapes`), or,
    where the model cannot take them (YOLOv8's upsampled maps meet the next scale's only
    at multiples of 32), the same with every non-batch default scaled by the smallest power
    of two up to `MAX_MACS_SCALE` that leaves fewest node outputs of unknown shape. Empty
    where every input is static but for its batch, or where the inputs cannot be given
    shapes (a rank not stated, a non-tensor)."""
    from ..errors import OnnxPruneError
    from ..inputs import DefaultedDim, graph_inputs, resolve_shapes

    try:
        specs = graph_inputs(model)
        defaulted: list[DefaultedDim] = []
        shapes = resolve_shapes(specs, dict(dims or {}), input_shapes, defaulted=defaulted)
    except OnnxPruneError as exc:
        log.debug("MACs at the declared shapes only: %s", exc)
        return {}
    scaled = [d for d in defaulted if not d.batch_like]  # only the sizes nobody gave
    if not scaled:  # static but for the batch (MACs take it as 1 anyway), or all given
        return shapes if dims or input_shapes else {}
    best: tuple[int, dict[str, tuple[int, ...]]] | None = None
    scale = 1
    while scale <= MAX_MACS_SCALE:
        candidate = {name: list(shape) for name, shape in shapes.items()}
        for dim in scaled:
            candidate[dim.input][dim.axis] = dim.size * scale
        fixed = {name: tuple(shape) for name, shape in candidate.items()}
        unknown = _unknown_outputs(model, infer_shapes(model, fixed))
        if best is None or unknown < best[0]:
            best = (unknown, fixed)
        if unknown == 0:
            break
        scale *= 2
    return best[1] if best else {}


# how far `macs_input_shapes` scales the default size of dynamic dims (16 -> 1024)
MAX_MACS_SCALE = 64


def _unknown_outputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[Dim, ...]]) -> int:
    """Outputs of the main graph's nodes whose shape is not fully known."""
    return sum(1 for node in model.graph.node for name in node.output if name and not (
        name in shapes and all(isinstance(d, int) for d in shapes[name])))


def describe_input_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """`images [1, 3, 16, 16]`, for reports."""
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


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
