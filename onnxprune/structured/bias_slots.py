"""A bias for every consumer that is refitted: where its shift (bias compensation, the
intercept of a least-squares refit) is written.

Conv and Gemm have a bias input: an existing one-dimensional bias read by that node alone
is used as it is; a missing one is added as zeros; a shared one is copied for the node. A
MatMul (and a Gemm whose C is not one value per output) gets an `Add` of a zero constant
[N] right after it (its readers read the Add). The new constants are initializers of the
main graph, so the analysis run again on the model finds them like any other bias (a
per-channel member of the consumer's own output group, where it has one) and the rewrite
cuts them with it.

Weights and biases may be initializers or Constant-node values of the main graph. Where a
consumer cannot be given a bias (its weight is not read directly by one MatMul, Gemm or
Conv node of the main graph, or its bias is computed) it has no slot: its shift is not
written, and its refit is made without an intercept.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..graph import attribute, constant_tensor, is_onnx_domain, walk_graphs


def add_bias_slots(model: onnx.ModelProto, weights: Iterable[str]) -> dict[str, str]:
    """Give each consumer weight of `weights` a bias in `model` (edited in place): by
    weight name, the name of the initializer [outputs] that is its bias."""
    graph = model.graph
    # stored tensors of the main graph: initializers and Constant nodes' values (Paddle
    # exports hold every weight in Constant nodes)
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        value = constant_tensor(node)
        if value is not None and node.output:
            initializers.setdefault(node.output[0], value)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for each, _ in walk_graphs(graph):
        for node in each.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
    taken = _names(model)
    slots = {}
    for weight in weights:
        nodes = readers.get(weight, [])
        if len(nodes) != 1 or nodes[0] not in graph.node or weight not in initializers:
            continue
        node = nodes[0]
        slot = _slot(graph, node, weight, initializers[weight], initializers, readers, taken)
        if slot is not None:
            slots[weight] = slot
    return slots


def _slot(graph: onnx.GraphProto, node: onnx.NodeProto, weight: str,
          stored: onnx.TensorProto, initializers: dict[str, onnx.TensorProto],
          readers: dict[str, list[onnx.NodeProto]], taken: set[str]) -> str | None:
    if not is_onnx_domain(node) or len(stored.dims) < 2:
        return None
    dtype = onnx.helper.tensor_dtype_to_np_dtype(stored.data_type)
    op = node.op_type
    if op == "Conv" and list(node.input[1:2]) == [weight]:
        return _bias_input(graph, node, 2, int(stored.dims[0]), dtype, initializers, readers,
                           taken)
    if op == "Gemm" and list(node.input[1:2]) == [weight]:
        outputs = int(stored.dims[0] if attribute(node, "transB", 0) else stored.dims[1])
        bias = node.input[2] if len(node.input) > 2 else ""
        known = initializers.get(bias)
        if not bias or (known is not None and list(known.dims) == [outputs]):
            return _bias_input(graph, node, 2, outputs, dtype, initializers, readers, taken)
        return _add_after(graph, node, outputs, dtype, taken)
    if op == "MatMul" and list(node.input[1:2]) == [weight] and len(stored.dims) == 2:
        return _add_after(graph, node, int(stored.dims[1]), dtype, taken)
    return None


def _bias_input(graph: onnx.GraphProto, node: onnx.NodeProto, slot: int, outputs: int,
                dtype, initializers: dict[str, onnx.TensorProto],
                readers: dict[str, list[onnx.NodeProto]], taken: set[str]) -> str | None:
    """The node's own bias at input `slot` (an initializer or Constant value read by it
    alone) as it is, else a copy of it or zeros, added as an initializer."""
    name = node.input[slot] if len(node.input) > slot else ""
    if name and name not in initializers:
        return None  # a computed bias: no place to write a constant shift
    if name and len(readers.get(name, [])) == 1:
        return name
    values = (numpy_helper.to_array(initializers[name]) if name
              else np.zeros(outputs, dtype=dtype))
    fresh = _fresh(taken, f"{node.input[1]}.bias")
    graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=dtype), fresh))
    while len(node.input) <= slot:
        node.input.append("")
    node.input[slot] = fresh
    return fresh


def _add_after(graph: onnx.GraphProto, node: onnx.NodeProto, outputs: int, dtype,
               taken: set[str]) -> str:
    """An Add of a zero constant [outputs] right after `node`. Its readers read the Add
    instead; the node keeps its output's name (a group is named after its producer's
    output), except where that output is a graph output, whose name must stay."""
    produced = node.output[0]
    bias = _fresh(taken, f"{node.input[1]}.bias")
    graph.initializer.append(numpy_helper.from_array(np.zeros(outputs, dtype=dtype), bias))
    if produced in {value.name for value in graph.output}:
        before, after = _fresh(taken, f"{produced}.before_bias"), produced
        node.output[0] = before
    else:
        before, after = produced, _fresh(taken, f"{produced}.biased")
        for each, _ in walk_graphs(graph):
            for reader in each.node:
                for slot, name in enumerate(reader.input):
                    if name == produced:
                        reader.input[slot] = after
    add = helper.make_node("Add", [before, bias], [after],
                           name=_fresh(taken, f"{node.name or produced}.bias_add"))
    position = list(graph.node).index(node)
    graph.node.insert(position + 1, add)
    return bias


def _names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for graph, _ in walk_graphs(model.graph):
        names.update(t.name for t in graph.initializer)
        names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        for node in graph.node:
            names.add(node.name)
            names.update(node.output)
    return names


def _fresh(taken: set[str], wanted: str) -> str:
    name, number = wanted, 1
    while name in taken:
        number += 1
        name = f"{wanted}.{number}"
    taken.add(name)
    return name
