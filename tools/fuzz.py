"""Fuzz onnxprune's CLI with mutated models: every run must end cleanly.

    python tools/fuzz.py --cases 10000 --seed 0      # prints counts; exit 1 on any failure
    python tools/fuzz.py --cases 200 --kind ext_ -v  # only kinds whose name starts so
    python tools/fuzz.py --structured --cases 600 --seed 3  # structured commands as well
    python tools/fuzz.py --quantized --cases 600 --seed 7   # quantized models (below)

Each case copies one base model into a fresh folder, applies one seeded mutation (bit flips,
truncations, garbage, swapped fields, huge and negative dims, bad data types, missing or
miscounted data, corrupt sparse tensors, attributes of the wrong type or with out-of-range
values, corrupt compact descriptions and payloads, non-UTF-8 text, nodes with fewer inputs
or outputs than their schema (a Constant without output, trailing inputs or outputs
dropped), external-data edits:
symlinks out of the folder, `..`, absolute paths, bad offsets and lengths, long or non-UTF-8
locations), then runs `onnxprune.cli.main` in-process for `inspect`, `prune` (to a temporary
output, sometimes `--format compact` or `sparse`, sometimes 2:4) and `densify`; with
`--structured` also `inspect --structured` (sometimes `--json`) and `prune --structure ...
--sparsity 0.5`, one of `channels`, `ffn`, `heads`, `channels --allocation global` and
`channels --method random` per case; a share of these also draw the calibrated channel
scores (`--method flap|obs|wanda`, flap and obs sometimes with `--[no-]bias-compensation`),
`--update least-squares`, an N:M second stage (`--pattern 2:4` with the drawn `--format`) and,
rarely, `--latency-budget R` instead of `--sparsity` (tables in a file of their own beside
the case's folder, one onnxruntime thread; sometimes with `--allocation sensitivity`) or
`--allocation sensitivity` (sometimes with `--max-error E` instead of `--sparsity`),
calibrated on synthetic inputs (no `--calib`); the summary counts each drawn option.
Outcomes:

- ok: exit 0;
- refused: exit 2 with exactly one `onnxprune: error:` line and no traceback before it
  (`-v`, which every run gets, prints the error's own traceback after the line);
- internal: exit 3, any other exit code, or an exception escaping `main`.

Invariants checked on every run (a breach counts as a failure, whatever the exit code): the
model folder's files are unchanged (sha256 before and after), a failed run leaves no file
in the output folder, no file outside the model folder is opened (an audit hook watches
`open`), and the bytes of a canary file beside the model folder never appear in an output.
A structured prune that exits 0 must also write a model that passes
`onnx.checker.check_model(full_check=True)` (unless the mutated input fails it as well),
declares the input's graph outputs (names and types) and, wherever the input runs in
onnxruntime on inputs drawn from its graph, runs on the same inputs with outputs of the
same names, dtypes and shapes; these checks run in a child process (`--check-worker`), so
that onnxruntime crashing or hanging on a mutated model is seen, not fatal.
Base models are the demo models in models/, small models built here (external data, sparse
initializers, Constant nodes, an If subgraph, a local function and a TENSORS attribute), and
the mlp demo model stored compact (gap codes, bitmask, 2:4) and sparse by onnxprune itself.

With `--quantized` the bases are quantized models instead: the digits, cnn and transformer
demo models (and a small float LSTM) quantized by onnxruntime's own tools in each form of
`tools/quantized_forms.py` that applies (QDQ int8 / uint8 asymmetric / int4, QOperator
QLinearConv / QLinearMatMul / QGemm, quantize_dynamic MatMulInteger / ConvInteger /
DynamicQuantizeLSTM, MatMulNBits and its blocked-DequantizeLinear QDQ form), the int8 and
int4 QDQ digits models stored compact by onnxprune (bitmask, 2:4; int4 with 4-bit values)
and the uint8 one with external data. Every other case draws one of the quantized
mutations (`q_...`: scales and zero points of odd values, shapes and types, dropped or
computed at run time; DequantizeLinear axis and block_size, a per-axis weight made blocked;
MatMulNBits K / N / bits / block_size and packing; the integer weight retyped, reshaped or
read by a second node; the op's domain and input order; `q_none` leaves the model as it
is), the others the mutations above. The
prune draws `--min-size` (0 too), `--format`, a sparsity or N:M pattern, a method (the
calibrated ones on synthetic inputs), sometimes `--update admm`, `--refine dsnot`, another
allocation or calibration mode, and writes `--report`. A quantized prune that exits 0 must
also: pass onnx's checker (the full check unless the output is sparse: onnx cannot type
sparse initializers) wherever the input does, declare the input's graph outputs, run in
onnxruntime wherever the input runs with outputs of the same names, dtypes and shapes and
finite wherever the input's are (in the child process), and, when dense, keep every integer
weight's scale and zero point, write every integer it changed as exactly its zero point
(methods that change kept weights aside: sparsegpt, admm, l1, `--update`), change no weight
that is not a target, and hold as many weights at value 0 as its report says and its plan
asks (`quantized_forms.pruning_problems`, weights read apart from onnxprune).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# the tools' shared modules (in this folder) are imported as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantized_forms  # noqa: E402
from graph_feeds import graph_feeds  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS = sorted((REPO_ROOT / "models").glob("*.onnx"))
MODEL_NAME = "model.onnx"
DATA_NAME = "model.onnx.data"
FLOAT_NAME = "float.onnx"  # a quantized base's float original (--float-reference)
CANARY_NAME = "canary.bin"
# the canary's bytes: one marker repeated, so that any piece of it copied into an output
# (even after pruning zeroed some values) still holds a whole marker
CANARY_MARKER = b"\x13\x37CANARY\xc0\xde"
CANARY_BYTES = CANARY_MARKER * 8192
F = TensorProto.FLOAT


# --- base models -------------------------------------------------------------------------


@dataclass
class Base:
    """A model folder's files (name -> bytes); the model is MODEL_NAME."""

    name: str
    files: dict[str, bytes]
    external: bool = False


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _sparse(name: str, dense: np.ndarray) -> onnx.SparseTensorProto:
    flat = dense.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(numpy_helper.from_array(flat[indices], name))
    sparse.indices.CopyFrom(numpy_helper.from_array(indices, ""))
    sparse.dims.extend(dense.shape)
    return sparse


def build_rich_model(seed: int = 0) -> onnx.ModelProto:
    """Initializers, a sparse initializer, a Constant node, an If subgraph, a local function
    whose body holds a Constant, and a custom node with a TENSORS attribute."""
    rng = np.random.default_rng(seed)
    sparse_dense = _weights(rng, 64, 64)
    sparse_dense[rng.random((64, 64)) < 0.8] = 0
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h3", "Wt"], ["yt"], name="then_mm")], "then", [],
        [helper.make_tensor_value_info("yt", F, [2, 64])],
        [numpy_helper.from_array(_weights(rng, 64, 64), "Wt")])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h3"], ["ye"])], "else", [],
        [helper.make_tensor_value_info("ye", F, [2, 64])])
    function = helper.make_function(
        "local", "Project", ["X"], ["Y"],
        [helper.make_node("Constant", [], ["Wf"],
                          value=numpy_helper.from_array(_weights(rng, 64, 64), "Wf")),
         helper.make_node("MatMul", ["X", "Wf"], ["Y"])],
        [helper.make_opsetid("", 17)])
    holder = helper.make_node("Holder", [], ["held"], domain="custom", name="holder")
    holder.attribute.append(helper.make_attribute(
        "tensors", [numpy_helper.from_array(_weights(rng, 32, 32), "Wh")]))
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1"),
        helper.make_node("Gemm", ["h1", "W2"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Constant", [], ["Wc"], name="const_wc",
                         value=numpy_helper.from_array(_weights(rng, 64, 64), "Wc")),
        helper.make_node("MatMul", ["h2", "Wc"], ["h2c"], name="fc3"),
        helper.make_node("MatMul", ["h2c", "Ws"], ["h2s"], name="fc4"),
        helper.make_node("Project", ["h2s"], ["h3"], domain="local", name="project"),
        helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch,
                         name="branch"),
        holder,
    ]
    graph = helper.make_graph(
        nodes, "rich",
        [helper.make_tensor_value_info("x", F, [2, 64]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", F, [2, 64]),
         helper.make_tensor_value_info("held", F, None)],
        [numpy_helper.from_array(_weights(rng, 64, 64), "W1"),
         numpy_helper.from_array(_weights(rng, 64, 64), "W2"),
         numpy_helper.from_array(_weights(rng, 64), "b")],
        sparse_initializer=[_sparse("Ws", sparse_dense)])
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("local", 1),
                                             helper.make_opsetid("custom", 1)])
    model.ir_version = 8
    return model


