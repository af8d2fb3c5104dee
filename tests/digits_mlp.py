"""A small MLP trained with numpy on scikit-learn's digits (real handwritten digits shipped
in the scikit-learn wheel), written as ONNX with onnx.helper: a model whose accuracy can be
measured after pruning, with a numpy SGD retrain hook for iterative pruning tests."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 128
TRAIN_SAMPLES = 1200
NAMES = ("W1", "b1", "W2", "b2")


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, train y, test x, test y): 8x8 images scaled to [0, 1], a fixed shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    return x[:TRAIN_SAMPLES], y[:TRAIN_SAMPLES], x[TRAIN_SAMPLES:], y[TRAIN_SAMPLES:]


def initial_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W1": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32),
            "W2": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
            "b2": np.zeros(10, np.float32)}


def train(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int,
          keep_zeros: bool = False, lr: float = 0.1, seed: int = 0) -> dict[str, np.ndarray]:
    """Minibatch SGD with momentum on softmax cross-entropy. `keep_zeros`: weights that are
    exactly zero get no update (a pruned model stays pruned)."""
    params = {k: v.astype(np.float32).copy() for k, v in params.items()}
    frozen = {k: params[k] == 0 for k in ("W1", "W2")} if keep_zeros else {}
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), 32):
            batch = order[start:start + 32]
            xb, yb = x[batch], y[batch]
            hidden = np.maximum(xb @ params["W1"] + params["b1"], 0)
            logits = hidden @ params["W2"] + params["b2"]
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            probs[np.arange(len(yb)), yb] -= 1
            dlogits = probs / len(yb)
            dhidden = (dlogits @ params["W2"].T) * (hidden > 0)
            grads = {"W2": hidden.T @ dlogits, "b2": dlogits.sum(0),
                     "W1": xb.T @ dhidden, "b1": dhidden.sum(0)}
            for name, grad in grads.items():
                if name in frozen:
                    grad[frozen[name]] = 0
                velocity[name] = 0.9 * velocity[name] - lr * grad
                params[name] += velocity[name]
    return params


def to_onnx(params: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]),
             helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["l0"]),
             helper.make_node("Add", ["l0", "b2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(params[name], name) for name in NAMES])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def from_onnx(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def accuracy(model: onnx.ModelProto | str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy measured in onnxruntime."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x})[0]
    return float(np.mean(logits.argmax(axis=1) == y))
