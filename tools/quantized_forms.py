"""Quantized copies of float models made by onnxruntime's own tools, and a reading of their
integer weights' zero points written here, apart from onnxprune, to judge its results.

Imported by `peer_suite.py --quantized` and `fuzz.py --quantized` as a plain module (they put
this folder on `sys.path`).

Forms (`FORMS`), each from onnxruntime 1.2x's quantization tools:

  qdq-int8-channel   quantize_static, QDQ, int8 weights per channel (symmetric)
  qdq-uint8-tensor   quantize_static, QDQ, uint8 weights per tensor, asymmetric (zero points
                     away from 0)
  qdq-int4-channel   quantize_static, QDQ, int4 weights per channel
  qoperator          quantize_static, QOperator, int8 per channel: QLinearConv, QLinearMatMul,
                     com.microsoft QGemm
  dynamic            quantize_dynamic, int8: MatMulInteger, ConvInteger, DynamicQuantizeLSTM
  nbits              MatMulNBitsQuantizer, 4 bits, blocks of 32, asymmetric: MatMulNBits
  nbits-qdq          MatMulNBitsQuantizer with QDQ: blocked DequantizeLinear (int4, block_size)

A form is not quantizable where the tool raises, quantizes no weight, or writes a model that
onnxruntime cannot load or run, on the model as it is and after onnxruntime's pre-processing
(`quantize`).

The reading (`integer_weights`) follows the ONNX and com.microsoft op definitions: which
input of each op is the integer weight, its scale and zero point, and how per-axis, blocked
and 4-bit packed zero points spread over the weight. `pruning_problems` compares a model
before and after a prune with it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, numpy_helper

Feeds = dict[str, np.ndarray]

FORMS: dict[str, str] = {
    "qdq-int8-channel": "quantize_static QDQ, int8 weights per channel",
    "qdq-uint8-tensor": "quantize_static QDQ, uint8 weights per tensor, asymmetric",
    "qdq-int4-channel": "quantize_static QDQ, int4 weights per channel",
    "qoperator": "quantize_static QOperator int8 per channel (QLinearConv/MatMul, QGemm)",
    "dynamic": "quantize_dynamic int8 (MatMulInteger, ConvInteger, DynamicQuantizeLSTM)",
    "nbits": "MatMulNBitsQuantizer, 4 bits, blocks of 32, asymmetric (MatMulNBits)",
    "nbits-qdq": "MatMulNBitsQuantizer QDQ: blocked int4 DequantizeLinear",
}
# forms that need calibration inputs
STATIC_FORMS = ("qdq-int8-channel", "qdq-uint8-tensor", "qdq-int4-channel", "qoperator")

MS_DOMAIN = "com.microsoft"
# op -> (domains, {weight slot: (scale slot or None, zero-point slot)})
WEIGHT_SLOTS: dict[str, tuple[tuple[str, ...], dict[int, tuple[int | None, int]]]] = {
    "DequantizeLinear": (("", MS_DOMAIN), {0: (1, 2)}),
    "QLinearConv": (("",), {3: (4, 5)}),
    "QLinearMatMul": (("",), {3: (4, 5)}),
    "ConvInteger": (("",), {1: (None, 3)}),
    "MatMulInteger": (("",), {1: (None, 3)}),
    "QGemm": ((MS_DOMAIN,), {3: (4, 5)}),
    "DynamicQuantizeLSTM": ((MS_DOMAIN,), {1: (8, 9), 2: (10, 11)}),
    "MatMulNBits": ((MS_DOMAIN,), {1: (2, 3)}),
}
INTEGER_TYPES = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                 TensorProto.INT4, TensorProto.UINT4)


class NotQuantizable(Exception):
    """onnxruntime's tool could not quantize the model in this form (or quantized nothing)."""


# --- making the forms --------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizers' warnings out of the tools' output: the root logger's, Python's
    prints and onnxruntime's own log lines (written to file descriptor 2)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        root.setLevel(level)