def move_to_external(model: onnx.ModelProto, data_name: str = DATA_NAME) -> bytes:
    """Move every tensor of >= 256 bytes (sparse values and indices, function bodies and
    TENSORS attributes included) to one data file; returns its bytes."""
    data = bytearray()
    for tensor in _all_tensors(model):
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < 256:
            continue
        data += b"\0" * (-len(data) % 64)
        offset = len(data)
        data += tensor.raw_data
        tensor.ClearField("raw_data")
        for key, value in (("location", data_name), ("offset", str(offset)),
                           ("length", str(len(data) - offset))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = TensorProto.EXTERNAL
    return bytes(data)


def make_bases() -> list[Base]:
    bases = [Base(path.stem, {MODEL_NAME: path.read_bytes()}) for path in DEMO_MODELS]
    bases.append(Base("rich", {MODEL_NAME: build_rich_model().SerializeToString()}))
    model = build_rich_model(1)
    data = move_to_external(model)
    bases.append(Base("rich_external", {MODEL_NAME: model.SerializeToString(), DATA_NAME: data},
                      external=True))
    mlp = next((p for p in DEMO_MODELS if p.stem == "mlp"), None)
    if mlp is not None:
        model = onnx.load(str(mlp))
        data = move_to_external(model)
        bases.append(Base("mlp_external", {MODEL_NAME: model.SerializeToString(),
                                           DATA_NAME: data}, external=True))
        bases += _stored_forms(mlp)
    return bases


def _lstm_model(path: Path) -> Path:
    """A float LSTM (for quantize_dynamic's DynamicQuantizeLSTM)."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=32)], "lstm",
        [helper.make_tensor_value_info("x", F, [6, 1, 32])],
        [helper.make_tensor_value_info("y", F, [6, 1, 1, 32])],
        [numpy_helper.from_array((0.2 * _weights(rng, 1, 128, 32)), "W"),
         numpy_helper.from_array((0.2 * _weights(rng, 1, 128, 32)), "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


QUANTIZED_SOURCES = ("digits", "cnn", "transformer")


def make_quantized_bases() -> list[Base]:
    """The demo models digits, cnn and transformer (and a float LSTM) quantized by
    onnxruntime's tools in every form of `quantized_forms.FORMS` that applies (calibrated on
    two samples drawn from the graph), the int8 and int4 QDQ digits models pruned by
    onnxprune and stored compact (bitmask, 2:4 units), and the uint8 QDQ one with external
    data."""
    import onnxprune

    bases = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = {p.stem: p for p in DEMO_MODELS if p.stem in QUANTIZED_SOURCES}
        sources["lstm"] = _lstm_model(folder / "lstm.onnx")
        for stem, path in sources.items():
            model = onnx.load(str(path))
            calibration = [graph_feeds(model, seed=seed) for seed in range(2)]
            for form in quantized_forms.FORMS:
                out = folder / f"{stem}-{form}.onnx"
                try:
                    quantized_forms.quantize(path, out, form, calibration)
                except quantized_forms.NotQuantizable:
                    continue
                # the float original beside it, for --float-reference
                bases.append(Base(f"{stem}_{form}", {MODEL_NAME: out.read_bytes(),
                                                     FLOAT_NAME: path.read_bytes()}))
        for form in ("qdq-int8-channel", "qdq-int4-channel"):
            qdq = folder / f"digits-{form}.onnx"
            if not qdq.is_file():
                continue
            for name, options in {"compact_bitmask": dict(sparsity=0.5, format="compact"),
                                  "compact_nm": dict(pattern="2:4", format="compact")}.items():
                out = folder / f"{form}-{name}.onnx"
                onnxprune.prune(str(qdq), str(out), min_size=0, **options)
                bases.append(Base(f"digits_{form}_{name}", {MODEL_NAME: out.read_bytes()}))
        uint8 = folder / "digits-qdq-uint8-tensor.onnx"
        if uint8.is_file():
            model = onnx.load(str(uint8))
            data = move_to_external(model)
            bases.append(Base("digits_qdq-uint8-tensor_external",
                              {MODEL_NAME: model.SerializeToString(), DATA_NAME: data},
                              external=True))
    return bases


def _stored_forms(path: Path) -> list[Base]:
    """The model pruned and stored compact (gap codes, bitmask, 2:4 units) and sparse."""
    import onnxprune

    forms = {"compact_gaps": dict(sparsity=0.9, format="compact"),
             "compact_bitmask": dict(sparsity=0.5, format="compact"),
             "compact_nm": dict(pattern="2:4", format="compact"),
             "sparse": dict(sparsity=0.9, format="sparse")}
    bases = []
    with tempfile.TemporaryDirectory() as folder:
        for name, options in forms.items():
            out = Path(folder) / f"{name}.onnx"
            onnxprune.prune(str(path), str(out), **options)
            bases.append(Base(f"{path.stem}_{name}", {MODEL_NAME: out.read_bytes()}))
    return bases


# --- walking a model's tensors -----------------------------------------------------------


def _node_tensors(nodes) -> list[TensorProto]:
    found: list[TensorProto] = []
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                found.append(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                found.extend(attr.tensors)
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                found.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
            elif attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_graph_tensors(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    found.extend(_graph_tensors(sub))
    return found


def _graph_tensors(graph: onnx.GraphProto) -> list[TensorProto]:
    found = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        found.extend((sparse.values, sparse.indices))
    return found + _node_tensors(graph.node)


def _all_tensors(model: onnx.ModelProto) -> list[TensorProto]:
    found = _graph_tensors(model.graph)
    for function in model.functions:
        found.extend(_node_tensors(function.node))
    return found


def _all_sparse(model: onnx.ModelProto) -> list[onnx.SparseTensorProto]:
    found: list[onnx.SparseTensorProto] = []

    def graph_walk(graph: onnx.GraphProto) -> None:
        found.extend(graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    found.append(attr.sparse_tensor)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graph_walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        graph_walk(sub)

    graph_walk(model.graph)
    return found


def _all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.extend(_all_graphs(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    found.extend(_all_graphs(sub))
    return found


# --- mutations ---------------------------------------------------------------------------


class Skip(Exception):
    """The mutation does not apply to this base model."""


@dataclass
class Folder:
    """The case's files: the model folder and the canary beside it."""

    root: Path  # holds CANARY_NAME and the model folder
    model_dir: Path
    rng: random.Random

    @property
    def model_path(self) -> Path:
        return self.model_dir / MODEL_NAME

    @property
    def canary(self) -> Path:
        return self.root / CANARY_NAME

    def load(self) -> onnx.ModelProto:
        try:
            return onnx.load(str(self.model_path), load_external_data=False)
        except Exception as exc:
            raise Skip from exc

    def save(self, model: onnx.ModelProto) -> None:
        self.model_path.write_bytes(model.SerializeToString())

    def tensor(self, model: onnx.ModelProto, external: bool | None = None,
               min_bytes: int = 0) -> TensorProto:
        tensors = [t for t in _all_tensors(model)
                   if (external is None or _is_external(t) == external)
                   and _stored_bytes(t) >= min_bytes]
        if not tensors:
            raise Skip
        return self.rng.choice(tensors)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _stored_bytes(tensor: TensorProto) -> int:
    if _is_external(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        return int(info.get("length", 0))
    return len(tensor.raw_data) + 4 * len(tensor.float_data)


def _set_external(tensor: TensorProto, **entries: str) -> None:
    info = {e.key: e.value for e in tensor.external_data}
    info.update(entries)
    tensor.ClearField("external_data")
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def _make_external(folder: Folder, model: onnx.ModelProto, tensor: TensorProto) -> None:
    """Give an inline tensor a data file of its own (so that later edits can point it away)."""
    if _is_external(tensor):
        return
    raw = tensor.raw_data if tensor.HasField("raw_data") else b""
    name = f"t{folder.rng.randrange(1 << 30)}.bin"
    (folder.model_dir / name).write_bytes(raw)
    _set_external(tensor, location=name, offset="0", length=str(len(raw)))


# byte-level ----------------------------------------------------------------------------


def m_bitflip(folder: Folder) -> None:
    data = bytearray(folder.model_path.read_bytes())
    for _ in range(folder.rng.randint(1, 8)):
        bit = folder.rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    folder.model_path.write_bytes(bytes(data))


def m_bitflip_header(folder: Folder) -> None:
    """Flips in the graph structure rather than in tensor bytes (bytes outside raw_data)."""
    data = bytearray(folder.model_path.read_bytes())
    limit = min(len(data), 4096)
    for _ in range(folder.rng.randint(1, 4)):
        position = folder.rng.randrange(limit) if folder.rng.random() < 0.5 \
            else folder.rng.randrange(max(0, len(data) - limit), len(data))
        data[position] ^= 1 << folder.rng.randrange(8)
    folder.model_path.write_bytes(bytes(data))


def m_truncate(folder: Folder) -> None:
    data = folder.model_path.read_bytes()
    folder.model_path.write_bytes(data[:folder.rng.randrange(len(data))])


def m_garbage(folder: Folder) -> None:
    data = bytearray(folder.model_path.read_bytes())
    start = folder.rng.randrange(len(data))
    size = folder.rng.randint(1, 64)
    data[start:start + size] = folder.rng.randbytes(size)
    folder.model_path.write_bytes(bytes(data))


def m_garbage_file(folder: Folder) -> None:
    folder.model_path.write_bytes(folder.rng.randbytes(folder.rng.randint(0, 2048)))


def m_splice(folder: Folder) -> None:
    data = folder.model_path.read_bytes()
    a, b = sorted(folder.rng.randrange(len(data)) for _ in range(2))
    if folder.rng.random() < 0.5:
        data = data[:a] + data[b:]
    else:
        data = data[:b] + data[a:b] + data[b:]
    folder.model_path.write_bytes(data)


# proto-level: tensors ------------------------------------------------------------------


def m_dims_huge(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model)
    if not tensor.dims:
        tensor.dims.append(1)
    tensor.dims[folder.rng.randrange(len(tensor.dims))] = folder.rng.choice(
        [2**31, 2**40, 2**62, 2**63 - 1, 10**12])
    folder.save(model)


def m_dims_negative(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model)
    if not tensor.dims:
        tensor.dims.append(1)
    tensor.dims[folder.rng.randrange(len(tensor.dims))] = folder.rng.choice(
        [-1, -2, -64, -(2**40), -(2**63)])
    folder.save(model)


def m_dims_shuffle(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model)
    dims = list(tensor.dims)
    choice = folder.rng.randrange(4)
    if choice == 0:
        dims.append(folder.rng.choice([0, 1, 2, 3]))
    elif choice == 1 and dims:
        dims.pop()
    elif choice == 2:
        dims = [folder.rng.randint(0, 70) for _ in range(folder.rng.randint(0, 4))]
    else:
        dims = [0] + dims
    del tensor.dims[:]
    tensor.dims.extend(dims)
    folder.save(model)


def m_data_type(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model)
    tensor.data_type = folder.rng.choice([0, 99, 1000, -1, *range(1, 27)])
    folder.save(model)


def m_no_data(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model)
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                 "uint64_data", "string_data", "external_data", "data_location"):
        tensor.ClearField(name)
    folder.save(model)


def m_float_data_count(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model, external=False)
    if tensor.data_type != F:
        tensor.data_type = F
    count = max(0, int(np.prod(tensor.dims, dtype=np.int64)) + folder.rng.choice(
        [-1, 1, -7, 5, 100]))
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.float_data.extend([0.5] * min(count, 1 << 16))
    folder.save(model)


def m_raw_length(folder: Folder) -> None:
    model = folder.load()
    tensor = folder.tensor(model, external=False)
    raw = tensor.raw_data
    tensor.raw_data = raw[:folder.rng.randrange(len(raw) + 1)] if raw and \
        folder.rng.random() < 0.5 else raw + folder.rng.randbytes(folder.rng.randint(1, 9))
    folder.save(model)


def m_typed_field_mix(folder: Folder) -> None:
    """Values in a field that does not match the data type (int64_data for floats, ...)."""
    model = folder.load()
    tensor = folder.tensor(model, external=False)
    numel = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    numel = max(0, min(numel, 1 << 16))
    tensor.ClearField("raw_data")
    field_name = folder.rng.choice(["int64_data", "int32_data", "double_data", "uint64_data",
                                    "string_data"])
    values = {"int64_data": [3] * numel, "int32_data": [2] * numel, "double_data": [0.5] * numel,
              "uint64_data": [1] * numel, "string_data": [b"x"] * numel}[field_name]
    getattr(tensor, field_name).extend(values)
    folder.save(model)


def m_swap_fields(folder: Folder) -> None:
    """Swap one field (dims, data_type, name, data) between two tensors."""
    model = folder.load()
    tensors = _all_tensors(model)
    if len(tensors) < 2:
        raise Skip
    a, b = folder.rng.sample(tensors, 2)
    what = folder.rng.choice(["dims", "data_type", "name", "data"])
    if what == "dims":
        da, db = list(a.dims), list(b.dims)
        del a.dims[:]
        del b.dims[:]
        a.dims.extend(db)
        b.dims.extend(da)
    elif what == "data_type":
        a.data_type, b.data_type = b.data_type, a.data_type
    elif what == "name":
        a.name, b.name = b.name, a.name
    else:
        copy_a, copy_b = TensorProto(), TensorProto()
        copy_a.CopyFrom(a)
        copy_b.CopyFrom(b)
        for target, source in ((a, copy_b), (b, copy_a)):
            for name in ("raw_data", "float_data", "external_data", "data_location"):
                target.ClearField(name)
            if source.HasField("raw_data"):
                target.raw_data = source.raw_data
            target.float_data.extend(source.float_data)
            target.external_data.extend(source.external_data)
            if source.HasField("data_location"):
                target.data_location = source.data_location
    folder.save(model)


