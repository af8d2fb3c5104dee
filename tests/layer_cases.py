"""Tiny one-layer problems for the method tests: a random layer and a one-MatMul model."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxprune.config import PruneConfig
from onnxprune.io import model_from_proto, read_array
from onnxprune.pipeline import run


def layer_problem(rows: int, cols: int, tokens: int = 400, seed: int = 0, rank: int = 0,
                  dead: tuple[int, ...] = ()):
    """(weights float32 [rows, cols], H = XᵀX float64, X): inputs of uneven scale, optionally
    correlated (a rank-`rank` part plus noise), some inputs that never fire."""
    rng = np.random.default_rng(seed)
    if rank:
        x = rng.standard_normal((tokens, rank)) @ rng.standard_normal((rank, cols))
        x += 0.3 * rng.standard_normal((tokens, cols))
    else:
        x = rng.standard_normal((tokens, cols))
    x *= np.exp(rng.normal(0, 1, cols))
    x[:, list(dead)] = 0.0
    weights = rng.standard_normal((rows, cols)).astype(np.float32)
    return weights, x.T @ x, x


def prune_matmul(inputs: int = 32, outputs: int = 12, samples: int = 4, seed: int = 0,
                 masks: dict | None = None, fixed_masks: bool = False, **settings):
    """Prune the weight of y = x @ W through the pipeline with in-memory calibration.

    Returns (original W as [outputs, inputs] float32, pruned likewise, X [tokens, inputs]
    float64 exactly as fed, the target's report). `masks` (keep-masks of "w" in its stored
    [inputs, outputs] layout) and `fixed_masks` go to `pipeline.run`.
    """
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((inputs, outputs)).astype(np.float32)
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, inputs])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(weight, "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    # inputs of uneven scale and whole-number-ish values keep XᵀX exact in float32
    scales = np.exp(rng.normal(0, 0.7, inputs)).astype(np.float32)
    feeds = [{"x": (rng.standard_normal((8, inputs)).astype(np.float32) * scales)}
             for _ in range(samples)]
    loaded = model_from_proto(model)
    config = PruneConfig.from_settings(**{"min_size": 0, "measure_error": True, **settings})
    result = run(loaded, config, feeds=feeds, masks=masks, fixed_masks=fixed_masks)
    tensor = next(t for t in loaded.proto.graph.initializer if t.name == "w")
    pruned = read_array(tensor, loaded.base_dir)
    x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    return weight.T.copy(), np.asarray(pruned).T.copy(), x, result.targets[0]
