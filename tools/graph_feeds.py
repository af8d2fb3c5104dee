"""Inputs drawn from a model's graph alone, for the tools that run models they know nothing
about (`fuzz.py` on mutated models, `peer_suite.py` on the onnx backend and real models).

Imported by those tools as a plain module (they put this folder on `sys.path`).
"""

from __future__ import annotations

import numpy as np
import onnx

Feeds = dict[str, np.ndarray]


def graph_feeds(model: onnx.ModelProto, max_elements: int | None = None,
                seed: int = 0) -> Feeds | None:
    """One input per graph input a caller feeds (initializers listed as inputs left out):
    dynamic dims 1, floats N(0, 1), integers 0, booleans fair coin flips, the same for the
    same `seed`. None where an input is not a plain tensor of a numeric or boolean type, or
    has more than `max_elements` elements."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds: Feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            return None
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                      for d in tensor_type.shape.dim)
        if max_elements is not None and int(np.prod(shape, dtype=np.float64)) > max_elements:
            return None
        try:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        except Exception:  # noqa: BLE001 (an unknown or mutated type: nothing to feed)
            return None
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = np.zeros(shape, dtype)
        else:
            return None
    return feeds