def m_swap_node_inputs(folder: Folder) -> None:
    model = folder.load()
    nodes = [n for g in _all_graphs(model.graph) for n in g.node if len(n.input) >= 1]
    if not nodes:
        raise Skip
    node = folder.rng.choice(nodes)
    names = [t.name for t in _all_tensors(model)] + ["", "missing"]
    node.input[folder.rng.randrange(len(node.input))] = folder.rng.choice(names)
    folder.save(model)


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node: the main graph, subgraphs at any depth, and local function bodies."""
    nodes = [n for g in _all_graphs(model.graph) for n in g.node]
    return nodes + [n for function in model.functions for n in function.node]


def m_constant_no_output(folder: Folder) -> None:
    """A Constant node without its output (or with an empty output name): an existing one
    anywhere, or a new one holding a weight-sized value put somewhere in the main graph."""
    model = folder.load()
    nodes = [n for n in _all_nodes(model) if n.op_type == "Constant"]
    if not nodes or folder.rng.random() < 0.3:
        value = numpy_helper.from_array(np.ones((64, 64), np.float32), "fuzz_value")
        node = helper.make_node("Constant", [], ["fuzz_const"], value=value,
                                name=folder.rng.choice(["", "fuzz_const"]))
        position = folder.rng.randint(0, len(model.graph.node))
        model.graph.node.insert(position, node)
        nodes = [model.graph.node[position]]  # (insert stored a copy)
    node = folder.rng.choice(nodes)
    del node.output[:]
    if folder.rng.random() < 0.2:
        node.output.append("")
    folder.save(model)


def m_node_arity(folder: Folder) -> None:
    """A random node with fewer inputs or outputs than its schema: trailing ones dropped."""
    model = folder.load()
    nodes = [n for n in _all_nodes(model) if n.input or n.output]
    if not nodes:
        raise Skip
    node = folder.rng.choice(nodes)
    names = node.input if node.input and (not node.output or folder.rng.random() < 0.6) \
        else node.output
    del names[len(names) - folder.rng.randint(1, len(names)):]
    folder.save(model)


def m_duplicate_names(folder: Folder) -> None:
    model = folder.load()
    tensors = _all_tensors(model)
    if len(tensors) < 2:
        raise Skip
    a, b = folder.rng.sample(tensors, 2)
    b.name = a.name
    if folder.rng.random() < 0.5:
        model.graph.initializer.append(a)
    folder.save(model)


# proto-level: sparse tensors and attributes --------------------------------------------


def _sparse_or_skip(folder: Folder, model: onnx.ModelProto) -> onnx.SparseTensorProto:
    sparse = _all_sparse(model)
    if not sparse:
        # turn a dense initializer sparse first, so the mutation has something to work on
        graph = model.graph
        candidates = [t for t in graph.initializer if t.data_type == F and t.HasField("raw_data")]
        if not candidates:
            raise Skip
        tensor = folder.rng.choice(candidates)
        graph.sparse_initializer.append(_sparse(tensor.name, numpy_helper.to_array(tensor)))
        graph.initializer.remove(tensor)
        return graph.sparse_initializer[-1]
    return folder.rng.choice(sparse)


def _set_indices(sparse: onnx.SparseTensorProto, indices: np.ndarray) -> None:
    sparse.indices.CopyFrom(numpy_helper.from_array(indices, sparse.indices.name))


def m_sparse_indices_range(folder: Folder) -> None:
    model = folder.load()
    sparse = _sparse_or_skip(folder, model)
    numel = int(np.prod(sparse.dims, dtype=np.int64))
    count = int(np.prod(sparse.values.dims, dtype=np.int64)) if sparse.values.dims else 1
    indices = np.arange(max(count, 0), dtype=np.int64)
    if indices.size:
        indices[folder.rng.randrange(indices.size)] = folder.rng.choice(
            [numel, numel + 5, -1, -numel - 1, 2**62])
    _set_indices(sparse, indices)
    folder.save(model)


def m_sparse_indices_count(folder: Folder) -> None:
    model = folder.load()
    sparse = _sparse_or_skip(folder, model)
    count = int(np.prod(sparse.values.dims, dtype=np.int64)) if sparse.values.dims else 1
    _set_indices(sparse, np.arange(max(0, count + folder.rng.choice([-3, -1, 1, 7])),
                                   dtype=np.int64))
    folder.save(model)


def m_sparse_indices_form(folder: Folder) -> None:
    """Indices of another type or rank: float, int32, 2-D with a wrong rank, unsorted."""
    model = folder.load()
    sparse = _sparse_or_skip(folder, model)
    count = int(np.prod(sparse.values.dims, dtype=np.int64)) if sparse.values.dims else 1
    count = max(count, 0)
    choice = folder.rng.randrange(5)
    if choice == 0:
        indices = np.arange(count, dtype=np.float32)
    elif choice == 1:
        indices = np.arange(count, dtype=np.int32)
    elif choice == 2:
        indices = np.zeros((count, len(sparse.dims) + 1), np.int64)
    elif choice == 3:
        indices = np.arange(count, dtype=np.int64)[::-1].copy()
    else:
        indices = np.zeros(count, np.int64)  # duplicates
    _set_indices(sparse, indices)
    folder.save(model)


def m_sparse_dims(folder: Folder) -> None:
    model = folder.load()
    sparse = _sparse_or_skip(folder, model)
    del sparse.dims[:]
    sparse.dims.extend(folder.rng.choice([[], [0], [3], [-4, 4], [2**40, 2**40], [1, 2, 3]]))
    folder.save(model)


def m_sparse_values(folder: Folder) -> None:
    model = folder.load()
    sparse = _sparse_or_skip(folder, model)
    choice = folder.rng.randrange(3)
    if choice == 0:
        sparse.values.data_type = folder.rng.choice([0, 99, TensorProto.STRING, TensorProto.INT8])
    elif choice == 1:
        sparse.values.ClearField("raw_data")
    else:
        del sparse.values.dims[:]
        sparse.values.dims.extend([folder.rng.randint(0, 5000), 2])
    folder.save(model)


def m_sparse_for_tensor(folder: Folder) -> None:
    """A SparseTensorProto where a tensor was expected, or the other way round."""
    model = folder.load()
    nodes = [n for g in _all_graphs(model.graph) for n in g.node if n.op_type == "Constant"]
    if not nodes:
        node = helper.make_node("Constant", [], ["fuzz_const"])
        model.graph.node.insert(0, node)
        nodes = [node]
    node = folder.rng.choice(nodes)
    dense = np.ones((8, 8), np.float32)
    choice = folder.rng.randrange(4)
    del node.attribute[:]
    attr = node.attribute.add()
    attr.name = folder.rng.choice(["value", "sparse_value"])
    if choice == 0:  # says TENSOR, holds a sparse tensor
        attr.type = onnx.AttributeProto.TENSOR
        attr.sparse_tensor.CopyFrom(_sparse("s", dense))
    elif choice == 1:  # says SPARSE_TENSOR, holds a tensor
        attr.type = onnx.AttributeProto.SPARSE_TENSOR
        attr.t.CopyFrom(numpy_helper.from_array(dense, "t"))
    elif choice == 2:  # both
        attr.type = folder.rng.choice([onnx.AttributeProto.TENSOR,
                                       onnx.AttributeProto.SPARSE_TENSOR])
        attr.t.CopyFrom(numpy_helper.from_array(dense, "t"))
        attr.sparse_tensor.CopyFrom(_sparse("s", dense))
    else:  # type missing or of another kind
        attr.type = folder.rng.choice([0, onnx.AttributeProto.FLOAT, onnx.AttributeProto.TENSORS,
                                       onnx.AttributeProto.GRAPH])
        attr.t.CopyFrom(numpy_helper.from_array(dense, "t"))
    if folder.rng.random() < 0.3:
        model.graph.sparse_initializer.append(_sparse("Wextra", dense))
        model.graph.sparse_initializer[-1].values.name = folder.rng.choice(
            ["", "Wextra", model.graph.initializer[0].name if model.graph.initializer else "x"])
    folder.save(model)


def m_attribute_type(folder: Folder) -> None:
    model = folder.load()
    attrs = [a for g in _all_graphs(model.graph) for n in g.node for a in n.attribute]
    if not attrs:
        raise Skip
    attr = folder.rng.choice(attrs)
    attr.type = folder.rng.choice([0, *range(1, 15)])
    folder.save(model)


def m_attribute_value(folder: Folder) -> None:
    """Out-of-range values: group 0 or not dividing, perm not a permutation, axis 99, ..."""
    model = folder.load()
    attrs = [a for g in _all_graphs(model.graph) for n in g.node for a in n.attribute
             if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
    if not attrs:
        raise Skip
    attr = folder.rng.choice(attrs)
    weird = [0, -1, 3, 7, 99, -(2**40), 2**40]
    if attr.type == onnx.AttributeProto.INT:
        attr.i = folder.rng.choice(weird)
    else:
        values = list(attr.ints) or [0]
        choice = folder.rng.randrange(3)
        if choice == 0:
            values[folder.rng.randrange(len(values))] = folder.rng.choice(weird)
        elif choice == 1:
            values = values[:-1] if len(values) > 1 else values * 2
        else:
            values = [values[0]] * len(values)
        del attr.ints[:]
        attr.ints.extend(values)
    folder.save(model)


# compact tensors: their description (JSON in a doc_string) and payload ------------------


def _compact_node(folder: Folder, model: onnx.ModelProto) -> onnx.NodeProto:
    nodes = [n for g in _all_graphs(model.graph) for n in g.node
             if n.doc_string.startswith("onnxprune:compact {")]
    if not nodes:
        raise Skip
    return folder.rng.choice(nodes)


def _mutate_json(rng: random.Random, value, depth: int = 0):
    """One random edit somewhere in a JSON value."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        if rng.random() < 0.25:
            del value[key]
        else:
            value[key] = _mutate_json(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and rng.random() < 0.8:
        index = rng.randrange(len(value))
        value[index] = _mutate_json(rng, value[index], depth + 1)
        return value
    return rng.choice([0, -1, 1, 3, 99, 2**40, -(2**40), 0.5, "x", None, [], {}, [0, 0],
                       [5, 2], True, "gaps", "bitmask", "nm", "zeros", "rows"])


def m_compact_meta(folder: Folder) -> None:
    model = folder.load()
    node = _compact_node(folder, model)
    head, text = node.doc_string.split(" ", 1)
    if folder.rng.random() < 0.1:
        node.doc_string = head + " {" + folder.rng.choice(['"a":', "", '"chunks": 5', "}{"])
    else:
        node.doc_string = head + " " + json.dumps(_mutate_json(folder.rng, json.loads(text)))
    folder.save(model)


def m_compact_payload(folder: Folder) -> None:
    """A payload tensor of a compact form cut short, lengthened, retyped or overwritten."""
    model = folder.load()
    node = _compact_node(folder, model)
    prefix = json.loads(node.doc_string.split(" ", 1)[1]).get("prefix", "") + "/"
    payload = [t for g in _all_graphs(model.graph) for t in g.initializer
               if t.name.startswith(prefix)]
    if not payload:
        raise Skip
    tensor = folder.rng.choice(payload)
    array = numpy_helper.to_array(tensor)
    choice = folder.rng.randrange(4)
    if choice == 0:
        array = array.reshape(-1)[:folder.rng.randrange(array.size + 1)]
    elif choice == 1:
        array = np.concatenate([array.reshape(-1), array.reshape(-1)[:7]])
    elif choice == 2:
        array = array.astype(folder.rng.choice([np.float32, np.int64, np.uint8, np.int8]))
    else:
        flat = array.reshape(-1).copy()
        if flat.size:
            # the largest value: of the integer type, infinity for floats (ml_dtypes' int4
            # and uint4, numpy kind "V", have their own iinfo)
            flat[folder.rng.randrange(flat.size)] = (
                np.iinfo(flat.dtype).max if flat.dtype.kind in "iu" else
                ml_dtypes.iinfo(flat.dtype).max if flat.dtype.name in ("int4", "uint4") else
                np.inf)
        array = flat.reshape(array.shape)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    folder.save(model)


# invalid UTF-8 in string fields (written at the wire level: protobuf will not set them) ---


def _with_invalid_utf8(folder: Folder, set_marker: Callable[[onnx.ModelProto, str], bool]
                       ) -> None:
    model = folder.load()
    marker = f"FUZZ{folder.rng.randrange(10**8):08d}"
    if not set_marker(model, marker):
        raise Skip
    data = model.SerializeToString()
    bad = bytes(folder.rng.choice([0xFF, 0xFE, 0xC0, 0x80, 0xED]) for _ in marker)
    folder.model_path.write_bytes(data.replace(marker.encode(), bad))


def m_utf8_name(folder: Folder) -> None:
    def set_marker(model: onnx.ModelProto, marker: str) -> bool:
        choice = folder.rng.randrange(5)
        if choice == 0:
            tensor = folder.tensor(model)
            for node in (n for g in _all_graphs(model.graph) for n in g.node):
                for index, name in enumerate(node.input):
                    if name == tensor.name and tensor.name:
                        node.input[index] = marker
            tensor.name = marker
        elif choice == 1:
            folder.rng.choice(list(model.graph.node)).name = marker
        elif choice == 2:
            model.producer_name = marker
        elif choice == 3:
            model.graph.doc_string = marker
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = "fuzz", marker
        return True

    _with_invalid_utf8(folder, set_marker)


def m_utf8_location(folder: Folder) -> None:
    def set_marker(model: onnx.ModelProto, marker: str) -> bool:
        tensor = folder.tensor(model, min_bytes=1)
        _make_external(folder, model, tensor)
        _set_external(tensor, location=marker)
        return True

    _with_invalid_utf8(folder, set_marker)


# external data ---------------------------------------------------------------------------


def _external_tensor(folder: Folder, model: onnx.ModelProto) -> TensorProto:
    tensor = folder.tensor(model, min_bytes=16)
    _make_external(folder, model, tensor)
    return tensor


def m_ext_symlink_file(folder: Folder) -> None:
    """A location that is a symlink to a file outside the folder."""
    model = folder.load()
    tensor = _external_tensor(folder, model)
    info = {e.key: e.value for e in tensor.external_data}
    link = folder.model_dir / "link.bin"
    link.symlink_to(folder.canary if folder.rng.random() < 0.8 else Path("/etc/passwd"))
    _set_external(tensor, location="link.bin",
                  offset="0" if folder.rng.random() < 0.5 else info.get("offset", "0"))
    folder.save(model)


def m_ext_symlink_data_file(folder: Folder) -> None:
    """The model's own data file replaced by a symlink to a file outside (bytes unchanged)."""
    model = folder.load()
    tensor = _external_tensor(folder, model)
    location = {e.key: e.value for e in tensor.external_data}["location"]
    source = folder.model_dir / location
    outside = folder.root / "outside.bin"
    shutil.copyfile(source, outside)
    with open(outside, "ab") as fh:  # the canary's marker after the tensor's bytes
        fh.write(CANARY_BYTES[:4096])
    source.unlink()
    source.symlink_to(outside)
    folder.save(model)


def m_ext_symlink_dir(folder: Folder) -> None:
    """A location through a symlinked directory that points outside the folder."""
    model = folder.load()
    tensor = _external_tensor(folder, model)
    (folder.model_dir / "sub").symlink_to(folder.root, target_is_directory=True)
    _set_external(tensor, location=f"sub/{CANARY_NAME}", offset="0")
    folder.save(model)


def m_ext_symlink_inside(folder: Folder) -> None:
    """A symlink that stays inside the folder: allowed."""
    model = folder.load()
    tensor = _external_tensor(folder, model)
    location = {e.key: e.value for e in tensor.external_data}["location"]
    (folder.model_dir / "alias.bin").symlink_to(location)
    _set_external(tensor, location="alias.bin")
    folder.save(model)


def m_ext_escape(folder: Folder) -> None:
    """`..`, absolute, `./../`, and home-relative locations."""
    model = folder.load()
    tensor = _external_tensor(folder, model)
    location = folder.rng.choice([f"../{CANARY_NAME}", str(folder.canary),
                                  f"./../{CANARY_NAME}", f"sub/../../{CANARY_NAME}",
                                  f"{folder.model_dir.name}/../../{CANARY_NAME}",
                                  "~/" + CANARY_NAME, "/etc/passwd", "/dev/zero", "/proc/self/mem"])
    _set_external(tensor, location=location, offset="0")
    folder.save(model)


def m_ext_offset(folder: Folder) -> None:
    model = folder.load()
    tensor = _external_tensor(folder, model)
    _set_external(tensor, offset=folder.rng.choice(
        ["-1", "-64", "-9223372036854775808", "abc", "", "1e3", " 12", "0x10", "1.5",
         "99999999999999999999", str(2**62), str(2**31), "٣", "+0", "0" * 5000]))
    folder.save(model)


def m_ext_length(folder: Folder) -> None:
    model = folder.load()
    tensor = _external_tensor(folder, model)
    info = {e.key: e.value for e in tensor.external_data}
    length = int(info.get("length", "0"))
    _set_external(tensor, length=folder.rng.choice(
        ["-1", "abc", "", str(length + 4), str(max(length - 4, 0)), str(length * 2), "0",
         str(2**62), str(2**63), "1e9"]))
    folder.save(model)


def m_ext_drop_keys(folder: Folder) -> None:
    model = folder.load()
    tensor = _external_tensor(folder, model)
    entries = [e for e in tensor.external_data]
    tensor.ClearField("external_data")
    for entry in entries:
        if folder.rng.random() < 0.5:
            tensor.external_data.append(entry)
    if folder.rng.random() < 0.3:  # a repeated key
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", "other.bin"
    if folder.rng.random() < 0.3:
        entry = tensor.external_data.add()
        entry.key, entry.value = "checksum", "x"
    folder.save(model)


def m_ext_location(folder: Folder) -> None:
    model = folder.load()
    tensor = _external_tensor(folder, model)
    location = folder.rng.choice(["x" * 5000, "a" * 255 + ".bin", "", ".", "missing.bin",
                                  "nul\0byte.bin", "dir", "dir/", MODEL_NAME, "a/" * 2000 + "b",
                                  "é.bin", "\\..\\" + CANARY_NAME])
    (folder.model_dir / "dir").mkdir(exist_ok=True)
    _set_external(tensor, location=location)
    folder.save(model)


def m_ext_truncate_data(folder: Folder) -> None:
    model = folder.load()
    tensor = _external_tensor(folder, model)
    location = {e.key: e.value for e in tensor.external_data}["location"]
    path = folder.model_dir / location
    data = path.read_bytes()
    path.write_bytes(data[:folder.rng.randrange(len(data) + 1)])
    folder.save(model)


def m_ext_data_location_only(folder: Folder) -> None:
    """data_location says EXTERNAL with no entries, or raw_data alongside external entries."""
    model = folder.load()
    tensor = folder.tensor(model)
    if folder.rng.random() < 0.5:
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.EXTERNAL
    else:
        _make_external(folder, model, tensor)
        tensor.raw_data = b"\0" * 16
    folder.save(model)


# quantized models: scales, zero points, the quantization ops' attributes ---------------
# (drawn only with --quantized, on the quantized bases; `QUANTIZED_MUTATIONS`)


def _quant_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of the quantization ops that read an integer weight (every graph)."""
    return [n for n in _all_nodes(model) if n.op_type in quantized_forms.WEIGHT_SLOTS]


def _quant_node(folder: Folder, model: onnx.ModelProto, *ops: str) -> onnx.NodeProto:
    nodes = [n for n in _quant_nodes(model) if not ops or n.op_type in ops]
    if not nodes:
        raise Skip
    return folder.rng.choice(nodes)


def _initializer(model: onnx.ModelProto, name: str) -> TensorProto | None:
    for graph in _all_graphs(model.graph):
        for tensor in graph.initializer:
            if name and tensor.name == name:
                return tensor
    return None


def _slot_tensor(folder: Folder, model: onnx.ModelProto, node: onnx.NodeProto,
                 which: int) -> TensorProto:
    """The initializer at the weight (0), scale (1) or zero point (2) slot of one of the
    node's weights."""
    slots = quantized_forms.WEIGHT_SLOTS[node.op_type][1]
    weight_slot = folder.rng.choice(sorted(slots))
    slot = (weight_slot, *slots[weight_slot])[which]
    if slot is None or slot >= len(node.input):
        raise Skip
    tensor = _initializer(model, node.input[slot])
    if tensor is None:
        raise Skip
    return tensor


def _values(tensor: TensorProto) -> np.ndarray:
    """A tensor's values (Skip where they are external or numpy cannot read them)."""
    if _is_external(tensor):
        raise Skip
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # noqa: BLE001 (a tensor an earlier edit left unreadable)
        raise Skip from exc


def _replace(tensor: TensorProto, array: np.ndarray, data_type: int | None = None) -> None:
    """`tensor` now holds `array` (keeping its name), as `data_type` where given."""
    name = tensor.name
    if data_type in (TensorProto.INT4, TensorProto.UINT4):
        made = helper.make_tensor(name, data_type, array.shape,
                                  np.asarray(array).reshape(-1).astype(np.int64).tolist())
    else:
        made = numpy_helper.from_array(np.asarray(array), name)
        if data_type is not None and data_type != made.data_type:
            made.data_type = data_type  # raw bytes of another type: a mismatch on purpose
    tensor.CopyFrom(made)


INTEGER_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                 TensorProto.INT32, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT64)


