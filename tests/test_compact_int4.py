"""Compact storage of packed int4/uint4 weights read by DequantizeLinear.

The integers are rebuilt as int8/uint8 by the usual forms from values stored two to a byte,
then converted to int4/uint4 under the weight's own name (Cast from opset 21 on,
onnxruntime's com.microsoft QuantizeLinear below it), so the DequantizeLinear, its scale and
its zero point stay as they are. Checked on models quantized by onnxruntime's own tools and
on small hand-built graphs: the stored form is the one asked for, onnxruntime folds it and
gives outputs bit-identical to the dense pruned model, the ONNX checker passes, the file is
smaller, and `densify` gives back the very same packed initializer.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnxprune import formats
from onnxprune.cli import main
from onnxprune.config import Pattern
from onnxprune.formats import DenseCause
from onnxprune.quantized import pack_nibbles
from onnxprune.targets import Selection, discover_targets

quantization = pytest.importorskip("onnxruntime.quantization")
ort.set_default_logger_severity(3)
DIGITS = MODELS_DIR / "digits.onnx"
PIXELS = np.load(MODELS_DIR / "digits-test.npz")["pixels"]
MS_DOMAIN = "com.microsoft"


# --- models quantized by onnxruntime's tools ----------------------------------------------

class Reader(quantization.CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"pixels": PIXELS[i:i + 32]} for i in range(0, 128, 32)])

    def get_next(self):
        return next(self.batches, None)


def _quantized(form: str, folder: Path) -> Path:
    """The demo classifier quantized to 4 bits in `form` by onnxruntime's tools."""
    q = quantization
    out = folder / f"{form}.onnx"
    source = DIGITS
    if form.endswith("-21"):  # opset 21: DequantizeLinear of the ai.onnx domain reads int4
        source = folder / "digits-21.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(DIGITS), 21), source)
    settings = {
        # opset 17: onnxruntime writes its com.microsoft DequantizeLinear for int4
        "int4-channel": dict(per_channel=True, weight_type=q.QuantType.QInt4),
        "int4-channel-21": dict(per_channel=True, weight_type=q.QuantType.QInt4),
        "int4-blocked-21": dict(per_channel=True, weight_type=q.QuantType.QInt4,
                                extra_options={"BlockSize": 32}),
        "uint4-tensor": dict(per_channel=False, weight_type=q.QuantType.QUInt4),
    }
    if form in settings:
        q.quantize_static(str(source), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                          **settings[form])
        return out
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # "nbits-qdq": symmetric blocks along axis 0, no zero point; "nbits": MatMulNBits
    kwargs = {"quant_format": q.QuantFormat.QDQ} if form == "nbits-qdq" else {}
    quantizer = MatMulNBitsQuantizer(onnx.load(DIGITS), block_size=32,
                                     is_symmetric=form == "nbits-qdq", **kwargs)
    quantizer.process()
    onnx.save(quantizer.model.model, out)
    return out