def quantize(source: Path, out: Path, form: str, calibration: list[Feeds] | None = None) -> str:
    """`source` quantized in `form` by onnxruntime's tools, written to `out`; returns how the
    float model was prepared ("" as it is). Where the tool fails on the model as it is, it
    is tried again on the model after onnxruntime's own pre-processing (`quant_pre_process`:
    shape inference and graph optimisation, which turns Constant-node weights into
    initializers), then after that and onnx's opset conversion to 13 (per-axis
    DequantizeLinear needs it). NotQuantizable when no try gives a model that has quantized
    weights and loads and runs (on the first calibration sample) in onnxruntime."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}")
    if form in STATIC_FORMS and not calibration:
        raise NotQuantizable("no calibration inputs")
    feeds = calibration[0] if calibration else None
    first: NotQuantizable | None = None
    with tempfile.TemporaryDirectory(prefix="quantize-") as folder:
        for how in ("", "pre-processed", "pre-processed, opset 13"):
            try:
                prepared = _prepared(source, Path(folder), how)
                _quantize(prepared, out, form, calibration)
                _check_quantized(out, feeds)
                return how
            except NotQuantizable as exc:
                first = first or exc
    assert first is not None
    raise first


def _prepared(source: Path, folder: Path, how: str) -> Path:
    if not how:
        return source
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = folder / "pre-processed.onnx"
    try:
        with _quiet():
            if not out.is_file():
                quant_pre_process(str(source), str(out), skip_symbolic_shape=True)
            if "opset 13" not in how:
                return out
            model = onnx.load(str(out))
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                         0)
            if opset >= 13:
                raise NotQuantizable("opset already >= 13")
            converted = folder / "opset13.onnx"
            onnx.save(onnx.version_converter.convert_version(model, 13), str(converted))
            return converted
    except NotQuantizable:
        raise
    except Exception as exc:  # noqa: BLE001 (the preparation failed: this try is out)
        raise NotQuantizable(f"{how}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _quantize(source: Path, out: Path, form: str, calibration: list[Feeds] | None) -> None:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self, samples: list[Feeds]):
            self.samples = iter(samples)

        def get_next(self):
            return next(self.samples, None)

    static = {
        "qdq-int8-channel": dict(quant_format=q.QuantFormat.QDQ, per_channel=True,
                                 weight_type=q.QuantType.QInt8),
        "qdq-uint8-tensor": dict(quant_format=q.QuantFormat.QDQ, per_channel=False,
                                 weight_type=q.QuantType.QUInt8,
                                 activation_type=q.QuantType.QUInt8,
                                 extra_options={"WeightSymmetric": False}),
        "qdq-int4-channel": dict(quant_format=q.QuantFormat.QDQ, per_channel=True,
                                 weight_type=q.QuantType.QInt4),
        "qoperator": dict(quant_format=q.QuantFormat.QOperator, per_channel=True,
                          weight_type=q.QuantType.QInt8),
    }
    out.unlink(missing_ok=True)
    try:
        with _quiet():
            if form in static:
                q.quantize_static(str(source), str(out), Reader(list(calibration or [])),
                                  **static[form])
            elif form == "dynamic":
                q.quantize_dynamic(str(source), str(out), weight_type=q.QuantType.QInt8)
            else:
                from onnxruntime.quantization.matmul_nbits_quantizer import (
                    MatMulNBitsQuantizer,
                )

                kwargs = {"quant_format": q.QuantFormat.QDQ} if form == "nbits-qdq" else {}
                quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=32,
                                                 is_symmetric=False, **kwargs)
                quantizer.process()
                onnx.save(quantizer.model.model, str(out))
    except Exception as exc:  # noqa: BLE001 (whatever the tool raises: not quantizable)
        raise NotQuantizable(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if not out.is_file():
        raise NotQuantizable("the tool wrote no model")


def _check_quantized(out: Path, feeds: Feeds | None) -> None:
    try:
        found = integer_weights(onnx.load(str(out)))
    except Exception as exc:  # noqa: BLE001
        raise NotQuantizable(f"its output cannot be read: {_first_line(exc)}") from exc
    if not found:
        raise NotQuantizable("the tool left no weight quantized")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 (the tool wrote a model onnxruntime refuses)
        raise NotQuantizable(f"onnxruntime cannot load the tool's output: "
                             f"{_first_line(exc)}") from exc
    if feeds is not None:
        try:
            session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            raise NotQuantizable(f"onnxruntime cannot run the tool's output: "
                                 f"{_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --- reading integer weights -------------------------------------------------------------


class Unreadable(Exception):
    """A quantization op whose weight this reading does not follow (mutated models)."""


@dataclass
class IntegerWeight:
    """One integer weight as its quantization op computes with it."""

    name: str
    op: str
    ints: np.ndarray  # int64, in the logical shape (MatMulNBits: [N, K])
    zero: np.ndarray  # int64, broadcast to `ints`
    scale: np.ndarray | None  # float64, broadcast to `ints` (None: no scale input)
    # the axis the op sums over (None for DequantizeLinear: its consumer decides)
    reduction_axis: int | None = None

    def dequantized_zeros(self) -> np.ndarray:
        """Where the value the op computes with is exactly 0."""
        at_zero = self.ints == self.zero
        return at_zero if self.scale is None else at_zero | (self.scale == 0)


def _graphs(graph: onnx.GraphProto, parents: tuple = ()) -> Iterator[tuple]:
    """(graph, its scope chain innermost first) for the graph and every subgraph."""
    chain = (graph, *parents)
    yield graph, chain
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g, chain)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub, chain)


def _stored(chain: tuple, name: str) -> TensorProto | None:
    """The initializer or Constant value `name` seen from the innermost graph of `chain`,
    sparse ones (sparse_initializer, a Constant's sparse_value) as the dense tensor they
    hold."""
    if not name:
        return None
    for graph in chain:
        for tensor in graph.initializer:
            if tensor.name == name:
                return tensor
        for sparse in graph.sparse_initializer:
            if sparse.values.name == name:
                return _dense(sparse, name)
        for node in graph.node:
            if node.op_type == "Constant" and list(node.output[:1]) == [name]:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        return attr.t
                    if attr.name == "sparse_value" and \
                            attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                        return _dense(attr.sparse_tensor, name)
                return None
        if any(name in node.output for node in graph.node) or \
                any(value.name == name for value in graph.input):
            return None  # computed or fed in this scope
    return None


def _dense(sparse: onnx.SparseTensorProto, name: str) -> TensorProto:
    """The dense tensor a sparse one holds, read as the ONNX IR defines it: integer indices,
    linear [NNZ] or coordinates [NNZ, rank], in range, ascending without repeats (others,
    whose meaning depends on the reader, are Unreadable)."""
    shape = tuple(int(d) for d in sparse.dims)
    if any(d < 0 for d in shape):
        raise Unreadable(f"sparse {name}: dims {list(shape)}")
    values = _array(sparse.values).reshape(-1)
    indices = _array(sparse.indices) if values.size else np.zeros(0, np.int64)
    if indices.dtype.kind not in "iu":
        raise Unreadable(f"sparse {name}: {indices.dtype} indices")
    if indices.ndim == 2 and indices.shape == (values.size, len(shape)):
        if indices.size and (indices.min() < 0 or np.any(indices.max(axis=0) >= shape)):
            raise Unreadable(f"sparse {name}: an index outside {list(shape)}")
        indices = np.ravel_multi_index(tuple(indices.astype(np.int64).T), shape)
    elif indices.ndim != 1 or indices.size != values.size:
        raise Unreadable(f"sparse {name}: indices {list(indices.shape)} for "
                         f"{values.size} values")
    indices = indices.astype(np.int64)
    size = math.prod(shape)
    if indices.size and (indices.min() < 0 or indices.max() >= size or
                         np.any(np.diff(indices) <= 0)):
        raise Unreadable(f"sparse {name}: indices out of range, order or repeated")
    dense = np.zeros(size, values.dtype)
    dense[indices] = values
    return numpy_helper.from_array(dense.reshape(shape), name)


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _array(tensor: TensorProto) -> np.ndarray:
    return np.asarray(numpy_helper.to_array(tensor))


def _spread(values: np.ndarray, shape: tuple[int, ...], axis: int | None,
            block: int = 0) -> np.ndarray:
    """Per-tensor (one value), per-axis (1-D along `axis`) or blocked (`block` along `axis`,
    same rank) values broadcast to `shape`."""
    if values.size == 1:
        return np.broadcast_to(values.reshape(()), shape)
    if axis is None or not 0 <= axis < len(shape):
        raise Unreadable(f"{values.size} values with no axis")
    if block:
        blocks = -(-shape[axis] // block)
        if values.ndim != len(shape) or values.shape[axis] != blocks or \
                any(v != s for i, (v, s) in enumerate(zip(values.shape, shape, strict=True))
                    if i != axis):
            raise Unreadable(f"block values {list(values.shape)} for {list(shape)}")
        spread = np.repeat(values, block, axis=axis)
        return np.take(spread, np.arange(shape[axis]), axis=axis)
    if values.ndim != 1 or values.size != shape[axis]:
        raise Unreadable(f"{list(values.shape)} values along axis {axis} of {list(shape)}")
    view = [1] * len(shape)
    view[axis] = values.size
    return np.broadcast_to(values.reshape(view), shape)


def _unpack(raw: np.ndarray, bits: int) -> np.ndarray:
    """Bytes holding `8 // bits` values each, low bits first, as one row of values per row
    of `raw` (last axis unpacked)."""
    raw = np.asarray(raw, np.uint8)
    per_byte = 8 // bits
    parts = [(raw >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*raw.shape[:-1], raw.shape[-1] * per_byte)


def _read(node: onnx.NodeProto, slot: int, chain: tuple) -> IntegerWeight | None:
    op = node.op_type
    scale_slot, zero_slot = WEIGHT_SLOTS[op][1][slot]

    def stored(index: int | None) -> TensorProto | None:
        if index is None or index >= len(node.input):
            return None
        return _stored(chain, node.input[index])

    weight = stored(slot)
    if weight is None:
        return None
    scale, zero = stored(scale_slot), stored(zero_slot)
    if op == "MatMulNBits":
        return _read_nbits(node, weight, scale, zero)
    if weight.data_type not in INTEGER_TYPES:
        return None
    ints = _array(weight).astype(np.int64)
    shape = ints.shape
    zeros = np.zeros(1, np.int64) if zero is None else _array(zero).astype(np.int64)
    scales = None if scale is None else _array(scale).astype(np.float64)
    rank = len(shape)
    block = 0
    if op == "DequantizeLinear":
        axis = _attribute(node, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        block = _attribute(node, "block_size", 0)
    elif op in ("QLinearConv", "ConvInteger"):
        axis = 0
    elif op in ("QLinearMatMul", "MatMulInteger"):
        axis = rank - 1
    elif op == "QGemm":
        axis = 0 if _attribute(node, "transB", 0) else 1
    else:  # DynamicQuantizeLSTM: [dirs] or [dirs, 4*hidden] over [dirs, input, 4*hidden]
        def lstm(values: np.ndarray) -> np.ndarray:
            if values.size == 1:
                return np.broadcast_to(values.reshape(()), shape)
            if rank != 3:
                raise Unreadable(f"LSTM weight of rank {rank}")
            if values.shape == (shape[0],):
                return np.broadcast_to(values.reshape(shape[0], 1, 1), shape)
            if values.shape == (shape[0], shape[2]):
                return np.broadcast_to(values.reshape(shape[0], 1, shape[2]), shape)
            raise Unreadable(f"LSTM values {list(values.shape)} for {list(shape)}")

        return IntegerWeight(weight.name, op, ints, lstm(zeros),
                             None if scales is None else lstm(scales),
                             reduction_axis=1 if rank == 3 else None)
    reduction = {"QLinearConv": 1, "ConvInteger": 1, "QLinearMatMul": rank - 2,
                 "MatMulInteger": rank - 2, "QGemm": 1 - axis}.get(op)
    return IntegerWeight(weight.name, op, ints, _spread(zeros, shape, axis, block),
                         None if scales is None else _spread(scales, shape, axis, block),
                         reduction)


def _read_nbits(node: onnx.NodeProto, weight: TensorProto, scale: TensorProto | None,
                zero: TensorProto | None) -> IntegerWeight:
    """MatMulNBits: B uint8 [N, blocks, block*bits/8], values low bits first; scales [N *
    blocks]; zero points uint8, each row of N packed to whole bytes (default 2^(bits-1))."""
    bits = _attribute(node, "bits", 4)
    k, n = _attribute(node, "K", 0), _attribute(node, "N", 0)
    block = _attribute(node, "block_size", 0)
    if bits not in (2, 4, 8) or k <= 0 or n <= 0 or block <= 0 or block * bits % 8:
        raise Unreadable(f"MatMulNBits bits={bits} K={k} N={n} block_size={block}")
    blocks = -(-k // block)
    raw = _array(weight)
    if weight.data_type != TensorProto.UINT8 or raw.shape != (n, blocks, block * bits // 8):
        raise Unreadable(f"MatMulNBits B of shape {list(raw.shape)}")
    ints = _unpack(raw.reshape(n, -1), bits)[:, :k].astype(np.int64)
    if zero is None:
        zeros = np.full((n, blocks), 1 << (bits - 1), np.int64)
    elif zero.data_type == TensorProto.UINT8:
        packed = _array(zero).reshape(n, -1)
        zeros = _unpack(packed, bits)[:, :blocks].astype(np.int64)
        if zeros.shape != (n, blocks):
            raise Unreadable("MatMulNBits zero points too few")
    else:
        raise Unreadable("MatMulNBits float zero points")
    spread_zero = np.repeat(zeros, block, axis=1)[:, :k]
    scales = None
    if scale is not None:
        values = _array(scale).astype(np.float64).reshape(-1)
        if values.size != n * blocks:
            raise Unreadable("MatMulNBits scales")
        scales = np.repeat(values.reshape(n, blocks), block, axis=1)[:, :k]
    return IntegerWeight(weight.name, "MatMulNBits", ints, spread_zero, scales, 1)


def integer_weights(model: onnx.ModelProto, strict: bool = True,
                    unread: set[str] | None = None) -> dict[str, IntegerWeight]:
    """The integer weights of the quantization ops of every graph, by tensor name (the first
    reading where several ops read one). With `strict`, an op this reading cannot follow
    raises Unreadable; otherwise it is left out, its weight's name added to `unread`."""
    found: dict[str, IntegerWeight] = {}
    for graph, chain in _graphs(model.graph):
        for node in graph.node:
            entry = WEIGHT_SLOTS.get(node.op_type)
            domain = "" if node.domain in ("", "ai.onnx") else node.domain
            if entry is None or domain not in entry[0]:
                continue
            for slot in entry[1]:
                if slot >= len(node.input) or node.input[slot] in found:
                    continue
                try:
                    weight = _read(node, slot, chain)
                except Exception as exc:  # noqa: BLE001 (also a tensor numpy cannot read)
                    if strict:
                        raise exc if isinstance(exc, Unreadable) else \
                            Unreadable(_first_line(exc)) from exc
                    if unread is not None:
                        unread.add(node.input[slot])
                    continue
                if weight is not None:
                    found[weight.name] = weight
    return found


# --- judging a prune ---------------------------------------------------------------------


def _n_of_m(pattern: str) -> tuple[int, int] | None:
    if ":" not in pattern:
        return None
    n, m = pattern.split(":")
    return int(n), int(m)


def pruning_problems(before: dict[str, IntegerWeight], after: dict[str, IntegerWeight],
                     report: dict | None, rebuilds: bool = False,
                     unread: set[str] = frozenset()) -> list[str]:
    """What is wrong with the integer weights of a pruned model (`after`) against the model
    it was pruned from (`before`), both as `integer_weights` reads them, given the prune's
    JSON report: every quantized weight still there with its scale and zero point; with a
    method that does not rebuild weights, every changed integer is now its zero point; a
    weight that is not a target is unchanged; each integer target has as many weights at
    value 0 as the report says and as the plan asks for (less per-row rounding), and N:M
    groups along the axis the op sums over hold at most N others. Weights named in `unread`
    (the reading could not follow them) are not judged."""
    problems: list[str] = []
    targets = {t["name"]: t for t in (report or {}).get("targets", [])}
    for name, old in before.items():
        new = after.get(name)
        if new is None:
            problems.append(f"{name}: quantized weight gone from the output")
            continue
        if new.ints.shape != old.ints.shape or new.op != old.op:
            problems.append(f"{name}: {old.op} {list(old.ints.shape)} became {new.op} "
                            f"{list(new.ints.shape)}")
            continue
        if not np.array_equal(new.zero, old.zero):
            problems.append(f"{name}: zero points changed")
        if (old.scale is None) != (new.scale is None) or (old.scale is not None and not
                                                          np.array_equal(old.scale, new.scale,
                                                                         equal_nan=True)):
            problems.append(f"{name}: scales changed")
        changed = new.ints != old.ints
        target = targets.get(name)
        if report is not None and target is None:
            if changed.any():
                problems.append(f"{name}: not a target, yet {int(changed.sum())} integers "
                                f"changed")
            continue
        if not rebuilds and np.any(new.ints[changed] != old.zero[changed]):
            wrong = int(np.count_nonzero(new.ints[changed] != old.zero[changed]))
            problems.append(f"{name} ({old.op}): {wrong} changed integers are not their "
                            f"zero point")
        if target is None:
            continue
        zeros = new.dequantized_zeros()
        numel = zeros.size
        if target.get("zeros") is not None and int(target["zeros"]) != int(zeros.sum()):
            problems.append(f"{name} ({old.op}): report says {target['zeros']} zeros, "
                            f"{int(zeros.sum())} weights dequantize to 0")
        requested = target.get("requested_sparsity")
        # methods that plan per output row (wanda) round each row: up to half a weight per
        # row short of the layer's count, and there are at most max(shape) rows
        short = max(zeros.shape, default=1)
        if requested is not None and zeros.sum() < math.floor(float(requested) * numel) - short:
            problems.append(f"{name} ({old.op}): {int(zeros.sum())} of {numel} at 0, "
                            f"{requested} requested")
        if requested == 0 and changed.any():
            problems.append(f"{name} ({old.op}): sparsity 0 changed {int(changed.sum())} "
                            f"integers")
        axis = target.get("axis")
        if old.reduction_axis is not None and axis is not None and \
                int(axis) != old.reduction_axis:
            problems.append(f"{name} ({old.op}): reported axis {axis}, the op sums over "
                            f"axis {old.reduction_axis}")
            axis = old.reduction_axis
        nm = _n_of_m(str(target.get("pattern", "")))
        if nm and axis is not None and 0 <= int(axis) < zeros.ndim and \
                zeros.shape[int(axis)] % nm[1] == 0:
            groups = np.moveaxis(~zeros, int(axis), -1).reshape(-1, nm[1])
            over = int(np.count_nonzero(groups.sum(axis=1) > nm[0]))
            if over:
                problems.append(f"{name} ({old.op}): {over} groups break {nm[0]}:{nm[1]}")
    for name in targets:
        entry = targets[name]
        if name not in before and name not in unread and \
                str(entry.get("dtype", "")).startswith(("int", "uint")):
            problems.append(f"{name}: an {entry['dtype']} target that no quantization op "
                            f"reads as its weight")
    return problems
