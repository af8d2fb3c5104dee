"""A small MLP trained with numpy on scikit-learn's digits (real handwritten digits shipped
in the scikit-learn wheel), written as ONNX with onnx.helper: a model whose accuracy can be
measured after pruning, with a numpy SGD retrain hook for iterative pruning tests.

Layers are `W1, b1, W2, b2, ...` (MatMul + Add, Relu between them); `initial_params(sizes=)`
picks the widths. `tools/train_demo.py` builds the shipped `models/digits.onnx` with it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 128
TRAIN_SAMPLES = 1200
SIZES = (64, HIDDEN, 10)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y): 8x8 images scaled to [0, 1], a fixed shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    return x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES], x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:]


def layer_count(params: dict[str, np.ndarray]) -> int:
    return sum(1 for name in params if name.startswith("W"))


def initial_params(seed: int = 0, sizes: tuple[int, ...] = SIZES) -> dict[str, np.ndarray]:
    """He-normal weights `W{i}` [fan_in, fan_out] and zero biases `b{i}`, i from 1."""
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        weight = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2 / fan_in)
        params[f"W{i}"] = weight.astype(np.float32)
        params[f"b{i}"] = np.zeros(fan_out, np.float32)
    return params


def train(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int,
          keep_zeros: bool = False, lr: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """Minibatch SGD with momentum on softmax cross-entropy. `keep_zeros`: weights that are
    exactly zero get no update (a pruned model stays pruned)."""
    params = {k: v.astype(np.float32).copy() for k, v in params.items()}
    layers = layer_count(params)
    frozen = ({f"W{i}": params[f"W{i}"] == 0 for i in range(1, layers + 1)}
              if keep_zeros else {})
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), 32):
            batch = order[start:start + 32]
            xb, yb = x[batch], y[batch]
            activations = [xb]  # the input of layer i is activations[i - 1]
            for i in range(1, layers):
                activations.append(np.maximum(
                    activations[-1] @ params[f"W{i}"] + params[f"b{i}"], 0))
            logits = activations[-1] @ params[f"W{layers}"] + params[f"b{layers}"]
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            probs[np.arange(len(yb)), yb] -= 1
            delta = probs / len(yb)  # gradient of the loss at layer i's output
            grads = {}
            for i in range(layers, 0, -1):
                grads[f"W{i}"] = activations[i - 1].T @ delta
                grads[f"b{i}"] = delta.sum(0)
                if i > 1:
                    delta = (delta @ params[f"W{i}"].T) * (activations[i - 1] > 0)
            for name, grad in grads.items():
                if name in frozen:
                    grad[frozen[name]] = 0
                velocity[name] = 0.9 * velocity[name] - lr * grad
                params[name] += velocity[name]
    return params


def to_onnx(params: dict[str, np.ndarray], input_name: str = "x",
            graph_name: str = "digits_mlp") -> onnx.ModelProto:
    """MatMul + Add per layer, Relu between layers; `[n, in]` float32 -> `logits` `[n, out]`,
    the batch dimension named `n`; opset 17."""
    layers = layer_count(params)
    nodes, value = [], input_name
    for i in range(1, layers + 1):
        out = "logits" if i == layers else f"a{i}"
        nodes += [helper.make_node("MatMul", [value, f"W{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [out])]
        if i < layers:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            value = f"h{i}"
    names = [f"{kind}{i}" for i in range(1, layers + 1) for kind in ("W", "b")]
    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                       ["n", params["W1"].shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["n", params[f"W{layers}"].shape[1]])],
        [numpy_helper.from_array(params[name], name) for name in names])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def from_onnx(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def accuracy(model: onnx.ModelProto | str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy measured in onnxruntime (the model's first input is fed `x`)."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float(np.mean(logits.argmax(axis=1) == y))