COMPACT_FORMS = ["int4-channel", "int4-channel-21", "int4-blocked-21", "nbits-qdq"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("int4")
    return {form: _quantized(form, folder)
            for form in [*COMPACT_FORMS, "uint4-tensor", "nbits"]}


def _run(path: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": PIXELS[:64]})


def _initializers(path: Path) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in onnx.load(path).graph.initializer}


def _entropy(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else float(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))


def _int4_weights(path: Path) -> list[str]:
    return [t.name for t in onnx.load(path).graph.initializer
            if t.data_type in (TensorProto.INT4, TensorProto.UINT4)]


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("form", COMPACT_FORMS)
def test_int4_weights_quantized_by_onnxruntime_store_compact_and_densify_bit_exact(
        quantized, form, pattern, tmp_path, capsys) -> None:
    path = quantized[form]
    assert _int4_weights(path)  # the case this test is for
    option = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    dense, compact, restored = (tmp_path / f"{n}.onnx" for n in ("dense", "compact", "back"))
    report = tmp_path / "r.json"
    for out, fmt in ((dense, "dense"), (compact, "compact")):
        assert main(["prune", str(path), "-o", str(out), *option, "--min-size", "100",
                     "--format", fmt, "--report", str(report), "-q"]) == 0
    targets = {t["name"]: t for t in json.loads(report.read_text())["targets"]}
    stored = {name: t["format"] for name, t in targets.items()}
    # the 256 x 128 weight compact; the smaller ones (64 x 256, 128 x 10) are smaller dense
    # than with their rebuild graphs (about 3 KB each)
    largest = max(targets.values(), key=lambda t: t["numel"])
    assert largest["format"] == ("compact-nm" if ":" in pattern else "compact-bitmask")
    for target in targets.values():
        if target["format"] == "dense":
            assert target["format_reason"].startswith("compact (") and "not smaller" in \
                target["format_reason"]
    assert compact.stat().st_size < dense.stat().st_size
    for ours, theirs in zip(_run(dense), _run(compact), strict=True):
        assert np.array_equal(ours, theirs)
    onnx.checker.check_model(onnx.load(compact), full_check=True)
    assert formats.unfolded_rebuild_nodes(compact) == []
    # the rebuild ends in int4 under the weight's name: every other tensor (scales, zero
    # points) and the DequantizeLinear nodes are untouched
    kept, before = _initializers(compact), _initializers(dense)
    assert set(before) - set(kept) == {n for n, f in stored.items() if f != "dense"}
    assert all(kept[name] == before[name] for name in set(before) & set(kept))
    assert [n for n in onnx.load(compact).graph.node if n.op_type == "DequantizeLinear"] == \
        [n for n in onnx.load(dense).graph.node if n.op_type == "DequantizeLinear"]
    assert main(["densify", str(compact), "-o", str(restored), "-q"]) == 0
    assert _initializers(restored) == _initializers(dense)  # every byte of every tensor

    capsys.readouterr()
    assert main(["inspect", str(compact), "--min-size", "100", "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)["targets"]
    for target in inspected:
        numel, nnz = target["numel"], target["numel"] - target["zeros"]
        sizes = target["format_bytes"]
        assert sizes["dense"] == math.ceil(numel / 2) and sizes["sparse"] is None
        # the bound of what is stored: 4-bit values and their positions
        assert sizes["entropy_bound"] == round(nnz / 2 + numel * _entropy(nnz / numel) / 8)
        positions = numel / 4 * np.log2(6) / 8 if ":" in pattern else \
            numel * _entropy(nnz / numel) / 8
        if target["format"].startswith("compact"):
            assert target["bytes"] <= 1.1 * (nnz / 2 + positions), target["name"]


def test_asymmetric_uint4_stays_dense_with_the_zero_point_warning(quantized, tmp_path,
                                                                  capsys) -> None:
    """uint4 weights with zero points 7 or 8: pruned weights are not zero bits, as for uint8."""
    path = quantized["uint4-tensor"]
    zero_points = [numpy_helper.to_array(t).astype(int) for t in onnx.load(path).graph.initializer
                   if t.name.endswith("_zero_point") and t.data_type == TensorProto.UINT4]
    assert zero_points and all(z.all() for z in zero_points)  # the case this test is for
    report = tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--format", "compact",
                 "--min-size", "100", "--report", str(report)]) == 0
    targets = json.loads(report.read_text())["targets"]
    assert targets and all(t["format"] == "dense" for t in targets)
    assert all("quantize with symmetric weights" in t["format_reason"] for t in targets)
    assert "zero points are not 0" in capsys.readouterr().err


def test_matmul_nbits_stays_dense_saying_why(quantized, tmp_path) -> None:
    report = tmp_path / "r.json"
    assert main(["prune", str(quantized["nbits"]), "-o", str(tmp_path / "o.onnx"), "--format",
                 "compact", "--min-size", "100", "--report", str(report), "-q"]) == 0
    targets = json.loads(report.read_text())["targets"]
    assert targets and all(t["format"] == "dense" for t in targets)
    assert all(t["format_reason"].startswith("MatMulNBits reads its packed 4-bit blocks "
                                             "itself") for t in targets)
    model = onnx.load(quantized["nbits"])
    target = discover_targets(model, Selection(min_size=100))[0][0]
    raw = numpy_helper.to_array(target.stored_tensor)
    assert formats.store(target, raw, "compact", model=model).cause is DenseCause.PACKED


# --- hand-built graphs ----------------------------------------------------------------------

def _graph_model(ints: np.ndarray, data_type: int, grid: str, opset: int, layout: str = "matmul",
                 shared_with: np.ndarray | None = None) -> onnx.ModelProto:
    """y = x @ DequantizeLinear(Wq) (MatMul, Wq [K, N]) or Gemm with transB (Wq [N, K]).

    `grid`: "tensor" (scalar scale, no zero point), "axis" (per output channel, zero points
    0) or "blocked" (blocks of 8 along the reduction axis). `shared_with`: a second weight
    of the same shape read by a second DequantizeLinear with the same scale and zero point.
    """
    axis = 0 if layout == "matmul" else 1  # reduction axis
    k, n = ints.shape[axis], ints.shape[1 - axis]
    domain = "" if opset >= 21 else MS_DOMAIN
    inits = [helper.make_tensor("Wq", data_type, ints.shape, pack_nibbles(ints).tobytes(),
                                raw=True)]
    dq_inputs, attrs = ["Wq", "scale"], {}
    rng = np.random.default_rng(1)
    if grid == "tensor":
        scale = np.float32(0.05)
    elif grid == "axis":
        scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
        attrs["axis"] = 1 - axis
        zero = np.zeros(n, ml_dtypes.int4 if data_type == TensorProto.INT4 else ml_dtypes.uint4)
        inits.append(numpy_helper.from_array(zero, "zero"))
        dq_inputs.append("zero")
    else:
        shape = [-(-d // 8) if i == axis else d for i, d in enumerate(ints.shape)]
        scale = rng.uniform(0.01, 0.1, shape).astype(np.float32)
        attrs.update(axis=axis, block_size=8)
    inits.append(numpy_helper.from_array(np.asarray(scale), "scale"))
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["W"], domain=domain, **attrs),
             helper.make_node("MatMul", ["x", "W"], ["y"]) if layout == "matmul" else
             helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])]
    if shared_with is not None:
        inits.append(helper.make_tensor("Wq2", data_type, ints.shape,
                                        pack_nibbles(shared_with).tobytes(), raw=True))
        nodes += [helper.make_node("DequantizeLinear", ["Wq2", *dq_inputs[1:]], ["W2"],
                                   domain=domain, **attrs),
                  helper.make_node("MatMul", ["x", "W2"], ["y2"])]
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [3, n]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [3, k])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + ([] if opset >= 21 else
                                                 [helper.make_opsetid(MS_DOMAIN, 1)])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _pruned_ints(shape: tuple[int, ...], data_type: int, sparsity: float, nm_axis: int | None,
                 rng: np.random.Generator) -> np.ndarray:
    """Random 4-bit integers with the smallest set to 0: `sparsity` of them, or all but the
    two largest of every four along `nm_axis`."""
    low, high = (-8, 7) if data_type == TensorProto.INT4 else (0, 15)
    ints = rng.integers(low, high, shape, endpoint=True)
    ints[ints == 0] = 1
    magnitude = np.abs(ints) + rng.random(shape)  # ties broken at random
    if nm_axis is None:
        ints.reshape(-1)[np.argsort(magnitude, axis=None)[:round(sparsity * ints.size)]] = 0
        return ints
    moved = np.moveaxis(ints, nm_axis, -1)
    groups = moved.reshape(-1, 4)
    order = np.argsort(np.moveaxis(magnitude, nm_axis, -1).reshape(-1, 4), axis=1)
    np.put_along_axis(groups, order[:, :2], 0, axis=1)
    return np.ascontiguousarray(np.moveaxis(groups.reshape(moved.shape), -1, nm_axis))


