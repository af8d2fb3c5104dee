"""The float model a quantized model was made from, as the starting point of methods that
rebuild weights.

Pruning a quantized model with sparsegpt rounds each reconstructed weight onto the grid as
the sweep reaches it (joint sparsification and quantization). Started from the dequantized
integers, the sweep can only fit the quantized model, whose rounding error is already
baked in; started from the float weights they were rounded from, it spreads the rounding
error of every kept weight too, as SparseGPT's paper does for its joint 50 % + 4-bit runs.

A quantized target's float counterpart is found by value, not by name (quantizers rename
weights in their own ways): a float tensor of the same shape (MatMulNBits: transposed)
that rounds onto the target's own integers with its grid. Names only order the search.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from os.path import commonprefix

import numpy as np
from onnx import TensorProto

from .io import FLOAT_TYPES, load_model, read_array
from .io.tensors import iter_model_tensors, tensor_numel
from .quantized import Grid
from .targets import WeightTarget

log = logging.getLogger(__name__)

# share of a target's integers the float tensor must round onto exactly; the rest may be
# one step off (quantizers round halves and clip in their own ways)
MATCHING_SHARE = 0.999
HEAD_ROWS = 4  # rows compared before a candidate is read whole


class FloatReference:
    """Float tensors of a reference model, matched to quantized targets on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.loaded = load_model(path, lazy=True)
        self._by_numel: dict[int, list[TensorProto]] = defaultdict(list)
        for tensor in iter_model_tensors(self.loaded.proto):
            if tensor.data_type in FLOAT_TYPES and tensor.name:
                self._by_numel[tensor_numel(tensor)].append(tensor)
        # the float tensor found for each target asked for (None: none found)
        self._found: dict[str, TensorProto | None] = {}

    def weights(self, target: WeightTarget, grid: Grid, ints: np.ndarray) -> np.ndarray | None:
        """The float values `ints` (the target's integers) were rounded from, float32 in the
        target's shape (a new array), or None where no float tensor rounds onto them."""
        shape = tuple(target.shape)
        transposed = bool(target.quant is not None and target.quant.bits) and len(shape) == 2
        if target.name in self._found:  # asked again (a Ray stage reads its targets twice)
            found = self._found[target.name]
            view = None if found is None else self._view(found, shape, transposed)
            return None if view is None else np.array(view, dtype=np.float32, order="C")
        candidates = sorted(self._by_numel.get(ints.size, ()),
                            key=lambda t: -len(commonprefix([t.name, target.tensor_name])))
        head = _head(grid, shape)
        for tensor in candidates:
            view = self._view(tensor, shape, transposed)
            # the first rows first: a model has many tensors of one shape, read whole once
            if view is None or not _rounds_onto(view[:HEAD_ROWS], head, ints[:HEAD_ROWS], 1.0):
                continue
            values = np.array(view, dtype=np.float32, order="C")
            if _rounds_onto(values, grid, ints, 1.0 - MATCHING_SHARE):
                self._found[target.name] = tensor
                return values
        self._found[target.name] = None
        return None

    def _view(self, tensor: TensorProto, shape: tuple[int, ...], transposed: bool
              ) -> np.ndarray | None:
        """The tensor's values in the target's shape, as read (a memory map where stored
        outside the model), or None where its shape is not the target's."""
        dims = tuple(tensor.dims)
        if dims == shape:
            return read_array(tensor, self.loaded.base_dir)
        if transposed and dims == shape[::-1]:
            return read_array(tensor, self.loaded.base_dir).T
        return None

    def summary(self) -> None:
        """Say how many targets were rebuilt from float weights, and which were not."""
        matched = [name for name, found in self._found.items() if found is not None]
        unmatched = [name for name, found in self._found.items() if found is None]
        if matched:
            log.info("%d quantized target(s) rebuilt from the float weights of %s",
                     len(matched), self.path)
        if unmatched:
            log.warning("%d quantized target(s) have no float counterpart in %s (no tensor "
                        "of their shape rounds onto their integers) and were rebuilt from "
                        "their dequantized values, e.g. %s", len(unmatched), self.path,
                        unmatched[0])
        if not self._found:
            log.warning("--float-reference is unused: no quantized weight was rebuilt (it "
                        "serves methods that rebuild weights, such as sparsegpt and admm, "
                        "and --update, on a quantized model)")


def _head(grid: Grid, shape: tuple[int, ...]) -> Grid:
    """The grid of the weight's first `HEAD_ROWS` rows."""
    def rows(array: np.ndarray) -> np.ndarray:
        return np.broadcast_to(array, shape)[:HEAD_ROWS] if shape else np.asarray(array)
    return Grid(rows(grid.scale), rows(grid.zero_point), grid.qmin, grid.qmax)


def _rounds_onto(values: np.ndarray, grid: Grid, ints: np.ndarray, off_share: float) -> bool:
    """Whether `values` round onto `ints` with `grid`: each within one step, and at most
    `off_share` of them not exactly."""
    values = np.asarray(values, dtype=np.float32)
    if not np.isfinite(values).all():
        return False
    off = np.abs(grid.quantize(values) - ints)
    return bool(int(off.max(initial=0)) <= 1 and np.count_nonzero(off) <= off_share * ints.size)