WEIRD_FLOATS = (0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 1e-45, 3e38, 1e-30)


def mq_none(folder: Folder) -> None:
    """The quantized model as it is (the options drawn are the case)."""


def mq_scale_values(folder: Folder) -> None:
    """Scales of 0, negative, infinite, NaN, denormal or huge (one value or all)."""
    model = folder.load()
    tensor = _slot_tensor(folder, model, _quant_node(folder, model), 1)
    array = _values(tensor).copy()
    value = folder.rng.choice(WEIRD_FLOATS)
    if array.size and folder.rng.random() < 0.6:
        array.reshape(-1)[folder.rng.randrange(array.size)] = value
    else:
        array[...] = value
    _replace(tensor, array)
    folder.save(model)


def _reshaped(folder: Folder, array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    choice = folder.rng.randrange(7)
    if choice == 0:
        return flat.reshape(-1, 1)
    if choice == 1:
        return flat.reshape(1, -1)
    if choice == 2:
        return flat[:-1] if flat.size > 1 else flat[:0]
    if choice == 3:
        return np.concatenate([flat, flat[:1]])
    if choice == 4:
        return flat[:1].reshape(())
    if choice == 5:
        return flat[:0]
    return np.concatenate([flat, flat]).reshape(2, -1)


def mq_scale_shape(folder: Folder) -> None:
    """A scale of another shape: [n, 1], [1, n], one short, one more, scalar, empty, [2, n]."""
    model = folder.load()
    tensor = _slot_tensor(folder, model, _quant_node(folder, model), 1)
    _replace(tensor, _reshaped(folder, _values(tensor)))
    folder.save(model)


def mq_zero_point_values(folder: Folder) -> None:
    """Zero points at the ends of their range, random, or (MatMulNBits) random bytes."""
    model = folder.load()
    tensor = _slot_tensor(folder, model, _quant_node(folder, model), 2)
    array = _values(tensor).astype(np.int64)
    ranges = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
    if tensor.data_type in ranges:
        low, high = ranges[tensor.data_type]
    elif array.size and tensor.data_type in INTEGER_TYPES:
        info = np.iinfo(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        low, high = int(info.min), int(info.max)
    else:
        raise Skip
    choice = folder.rng.randrange(3)
    if choice == 0:
        array[...] = folder.rng.choice([low, high])
    elif choice == 1:
        array.reshape(-1)[folder.rng.randrange(array.size)] = folder.rng.choice([low, high])
    else:
        array = np.random.default_rng(folder.rng.randrange(1 << 30)).integers(
            low, high + 1, array.shape)
    if tensor.data_type not in ranges:
        array = array.astype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    _replace(tensor, array, tensor.data_type)
    folder.save(model)


def mq_zero_point_form(folder: Folder) -> None:
    """A zero point of another type (converted, or its bytes relabelled), another shape,
    dropped from the node, or named but missing."""
    model = folder.load()
    node = _quant_node(folder, model)
    choice = folder.rng.randrange(5)
    if choice == 3:  # dropped: input left empty, or the trailing inputs cut
        slots = quantized_forms.WEIGHT_SLOTS[node.op_type][1]
        zero_slot = slots[folder.rng.choice(sorted(slots))][1]
        if zero_slot >= len(node.input):
            raise Skip
        if folder.rng.random() < 0.5:
            node.input[zero_slot] = ""
        else:
            del node.input[zero_slot:]
        folder.save(model)
        return
    if choice == 4:  # a name nothing defines
        slots = quantized_forms.WEIGHT_SLOTS[node.op_type][1]
        zero_slot = slots[folder.rng.choice(sorted(slots))][1]
        while len(node.input) <= zero_slot:
            node.input.append("")
        node.input[zero_slot] = "fuzz_missing_zero_point"
        folder.save(model)
        return
    tensor = _slot_tensor(folder, model, node, 2)
    array = _values(tensor)
    if choice == 0:
        data_type = folder.rng.choice([*INTEGER_TYPES, TensorProto.FLOAT])
        target = array.astype(np.float32) if data_type == TensorProto.FLOAT else \
            np.clip(array.astype(np.int64), -8, 7) if data_type == TensorProto.INT4 else \
            np.clip(array.astype(np.int64), 0, 15) if data_type == TensorProto.UINT4 else \
            array.astype(helper.tensor_dtype_to_np_dtype(data_type))
        _replace(tensor, target, data_type)
    elif choice == 1:
        tensor.data_type = folder.rng.choice([*INTEGER_TYPES, TensorProto.FLOAT])
    else:
        _replace(tensor, _reshaped(folder, array), tensor.data_type)
    folder.save(model)


def _set_int(node: onnx.NodeProto, name: str, value: int | None) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def mq_attributes(folder: Folder) -> None:
    """The quantization op's attributes: DequantizeLinear axis and block_size, MatMulNBits
    K / N / bits / block_size, QGemm transA / transB, Conv group, LSTM hidden_size;
    out-of-range values, removed, or added where the op has none."""
    model = folder.load()
    node = _quant_node(folder, model)
    weird = [0, 1, -1, 2, 3, -2, -3, 4, 7, 8, 16, 31, 32, 33, 64, 99, -99, 2**31, -(2**31),
             2**62]
    names = {"DequantizeLinear": ["axis", "block_size"],
             "MatMulNBits": ["K", "N", "bits", "block_size", "accuracy_level"],
             "QGemm": ["transA", "transB"], "QLinearConv": ["group"],
             "ConvInteger": ["group"], "DynamicQuantizeLSTM": ["hidden_size"],
             }.get(node.op_type, ["axis"])
    name = folder.rng.choice(names)
    _set_int(node, name, None if folder.rng.random() < 0.15 else folder.rng.choice(weird))
    folder.save(model)


def mq_axis(folder: Folder) -> None:
    """DequantizeLinear's axis anywhere in [-4, 4], or removed (default 1)."""
    model = folder.load()
    node = _quant_node(folder, model, "DequantizeLinear")
    _set_int(node, "axis", None if folder.rng.random() < 0.2 else folder.rng.randint(-4, 4))
    folder.save(model)


def mq_blocked(folder: Folder) -> None:
    """A per-tensor or per-axis DequantizeLinear made blocked (block_size along an axis, with
    scales and zero points of the block shape, taken from the old ones block by block), the
    opset raised to 21 where onnxruntime needs it; sometimes one block short or too many."""
    model = folder.load()
    nodes = [n for n in _quant_nodes(model) if n.op_type == "DequantizeLinear"
             and _initializer(model, n.input[0]) is not None
             and len(_initializer(model, n.input[0]).dims) >= 1
             and len(n.input) > 1 and _initializer(model, n.input[1]) is not None]
    if not nodes:
        raise Skip
    node = folder.rng.choice(nodes)
    weight = _initializer(model, node.input[0])
    shape = tuple(int(d) for d in weight.dims)
    rank = len(shape)
    axis = folder.rng.randrange(rank)
    block = folder.rng.choice([1, 2, 3, 4, 8, 16, 32, 64, 128])
    blocks = -(-shape[axis] // block) + folder.rng.choice([0, 0, 0, 0, -1, 1])
    old_axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    old_axis = old_axis + rank if old_axis < 0 else old_axis

    def blocked(tensor: TensorProto) -> np.ndarray:
        values = _values(tensor)
        if values.size == 1:
            spread = np.broadcast_to(values.reshape(()), shape)
        elif values.ndim == 1 and 0 <= old_axis < rank and values.size == shape[old_axis]:
            view = [1] * rank
            view[old_axis] = values.size
            spread = np.broadcast_to(values.reshape(view), shape)
        else:
            raise Skip
        picks = np.minimum(np.arange(max(blocks, 0)) * block, shape[axis] - 1)
        return np.take(spread, picks, axis=axis).copy()

    scale = _initializer(model, node.input[1])
    _replace(scale, blocked(scale))
    zero = _initializer(model, node.input[2]) if len(node.input) > 2 else None
    if zero is not None:
        _replace(zero, blocked(zero), zero.data_type)
    _set_int(node, "axis", axis)
    _set_int(node, "block_size", block)
    if folder.rng.random() < 0.7:
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < 21:
                opset.version = 21
                model.ir_version = max(model.ir_version, 10)
    folder.save(model)


def mq_weight_dtype(folder: Folder) -> None:
    """The integer weight of another type: converted (values clipped to it) or only its
    data_type changed over the same bytes."""
    model = folder.load()
    tensor = _slot_tensor(folder, model, _quant_node(folder, model), 0)
    data_type = folder.rng.choice([*INTEGER_TYPES, TensorProto.FLOAT, TensorProto.BOOL,
                                   TensorProto.FLOAT16])
    if folder.rng.random() < 0.5:
        tensor.data_type = data_type
    else:
        array = _values(tensor).astype(np.int64)
        if data_type in (TensorProto.INT4, TensorProto.UINT4):
            low, high = (-8, 7) if data_type == TensorProto.INT4 else (0, 15)
            _replace(tensor, np.clip(array, low, high), data_type)
        else:
            _replace(tensor, array.astype(helper.tensor_dtype_to_np_dtype(data_type)))
    folder.save(model)


def mq_weight_shape(folder: Folder) -> None:
    """The integer weight reshaped (same values): its dims reversed, flattened, a leading 1,
    or its last axis split."""
    model = folder.load()
    tensor = _slot_tensor(folder, model, _quant_node(folder, model), 0)
    dims = [int(d) for d in tensor.dims]
    choice = folder.rng.randrange(4)
    if choice == 0:
        dims = dims[::-1]
    elif choice == 1:
        dims = [int(np.prod(dims, dtype=np.int64))]
    elif choice == 2:
        dims = [1, *dims]
    elif dims and dims[-1] % 2 == 0:
        dims = [*dims[:-1], 2, dims[-1] // 2]
    else:
        raise Skip
    del tensor.dims[:]
    tensor.dims.extend(dims)
    folder.save(model)


def mq_shared_weight(folder: Folder) -> None:
    """The integer weight read by a second node: an Identity whose output is a graph output,
    a Cast to float, a copy of its quantization node (same grid), or a second
    DequantizeLinear with another scale."""
    model = folder.load()
    node = _quant_node(folder, model)
    slots = quantized_forms.WEIGHT_SLOTS[node.op_type][1]
    slot = folder.rng.choice(sorted(slots))
    if slot >= len(node.input) or _initializer(model, node.input[slot]) is None:
        raise Skip
    name = node.input[slot]
    graph = model.graph
    choice = folder.rng.randrange(4)
    if choice == 0:
        graph.node.append(helper.make_node("Identity", [name], ["fuzz_shared"]))
        graph.output.append(helper.make_tensor_value_info("fuzz_shared", TensorProto.UNDEFINED,
                                                          None))
    elif choice == 1:
        graph.node.append(helper.make_node("Cast", [name], ["fuzz_cast"], to=F))
        graph.output.append(helper.make_tensor_value_info("fuzz_cast", F, None))
    elif choice == 2:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = (node.name or "node") + "_fuzz_copy"
        del copy.output[:]
        copy.output.extend(f"{out}_fuzz_copy" for out in node.output)
        graph.node.append(copy)
        if node.output:
            graph.output.append(helper.make_tensor_value_info(copy.output[0],
                                                              TensorProto.UNDEFINED, None))
    else:
        graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32),
                                                         "fuzz_other_scale"))
        graph.node.append(helper.make_node("DequantizeLinear", [name, "fuzz_other_scale"],
                                           ["fuzz_other"]))
        graph.output.append(helper.make_tensor_value_info("fuzz_other", F, None))
    folder.save(model)


def mq_runtime_grid(folder: Folder) -> None:
    """A scale or zero point that is computed (through Identity), fed as a graph input, or
    held by a Constant node instead of an initializer."""
    model = folder.load()
    node = _quant_node(folder, model)
    tensor = _slot_tensor(folder, model, node, folder.rng.choice([1, 2]))
    graph = model.graph
    if tensor not in list(graph.initializer):
        raise Skip
    choice = folder.rng.randrange(3)
    renamed = f"{tensor.name}_fuzz"
    if choice == 0:
        graph.node.insert(0, helper.make_node("Identity", [tensor.name], [renamed]))
    elif choice == 1:
        graph.input.append(helper.make_tensor_value_info(
            renamed, tensor.data_type, [int(d) for d in tensor.dims]))
    else:
        value = TensorProto()
        value.CopyFrom(tensor)
        value.name = renamed
        graph.node.insert(0, helper.make_node("Constant", [], [renamed], value=value))
    for other in _all_nodes(model):
        if other is node or folder.rng.random() < 0.5:
            for index, name in enumerate(other.input):
                if name == tensor.name and other.op_type != "Identity":
                    other.input[index] = renamed
    folder.save(model)


def mq_domain(folder: Folder) -> None:
    """The quantization op in another domain (the default one, com.microsoft, an unknown)."""
    model = folder.load()
    node = _quant_node(folder, model)
    node.domain = folder.rng.choice(["", "ai.onnx", "com.microsoft", "custom", "com.other"])
    if not any(o.domain == node.domain for o in model.opset_import) and \
            node.domain not in ("", "ai.onnx"):
        model.opset_import.append(helper.make_opsetid(node.domain, 1))
    folder.save(model)


def mq_swap_inputs(folder: Folder) -> None:
    """The quantization node's inputs in another order, or fewer of them."""
    model = folder.load()
    node = _quant_node(folder, model)
    names = list(node.input)
    if folder.rng.random() < 0.5 and len(names) > 1:
        i, j = folder.rng.sample(range(len(names)), 2)
        names[i], names[j] = names[j], names[i]
    else:
        names = names[:folder.rng.randrange(len(names) + 1)]
    del node.input[:]
    node.input.extend(names)
    folder.save(model)


def mq_nbits_packing(folder: Folder) -> None:
    """MatMulNBits storage that disagrees with its attributes: packed weights of another
    shape, zero points packed short or long or as floats, scales one short, act-order
    g_idx added."""
    model = folder.load()
    node = _quant_node(folder, model, "MatMulNBits")
    choice = folder.rng.randrange(5)
    if choice == 0:
        tensor = _initializer(model, node.input[1])
        if tensor is None:
            raise Skip
        array = _values(tensor)
        _replace(tensor, _reshaped(folder, array) if folder.rng.random() < 0.5
                 else array.reshape(array.shape[0], -1))
    elif choice == 1 or choice == 2:
        if len(node.input) < 4 or _initializer(model, node.input[3]) is None:
            raise Skip
        tensor = _initializer(model, node.input[3])
        array = _values(tensor)
        _replace(tensor, array.astype(np.float32) if choice == 2 else _reshaped(folder, array))
    elif choice == 3:
        tensor = _initializer(model, node.input[2])
        if tensor is None:
            raise Skip
        _replace(tensor, _reshaped(folder, _values(tensor)))
    else:
        k = next((a.i for a in node.attribute if a.name == "K"), 1)
        model.graph.initializer.append(numpy_helper.from_array(
            np.zeros(max(min(k, 1 << 16), 0), np.int32), "fuzz_g_idx"))
        while len(node.input) < 4:
            node.input.append("")
        del node.input[4:]
        node.input.append("fuzz_g_idx")
    folder.save(model)


MUTATIONS: dict[str, Callable[[Folder], None]] = {
    name.removeprefix("m_"): function for name, function in globals().items()
    if name.startswith("m_") and callable(function)
}
# with --quantized also these (kinds "q_..."), on the quantized bases only
QUANTIZED_MUTATIONS: dict[str, Callable[[Folder], None]] = {
    name.removeprefix("m"): function for name, function in globals().items()
    if name.startswith("mq_") and callable(function)
}


# --- running -----------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # the mutation
    base: str
    command: str
    result: str  # ok | refused | internal | skipped
    detail: str = ""  # the error line or the exception's site
    breaches: list[str] = field(default_factory=list)
    argv: str = ""  # the whole command line (the case's folders as MODEL_DIR, OUT_DIR)


class _OpenWatch:
    """Records files opened (by path) while armed; an audit hook cannot be removed, so one
    is installed per process (`open_watch()`) and switched on and off."""

    def __init__(self) -> None:
        self.armed = False
        self.opened: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if not self.armed or event != "open":
            return
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)):
            self.opened.append(os.fsdecode(path))