def _outputs(model: onnx.ModelProto) -> list[np.ndarray]:
    x = np.random.default_rng(2).standard_normal(
        [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _only_target(model: onnx.ModelProto, name: str = "Wq"):
    targets, _ = discover_targets(model, Selection(min_size=1))
    return next(t for t in targets if t.tensor_name == name)


def _check_compact(dense: onnx.ModelProto, stored: onnx.ModelProto) -> None:
    """`stored` runs as `dense` does, passes the full check, and densifies to its bytes."""
    for ours, theirs in zip(_outputs(dense), _outputs(stored), strict=True):
        assert np.array_equal(ours, theirs)
    onnx.checker.check_model(stored, full_check=True)
    assert formats.unfolded_rebuild_nodes(stored) == []
    back = copy.deepcopy(stored)
    assert formats.densify_model(back) >= 1
    before = {t.name: t.SerializeToString() for t in dense.graph.initializer}
    assert {t.name: t.SerializeToString() for t in back.graph.initializer} == before


CASES = [(form, grid, opset) for form in ("bitmask", "gaps", "nm")
         for grid in ("tensor", "axis", "blocked") for opset in (17, 21)
         if not (grid == "blocked" and opset < 21)]  # blocks need opset 21


@pytest.mark.parametrize("data_type", [TensorProto.INT4, TensorProto.UINT4],
                         ids=["int4", "uint4"])
@pytest.mark.parametrize(("form", "grid", "opset"), CASES,
                         ids=[f"{f}-{g}-opset{o}" for f, g, o in CASES])
def test_each_form_of_a_4_bit_weight_rebuilds_bit_exact_and_is_smaller(
        form, grid, opset, data_type) -> None:
    """Forced forms, odd counts: 255 x 129 weights (an odd number of nibbles) for the
    unstructured forms; for N:M 256 x 129 stored [K, N], whose value rows (K/4 * 2 + 1 zero
    row) x 129 are odd too."""
    rng = np.random.default_rng(sum(map(ord, form + grid)) + opset + data_type)
    nm = form == "nm"
    shape = (256, 129) if nm else (255, 129)
    ints = _pruned_ints(shape, data_type, 0.8 if form == "gaps" else 0.5, 0 if nm else None,
                        rng)
    dense = _graph_model(ints, data_type, grid, opset)
    stored = copy.deepcopy(dense)
    pattern = Pattern(2, 4) if nm else Pattern()
    result = formats.store(_only_target(stored), pack_nibbles(ints), "compact", pattern,
                           model=stored, forms=(form,))
    assert result.format == f"compact-{form}"
    rebuild = [n for n in stored.graph.node if n.output[0] == "Wq"]
    assert [(n.op_type, n.domain) for n in rebuild] == (
        [("Cast", "")] if opset >= 21 else [("QuantizeLinear", MS_DOMAIN)])
    assert stored.ByteSize() < dense.ByteSize()
    values_bytes = sum(len(t.raw_data) for t in stored.graph.initializer
                       if t.name.endswith("/values"))
    assert values_bytes <= np.count_nonzero(ints) / 2 + 0.01 * ints.size  # 4 bits a value
    _check_compact(dense, stored)


@pytest.mark.parametrize("opset", [17, 21])
def test_an_n_m_weight_whose_groups_run_along_its_last_axis_rebuilds_bit_exact(opset) -> None:
    """Gemm transB: Wq [N, K], groups along axis 1 (the rebuild's transposing layout)."""
    ints = _pruned_ints((33, 64), TensorProto.INT4, 0.5, 1, np.random.default_rng(opset))
    dense = _graph_model(ints, TensorProto.INT4, "axis", opset, layout="gemm")
    stored = copy.deepcopy(dense)
    result = formats.store(_only_target(stored), pack_nibbles(ints), "compact", Pattern(2, 4),
                           model=stored, forms=("nm",))
    assert result.format == "compact-nm"
    _check_compact(dense, stored)


def test_a_zero_point_shared_by_two_int4_weights_is_left_as_it_is() -> None:
    """Both weights compact; the zero point and scale they share keep their type and bytes
    (the rebuild ends in int4, so nothing downstream changes)."""
    rng = np.random.default_rng(5)
    first, second = (_pruned_ints((256, 192), TensorProto.INT4, 0.5, None, rng)
                     for _ in range(2))
    dense = _graph_model(first, TensorProto.INT4, "axis", 21, shared_with=second)
    stored = copy.deepcopy(dense)
    for name, ints in (("Wq", first), ("Wq2", second)):
        result = formats.store(_only_target(stored, name), pack_nibbles(ints), "compact",
                               model=stored)
        assert result.format == "compact-bitmask", name
    kept = {t.name: t.SerializeToString() for t in stored.graph.initializer}
    for tensor in dense.graph.initializer:
        if tensor.name in ("zero", "scale"):
            assert kept[tensor.name] == tensor.SerializeToString()
    assert stored.ByteSize() < dense.ByteSize()
    _check_compact(dense, stored)


def test_densify_and_inspect_read_a_compact_int4_weight_as_its_integers() -> None:
    ints = _pruned_ints((64, 63), TensorProto.INT4, 0.6, None, np.random.default_rng(3))
    model = _graph_model(ints, TensorProto.INT4, "tensor", 21)
    formats.store(_only_target(model), pack_nibbles(ints), "compact", model=model,
                  forms=("bitmask",))
    info = formats.stored_formats(model)["Wq"]
    assert info.dtype == "int4" and info.shape == (64, 63)
    assert info.dense_bytes == math.ceil(ints.size / 2)
    assert info.nnz == np.count_nonzero(ints)
    dense = info.dense()
    assert dense.dtype == np.dtype(ml_dtypes.int4)
    assert np.array_equal(dense.astype(np.int64), ints)


def test_a_4_bit_weight_as_a_sparse_tensor_stays_dense_saying_why() -> None:
    ints = _pruned_ints((64, 64), TensorProto.INT4, 0.9, None, np.random.default_rng(4))
    model = _graph_model(ints, TensorProto.INT4, "axis", 21)
    before = model.SerializeToString()
    result = formats.store(_only_target(model), pack_nibbles(ints), "sparse", model=model)
    assert (result.format, result.cause) == ("dense", DenseCause.SPARSE_FOUR_BIT)
    assert result.reason == "onnxruntime cannot load int4/uint4 sparse tensors (use --format " \
                            "compact)"
    assert model.SerializeToString() == before  # the same bytes written back


def test_a_uint4_zero_point_of_8_keeps_the_weight_dense_with_the_int8_rule(caplog) -> None:
    ints = _pruned_ints((64, 64), TensorProto.UINT4, 0.5, None, np.random.default_rng(6))
    ints[ints == 0] = 8  # pruned weights sit at the zero point
    model = _graph_model(ints, TensorProto.UINT4, "axis", 21)
    zero = next(t for t in model.graph.initializer if t.name == "zero")
    zero.CopyFrom(numpy_helper.from_array(np.full(64, 8, ml_dtypes.uint4), "zero"))
    result = formats.store(_only_target(model), pack_nibbles(ints), "compact", model=model)
    assert (result.format, result.cause) == ("dense", DenseCause.ZERO_POINT)
    assert "zero points are not 0" in caplog.text


def test_int4_below_opset_21_without_onnxruntime_s_domain_stays_dense() -> None:
    """No Cast to int4 before opset 21 and no com.microsoft QuantizeLinear to use instead."""
    ints = _pruned_ints((64, 64), TensorProto.INT4, 0.5, None, np.random.default_rng(7))
    model = _graph_model(ints, TensorProto.INT4, "axis", 19)
    del model.opset_import[1]
    model.graph.node[0].domain = ""
    result = formats.store(_only_target(model), pack_nibbles(ints), "compact", model=model)
    assert result.cause is DenseCause.COMPACT_NEEDS_OPSET
    assert dict(result.blocker.detail) == {"opset": 19, "needed": 21}


def test_an_int4_constant_node_goes_back_as_the_same_constant() -> None:
    ints = _pruned_ints((128, 129), TensorProto.INT4, 0.7, None, np.random.default_rng(8))
    dense = _graph_model(ints, TensorProto.INT4, "axis", 17)
    weight = next(t for t in dense.graph.initializer if t.name == "Wq")
    dense.graph.initializer.remove(weight)
    dense.graph.node.insert(0, helper.make_node("Constant", [], ["Wq"], name="the_constant",
                                                value=weight))
    stored = copy.deepcopy(dense)
    result = formats.store(_only_target(stored), pack_nibbles(ints), "compact", model=stored)
    assert result.format.startswith("compact-")
    assert formats.stored_formats(stored)["Wq"].source == "constant_node"
    for ours, theirs in zip(_outputs(dense), _outputs(stored), strict=True):
        assert np.array_equal(ours, theirs)
    assert formats.densify_model(stored) == 1
    assert stored.graph.node[0] == dense.graph.node[0]  # name, output and packed bytes


def test_a_compact_int4_description_without_its_value_bits_is_refused(tmp_path,
                                                                     capsys) -> None:
    ints = _pruned_ints((64, 64), TensorProto.INT4, 0.5, None, np.random.default_rng(9))
    model = _graph_model(ints, TensorProto.INT4, "axis", 21)
    formats.store(_only_target(model), pack_nibbles(ints), "compact", model=model,
                  forms=("bitmask",))
    node = next(n for n in model.graph.node if n.doc_string.startswith("onnxprune:compact"))
    head, text = node.doc_string.split(" ", 1)
    description = json.loads(text)
    del description["value_bits"]  # packed values would be read as int8 ones
    node.doc_string = head + " " + json.dumps(description)
    path = tmp_path / "damaged.onnx"
    onnx.save(model, path)
    assert main(["densify", str(path), "-o", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "value_bits None for data_type 22" in err[0]