_watch: _OpenWatch | None = None


def open_watch() -> _OpenWatch:
    global _watch
    if _watch is None:
        _watch = _OpenWatch()
    return _watch


def _hashes(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_symlink():
            found[str(path.relative_to(folder))] = "-> " + os.readlink(path)
    return found


def _error_site(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "onnxprune" in f.filename] or frames
    frame = ours[-1]
    where = frame.filename.split("onnxprune/")[-1] if "onnxprune/" in frame.filename \
        else frame.filename
    return f"{type(exc).__name__} at {where}:{frame.lineno} ({frame.name})"


TRACEBACK_HEAD = "Traceback (most recent call last):"


def run_command(argv: list[str], watch: _OpenWatch) -> tuple[int | None, str, BaseException | None]:
    from onnxprune.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    watch.opened.clear()
    watch.armed = True
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            # -v: an internal error raises, giving its site (a user error still ends
            # in its one line, then its traceback)
            code = main(argv + ["-v"])
        return code, stderr.getvalue(), None
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2, stderr.getvalue(), None
    except BaseException as exc:  # noqa: BLE001 (an escaping exception is what we look for)
        return None, stderr.getvalue(), exc
    finally:
        watch.armed = False


# --- structured runs ---------------------------------------------------------------------

STRUCTURED_COMMANDS = ("inspect-structured", "prune-structured")
# the structured prunes, one per case (all at --sparsity 0.5)
STRUCTURES = (("--structure", "channels"), ("--structure", "ffn"), ("--structure", "heads"),
              ("--structure", "channels", "--allocation", "global"),
              ("--structure", "channels", "--method", "random"))
# the options of structured pruning a share of those prunes also draw (`_structured_extras`)
STRUCTURED_METHODS = ("flap", "obs", "wanda")
# latency budgets and sensitivity sweeps are rare: they time or run the model many times
STRUCTURED_EXTRA_SHARES = {"method": 0.4, "bias": 0.3, "update": 0.25, "pattern": 0.2,
                           "latency": 0.04, "sensitivity": 0.05}
CHECK_TIMEOUT_S = 60.0
MAX_FEED_ELEMENTS = 1 << 22


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _run_in_ort(path: str, feeds_from: str, finite: bool = False) -> list[list]:
    """The outputs' [name, dtype, shape] of `path` in onnxruntime on inputs drawn from the
    graph of `feeds_from` (an exception when it does not run); with `finite`, each also says
    whether the output holds only finite numbers."""
    import onnxruntime as ort

    feeds = graph_feeds(onnx.load(feeds_from, load_external_data=False), MAX_FEED_ELEMENTS)
    if feeds is None:
        raise ValueError("no plain inputs to draw")
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(None, feeds)
    found = [[name, o.dtype.str, list(o.shape)] if isinstance(o, np.ndarray)
             else [name, type(o).__name__, None] for name, o in zip(names, outputs, strict=True)]
    if finite:
        for entry, output in zip(found, outputs, strict=True):
            entry.append(not isinstance(output, np.ndarray) or output.dtype.kind != "f"
                         or bool(np.isfinite(output).all()))
    return found


def _declared_outputs(path: str) -> list[tuple[str, bytes]]:
    graph = onnx.load(path, load_external_data=False).graph
    return [(v.name, v.type.SerializeToString(deterministic=True)) for v in graph.output]


def _checker_error(path: str, full_check: bool = True) -> str | None:
    try:
        onnx.checker.check_model(path, full_check=full_check)
    except Exception as exc:  # noqa: BLE001 (onnx raises ValidationError and others)
        return _first_line(exc)
    return None


def check_request(request: dict) -> dict:
    """One request of the check worker: {"op": "run", "model", "feeds_from"} gives
    {"outputs"} or {"error"}; {"op": "check", "output", "original"} gives {"problems"} (the
    checker's error unless the original has one too, changed graph outputs)."""
    try:
        if request["op"] == "run":
            return {"outputs": _run_in_ort(request["model"], request["feeds_from"],
                                           bool(request.get("finite")))}
        problems = []
        full = request.get("full_check", True)
        error = _checker_error(request["output"], full)
        if error and not _checker_error(request["original"], full):
            problems.append(f"bad output: onnx.checker{' (full_check)' if full else ''}: "
                            f"{error}")
        try:
            original_outputs = _declared_outputs(request["original"])
        except Exception:  # noqa: BLE001 (a mutated input onnx cannot load: nothing to compare)
            original_outputs = None
        if original_outputs is not None and _declared_outputs(request["output"]) != \
                original_outputs:
            problems.append("bad output: graph outputs (names or types) differ from the "
                            "input's")
        return {"problems": problems}
    except Exception as exc:  # noqa: BLE001 (reported to the parent)
        return {"error": f"{type(exc).__name__}: {_first_line(exc)}"}


def check_worker() -> int:
    """The child process's loop: one JSON request a line on stdin, one JSON answer a line
    (with the request's "id") on what was stdout; whatever onnx or onnxruntime print to
    file descriptor 1 goes to stderr instead, so that it cannot be taken for an answer."""
    try:
        import resource

        limit = 8 << 30  # a mutated model must not take the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    sys.stdout.flush()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        request = json.loads(line)
        answer = check_request(request) | {"id": request.get("id")}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0


class OutputChecker:
    """Checks structured outputs in a child process (`check_worker`), restarted after it
    crashes or hangs."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.requests = 0

    def _ask(self, request: dict) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--check-worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.requests += 1
        request = request | {"id": self.requests}
        deadline = time.monotonic() + CHECK_TIMEOUT_S
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            while True:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0.0))
                line = self.process.stdout.readline() if ready else ""
                if not line:
                    break
                with contextlib.suppress(ValueError):
                    answer = json.loads(line)
                    if isinstance(answer, dict) and answer.pop("id", None) == request["id"]:
                        return answer
        except (BrokenPipeError, OSError):
            pass
        status = self.process.poll()
        self.close()
        return {"crash": f"the check process died (exit {status})" if status is not None
                else f"no answer in {CHECK_TIMEOUT_S:.0f} s"}

    def problems(self, original: Path, output: Path, finite: bool = False,
                 full_check: bool = True) -> list[str]:
        """What is wrong with the `output` of `original` (empty: nothing); with `finite`,
        also outputs holding NaN or infinity where the original's do not; without
        `full_check`, onnx's checker runs without shape inference."""
        answer = self._ask({"op": "check", "output": str(output), "original": str(original),
                            "full_check": full_check})
        if "problems" not in answer:
            return [f"bad output: checking it: {answer.get('crash') or answer.get('error')}"]
        problems = list(answer["problems"])
        ran = self._ask({"op": "run", "model": str(original), "feeds_from": str(original),
                         "finite": finite})
        if "outputs" not in ran:  # the original does not run (or crashes) in onnxruntime
            return problems
        again = self._ask({"op": "run", "model": str(output), "feeds_from": str(original),
                           "finite": finite})
        if "outputs" not in again:
            problems.append(f"bad output: onnxruntime runs the input, not the output: "
                            f"{again.get('crash') or again.get('error')}")
            return problems
        kinds, original_kinds = ([entry[:3] for entry in found["outputs"]]
                                 for found in (again, ran))
        if kinds != original_kinds:
            problems.append(f"bad output: outputs {kinds} != the input's {original_kinds}")
        elif finite and any(was[3] and not now[3] for was, now in
                            zip(ran["outputs"], again["outputs"], strict=True)):
            problems.append("bad output: outputs hold NaN or infinity where the input's do "
                            "not")
        return problems

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                with contextlib.suppress(OSError):
                    if stream is not None:
                        stream.close()
            self.process = None


def command_argv(command: str, model: Path, output: Path, rng: random.Random) -> list[str]:
    """The argument list of one fuzzed `command` (random options drawn from `rng`)."""
    if command == "inspect-structured":
        return ["inspect", str(model), "--structured", *(["--json"] if rng.random() < 0.5
                                                         else [])]
    if command == "prune-structured":
        argv = ["prune", str(model), "-o", str(output), "--sparsity", "0.5",
                "--min-size", str(rng.choice([0, 16, 256, 4096])), *rng.choice(STRUCTURES),
                "--format", rng.choice(["dense", "dense", "dense", "sparse", "compact"])]
        return _structured_extras(argv, output, rng)
    if command == "prune-quantized":
        return _quantized_prune_argv(model, output, rng)
    argv = [command, str(model)]
    if command in ("prune", "densify"):
        argv += ["-o", str(output)]
    if command == "prune":
        argv += ["--min-size", str(rng.choice([16, 256, 4096]))]
        argv += ["--format", rng.choice(["dense", "dense", "sparse", "compact"])]
        if rng.random() < 0.2:
            argv += ["--pattern", "2:4"]
    return argv


# --quantized: the prune of each case draws a method (calibrated ones on synthetic inputs)
QUANTIZED_METHODS = ("magnitude", "magnitude", "random", "l1", "wanda", "obd", "sparsegpt",
                     "ria", "admm")
CALIBRATED_METHODS = ("wanda", "obd", "sparsegpt", "ria", "admm")
# kept weights may change (onto the grid): rebuilt (sparsegpt, admm) or shrunk (l1)
REBUILDING_METHODS = ("sparsegpt", "admm", "l1")


def _report_of(output: Path) -> Path:
    return output.parent / f"{output.name}.report.json"


def _quantized_prune_argv(model: Path, output: Path, rng: random.Random) -> list[str]:
    """A prune of a quantized model: any --min-size (0 too), format, a sparsity or an N:M
    pattern, a method, sometimes the float original as --float-reference, an ADMM update, a
    DSnoT refinement, another allocation or calibration mode; the report beside the
    output."""
    argv = ["prune", str(model), "-o", str(output),
            "--min-size", str(rng.choice([0, 16, 256, 4096])),
            "--format", rng.choice(["dense", "dense", "dense", "sparse", "compact"]),
            "--report", str(_report_of(output))]
    if rng.random() < 0.25:
        argv += ["--pattern", rng.choice(["2:4", "2:4", "1:4", "4:8"])]
    elif rng.random() < 0.5:
        argv += ["--sparsity", rng.choice(["0", "0.3", "0.7", "0.9", "0.99"])]
    method = rng.choice(QUANTIZED_METHODS)
    argv += ["--method", method]
    reference = model.parent / FLOAT_NAME
    if reference.is_file() and rng.random() < 0.3:
        argv += ["--float-reference", str(reference)]
    if method not in REBUILDING_METHODS and method != "random" and rng.random() < 0.15:
        argv += ["--update", "admm"]
    if method in ("magnitude", "wanda", "ria") and rng.random() < 0.15:
        argv += ["--refine", "dsnot"]
    if rng.random() < 0.25:
        argv += ["--allocation", rng.choice(["global", "erk", "owl"])]
    if method in CALIBRATED_METHODS and rng.random() < 0.3:
        argv += ["--calib-mode", rng.choice(["one-pass", "sequential"])]
    return argv


def _quantized_problems(model: Path, output: Path, argv: list[str]) -> list[str]:
    """What is wrong with the integer weights of a dense prune's `output` of the quantized
    `model` (`quantized_forms.pruning_problems`, weights the reading cannot follow left out,
    inputs stored compact not checked), as breaches."""
    words = argv
    if words[words.index("--format") + 1] != "dense":
        return []
    report_path = _report_of(output)
    if not report_path.is_file():
        return ["bad output: exit 0 but no report written"]
    report = json.loads(report_path.read_text())

    def load(path: Path) -> onnx.ModelProto:
        try:
            return onnx.load(str(path))
        except Exception:  # noqa: BLE001 (external data the checks cannot read: without it)
            return onnx.load(str(path), load_external_data=False)

    original = load(model)
    if any(n.doc_string.startswith("onnxprune:compact") for n in _all_nodes(original)):
        return []  # weights rebuilt by nodes: not read here
    unread: set[str] = set()
    before = quantized_forms.integer_weights(original, strict=False, unread=unread)
    after = quantized_forms.integer_weights(load(output), strict=False)
    rebuilds = words[words.index("--method") + 1] in REBUILDING_METHODS or "--update" in words
    return [f"bad output: integer weights: {problem}" for problem in
            quantized_forms.pruning_problems(before, after, report, rebuilds, unread)]


def _drawn_quantized(argv: str) -> list[str]:
    """The options a quantized prune drew, as the summary counts them."""
    words = argv.split()
    if "--report" not in words:
        return []
    drawn = []
    for i, word in enumerate(words[:-1]):
        if word in ("--method", "--update", "--refine", "--allocation", "--calib-mode",
                    "--pattern", "--format", "--sparsity"):
            drawn.append(f"{word} {words[i + 1]}")
        elif word == "--min-size" and words[i + 1] == "0":
            drawn.append("--min-size 0")
        elif word == "--float-reference":
            drawn.append(word)
    return drawn


def _structured_extras(argv: list[str], output: Path, rng: random.Random) -> list[str]:
    """`argv` of a structured prune with the newer options a share of cases draw, after
    `--format` (drawn after the other options, so that a seed's earlier draws stay as they
    were): a calibrated channel score where the structure names no method, its bias
    compensation, the least-squares update, a 2:4 second stage and a latency budget in place
    of `--sparsity`, its tables in a file beside the case's folder (so neither the default
    cache nor the output folder gets them; sometimes priced by the sensitivity allocation),
    or else the sensitivity allocation (sometimes `--max-error` in place of `--sparsity`)."""
    shares = STRUCTURED_EXTRA_SHARES
    extras: list[str] = []
    if "--method" not in argv and rng.random() < shares["method"]:
        method = rng.choice(STRUCTURED_METHODS)
        extras += ["--method", method]
        if method in ("flap", "obs") and rng.random() < shares["bias"]:
            extras.append(rng.choice(["--bias-compensation", "--no-bias-compensation"]))
    if rng.random() < shares["update"]:
        extras += ["--update", "least-squares"]
        if rng.random() < 0.3:
            extras += ["--least-squares-damp", rng.choice(["0", "0.1"])]
    if rng.random() < shares["pattern"]:
        extras += ["--pattern", "2:4"]
    if rng.random() < shares["latency"]:
        at = argv.index("--sparsity")
        del argv[at:at + 2]
        case = output.parent.parent
        extras += ["--latency-budget", rng.choice(["0.5", "0.7", "0.9"]),
                   "--latency-table", str(case.parent / f"{case.name}-latency.json"),
                   "--latency-threads", "1"]
        if rng.random() < 0.5:
            extras.append("--no-latency-calibration")
        if "--allocation" not in argv and rng.random() < 0.3:  # priced by swept curves
            extras += ["--allocation", "sensitivity"]
    elif "--allocation" not in argv and rng.random() < shares["sensitivity"]:
        extras += ["--allocation", "sensitivity"]
        if rng.random() < 0.5:  # as much as keeps the predicted error under a bound
            at = argv.index("--sparsity")
            del argv[at:at + 2]
            extras += ["--max-error", rng.choice(["0.05", "0.3", "2"])]
    return argv + extras


def _drawn_options(argv: str) -> list[str]:
    """The options of `_structured_extras` in a structured prune's command line, as the
    summary counts them (`--pattern` with the `--format` it goes with)."""
    words = argv.split()
    if "--structure" not in words or "--format" not in words:
        return []
    at = words.index("--format")
    form, extras = words[at + 1], words[at + 2:]
    drawn = []
    for i, word in enumerate(extras):
        if word in ("--method", "--update", "--allocation"):
            drawn.append(f"{word} {extras[i + 1]}")
        elif word == "--pattern":
            drawn.append(f"--pattern {extras[i + 1]} --format {form}")
        elif word in ("--bias-compensation", "--no-bias-compensation", "--latency-budget",
                      "--least-squares-damp", "--no-latency-calibration", "--max-error"):
            drawn.append(word)
    return drawn


def _describe(command: str, argv: list[str]) -> str:
    """The command as the summary counts it: its name, and for a structured command the
    options that choose what it does."""
    if command == "prune-structured":
        chosen = argv[argv.index("--structure"):argv.index("--format")]
        return " ".join(["prune", *chosen])
    if command == "inspect-structured":
        return "inspect --structured"
    if command == "prune-quantized":
        return "prune (quantized)"
    return command


def _shown(argv: list[str], model_dir: Path, out_dir: Path) -> str:
    """The command line with the case's folders as MODEL_DIR and OUT_DIR."""
    text = " ".join(argv)
    return text.replace(str(model_dir), "MODEL_DIR").replace(str(out_dir), "OUT_DIR")


def _allowed_open(path: str, model_dir: Path, out_dir: Path) -> bool:
    """Files under the model folder or output folder, and anything that is not case data."""
    resolved = Path(os.path.realpath(path))
    case_root = model_dir.parent
    if not resolved.is_relative_to(case_root.resolve()) and resolved != Path("/etc/passwd"):
        return True  # python modules, numba caches, ...
    return resolved.is_relative_to(model_dir.resolve()) or \
        resolved.is_relative_to(out_dir.resolve())


def run_case(number: int, seed: int, base: Base, kind: str, work: Path,
             watch: _OpenWatch, commands: list[str],
             checker: OutputChecker | None = None) -> list[Outcome]:
    rng = random.Random(f"{seed}:{number}")
    root = work / f"case{number}"
    model_dir = root / "model"
    out_dir = root / "out"
    model_dir.mkdir(parents=True)
    out_dir.mkdir()
    (root / CANARY_NAME).write_bytes(CANARY_BYTES)
    for name, data in base.files.items():
        (model_dir / name).write_bytes(data)
    folder = Folder(root, model_dir, rng)
    try:
        (MUTATIONS | QUANTIZED_MUTATIONS)[kind](folder)
    except Skip:
        shutil.rmtree(root)
        return [Outcome(kind, base.name, "-", "skipped")]
    before = _hashes(model_dir)
    outcomes = []
    for command in commands:
        output = out_dir / "out.onnx"
        argv = command_argv(command, folder.model_path, output, rng)
        code, stderr, exc = run_command(argv, watch)
        outcome = Outcome(kind, base.name, _describe(command, argv), "ok",
                          argv=_shown(argv, model_dir, out_dir))
        # with -v a user error's traceback (and what it was raised from) follows its line
        head, _, traceback_text = stderr.partition(TRACEBACK_HEAD)
        lines = [line for line in head.splitlines() if line.startswith("onnxprune:")]
        if exc is not None:
            outcome.result, outcome.detail = "internal", _error_site(exc)
        elif code == 0:
            outcome.result = "ok"
        elif code == 2 and len(lines) == 1 and lines[0].startswith("onnxprune: error:") \
                and (not traceback_text or head.rstrip().endswith(lines[0])):
            outcome.result, outcome.detail = "refused", lines[0]
        else:
            outcome.result = "internal"
            outcome.detail = f"exit {code}: {lines[-1] if lines else stderr[-200:]}"
        outside = sorted({p for p in watch.opened if not _allowed_open(p, model_dir, out_dir)})
        if outside:
            outcome.breaches.append(f"opened outside the model folder: {outside[:3]}")
        if _hashes(model_dir) != before:
            outcome.breaches.append("input folder changed")
        written = sorted(p.name for p in out_dir.iterdir())
        if code != 0 and written:
            outcome.breaches.append(f"failed run left {written}")
        # a structured prune with an N:M second stage shrinks into a temporary folder
        # beside OUT (.OUT.*.shrunk): a successful run leaves only OUT and its data there
        left = [p.name for p in out_dir.iterdir()
                if p.is_dir() or not p.name.startswith(output.name)]
        if command == "prune-structured" and code == 0 and left:
            outcome.breaches.append(f"run left {sorted(left)}")
        for path in out_dir.iterdir():
            if path.is_file() and CANARY_MARKER in path.read_bytes():
                outcome.breaches.append(f"canary bytes in {path.name}")
        if command == "prune-quantized" and code == 0 and exc is None:
            if not output.is_file():
                outcome.breaches.append("bad output: exit 0 but no output file")
            else:
                try:
                    outcome.breaches += _quantized_problems(folder.model_path, output, argv)
                except Exception as error:  # noqa: BLE001 (the check broke: say so, go on)
                    outcome.breaches.append(f"bad output: checking integer weights: "
                                            f"{type(error).__name__}: {_first_line(error)}")
                owned = checker is None
                checker = checker or OutputChecker()
                # onnx's full check cannot type sparse initializers (float ones neither)
                full = argv[argv.index("--format") + 1] != "sparse"
                outcome.breaches += checker.problems(folder.model_path, output, finite=True,
                                                     full_check=full)
                if owned:
                    checker.close()
                    checker = None
        if command == "prune-structured" and code == 0 and exc is None:
            if not output.is_file():
                outcome.breaches.append("bad output: exit 0 but no output file")
            else:
                owned = checker is None
                checker = checker or OutputChecker()
                outcome.breaches += checker.problems(folder.model_path, output)
                if owned:
                    checker.close()
                    checker = None
        for path in list(out_dir.iterdir()):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        outcomes.append(outcome)
    shutil.rmtree(root)
    return outcomes


def _refusal_kind(line: str) -> str:
    """A refusal line without its case-specific parts, to count alike ones together."""
    text = line.removeprefix("onnxprune: error: ")
    if text.startswith("nothing to prune"):
        return text.split(" (")[0]
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'|\S*/\S*", "X", text))[:90]


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def internal(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "internal"]

    @property
    def breaches(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.breaches]

    def _counts(self, title: str, keys_of, always: bool = False) -> list[str]:
        """A table of ok / refused / internal / breaches per key of the runs that ran
        (`keys_of(outcome)`: the keys it counts under); none without rows unless `always`."""
        per_key: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for outcome in self.outcomes:
            if outcome.result != "skipped":
                for key in keys_of(outcome):
                    per_key[key][outcome.result] += 1
                    per_key[key]["breaches"] += bool(outcome.breaches)
        if not per_key and not always:
            return []
        lines = [f"{title:<64}{'ok':>7}{'refused':>9}{'internal':>10}{'breaches':>10}"]
        for key in sorted(per_key):
            counts = per_key[key]
            lines.append(f"{key:<64}{counts['ok']:>7}{counts['refused']:>9}"
                         f"{counts['internal']:>10}{counts['breaches']:>10}")
        return lines

    def report(self) -> str:
        by_result = collections.Counter(o.result for o in self.outcomes)
        lines = ["outcomes: " + ", ".join(f"{name} {by_result.get(name, 0)}" for name in
                                          ("ok", "refused", "internal", "skipped"))]
        lines.append(f"invariant breaches: {len(self.breaches)}")
        lines.append(f"{'mutation':<26}{'ok':>7}{'refused':>9}{'internal':>10}{'skipped':>9}")
        per_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for outcome in self.outcomes:
            per_kind[outcome.kind][outcome.result] += 1
        for kind in sorted(per_kind):
            counts = per_kind[kind]
            lines.append(f"{kind:<26}{counts['ok']:>7}{counts['refused']:>9}"
                         f"{counts['internal']:>10}{counts['skipped']:>9}")
        lines += self._counts("command", lambda o: [o.command], always=True)
        lines += self._counts("prune drawing",
                              lambda o: _drawn_options(o.argv) + _drawn_quantized(o.argv))
        refusals = collections.Counter(
            (o.command, _refusal_kind(o.detail)) for o in self.outcomes
            if o.result == "refused" and o.command.startswith("prune --structure"))
        if refusals:
            lines.append("structured prune refusals (most common):")
            lines += [f"  {count:>5} x {command}: {reason}"
                      for (command, reason), count in refusals.most_common(12)]
        if any(o.command == "prune (quantized)" for o in self.outcomes):
            lines += self._counts("base (quantized form)", lambda o: [o.base], always=True)
        sites = collections.Counter(o.detail for o in self.internal)
        if sites:
            lines.append("internal-error sites:")
            lines += [f"  {count:>5} x {site}" for site, count in sites.most_common()]
        breaches = collections.Counter(
            ": ".join(b.split(": ")[:2]) if b.startswith("bad output: integer weights")
            else b.split(":")[0] for o in self.breaches for b in o.breaches)
        if breaches:
            lines.append("invariant breaches:")
            lines += [f"  {count:>5} x {what}" for what, count in breaches.most_common()]
        return "\n".join(lines)


@contextlib.contextmanager
def _quiet_logs():
    """onnxprune's warnings off while the cases run (thousands of them), and back after: a
    test that runs the fuzzer in-process must not silence the tests after it."""
    import logging

    logger = logging.getLogger("onnxprune")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def fuzz(cases: int, seed: int = 0, kinds: list[str] | None = None,
         commands: tuple[str, ...] = ("inspect", "prune", "densify"),
         verbose: bool = False, structured: bool = False, quantized: bool = False) -> Summary:
    """Run `cases` mutated models through the commands (and `STRUCTURED_COMMANDS` as well
    with `structured`); the outcomes, counted. With `quantized` the bases are the quantized
    ones (`make_quantized_bases`), every other case draws one of `QUANTIZED_MUTATIONS`, and
    `prune` is a quantized prune (`_quantized_prune_argv`), its output checked."""
    if quantized:
        commands = tuple("prune-quantized" if c == "prune" else c for c in commands)
    if structured:
        commands = (*commands, *(c for c in STRUCTURED_COMMANDS if c not in commands))

    def matching(table: dict) -> list[str]:
        return sorted(k for k in table if not kinds or any(k.startswith(p) for p in kinds))

    names = matching(MUTATIONS)
    quantized_names = matching(QUANTIZED_MUTATIONS) if quantized else []
    if not names and not quantized_names:
        raise SystemExit(f"no mutation kind matches {kinds}")
    bases = make_quantized_bases() if quantized else make_bases()
    rng = random.Random(seed)
    summary = Summary()
    checker = OutputChecker()
    with tempfile.TemporaryDirectory(prefix="onnxprune-fuzz-") as work, _quiet_logs(), \
            contextlib.closing(checker):
        for number in range(cases):
            if quantized_names and (not names or number % 2 == 0):
                kind = quantized_names[(number // (2 if names else 1)) % len(quantized_names)]
            else:
                kind = names[(number // (2 if quantized_names else 1)) % len(names)]
            # compact descriptions and payloads exist only in the compact bases, MatMulNBits
            # nodes in the nbits ones
            base = rng.choice([b for b in bases if "compact" in b.name]
                              if kind.startswith("compact") else
                              [b for b in bases if b.name.endswith("_nbits")]
                              if kind == "q_nbits_packing" else bases)
            for outcome in run_case(number, seed, base, kind, Path(work), open_watch(),
                                    list(commands), checker):
                summary.outcomes.append(outcome)
                if verbose and (outcome.result == "internal" or outcome.breaches):
                    print(f"case {number} {kind} on {base.name}, {outcome.argv}: "
                          f"{outcome.detail} {outcome.breaches}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", action="append", help="only mutations whose name starts so")
    parser.add_argument("--structured", action="store_true",
                        help="also run inspect --structured and prune --structure ... on each "
                             "case, checking the output in the checker and onnxruntime")
    parser.add_argument("--quantized", action="store_true",
                        help="quantized bases (demo models quantized by onnxruntime's tools), "
                             "the quantized mutation kinds (q_...) in every other case, and "
                             "prunes that draw a method, their integer weights and outputs "
                             "checked")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each failure")
    parser.add_argument("--check-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_worker:
        return check_worker()
    start = time.perf_counter()
    summary = fuzz(args.cases, args.seed, args.kind, verbose=args.verbose,
                   structured=args.structured, quantized=args.quantized)
    print(summary.report())
    print(f"{args.cases} cases, {len(summary.outcomes)} runs in "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if summary.internal or summary.breaches else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
