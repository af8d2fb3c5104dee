"""Storage formats: sparse and compact tensors rebuild bit-exactly, in onnxruntime and in numpy.

Every stored model is checked four ways against the dense-with-zeros model it came from:
onnx.checker, shape inference (compact), onnxruntime outputs (exactly equal, and the
rebuilt tensor itself bit-identical), and `densify` (bit-identical arrays back in place).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune import formats
from onnxprune.config import Pattern
from onnxprune.formats import compact
from onnxprune.formats.graphs import METADATA_KEY, bits_of, make_tensor, walk_graphs
from onnxprune.io import (
    load_model,
    model_file_bytes,
    model_from_proto,
    read_array,
    save_model,
)
from onnxprune.targets import Selection, WeightTarget, discover_targets

ort.set_default_logger_severity(3)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": BFLOAT16}
ALL = Selection(min_size=1)
UNSTRUCTURED = Pattern()
PATTERNS = ["unstructured", "2:4", "1:4", "4:8", "2:8", "1:2"]
EXAMPLES = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- models and weights ------------------------------------------------------------------------

def matmul_model(weight: np.ndarray, layout: str = "matmul", opset: int = 17) -> onnx.ModelProto:
    """y = x @ W (MatMul, W [K, N], axis 0) or y = x @ W^T (Gemm transB, W [N, K], axis 1).

    The weight goes through Cast to float so that every dtype runs on the CPU provider, and
    the Cast output `w_float` can be made a graph output to compare the rebuilt tensor.
    """
    k = weight.shape[0] if layout == "matmul" else weight.shape[1]
    n = weight.shape[1] if layout == "matmul" else weight.shape[0]
    cast = helper.make_node("Cast", ["W"], ["w_float"], to=TensorProto.FLOAT)
    product = helper.make_node("MatMul", ["x", "w_float"], ["y"]) if layout == "matmul" else \
        helper.make_node("Gemm", ["x", "w_float"], ["y"], transB=1)
    graph = helper.make_graph(
        [cast, product], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [make_tensor("W", weight, doc="")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def prune(weight: np.ndarray, sparsity: float, pattern: Pattern, axis: int,
          rng: np.random.Generator) -> np.ndarray:
    """Zero a random `sparsity` of the weights, or all but (at most) N of every M along axis."""
    pruned = weight.copy()
    if pattern.is_nm:
        moved = np.moveaxis(pruned, axis, -1).copy()
        groups = moved.reshape(-1, pattern.m)
        keep = rng.random(groups.shape).argsort(axis=1) < pattern.n
        keep &= rng.random(groups.shape) > sparsity * 0.5  # some groups keep fewer than N
        groups[~keep] = 0
        return np.ascontiguousarray(np.moveaxis(groups.reshape(moved.shape), -1, axis))
    flat = pruned.reshape(-1)
    flat[rng.permutation(flat.size)[:int(round(sparsity * flat.size))]] = 0
    return pruned


def random_weights(shape, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    weight = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    flat = weight.reshape(-1)
    flat[rng.random(flat.size) < 0.02] = -0.0  # kept as a value: a bit pattern, not a zero
    return weight


def only_target(model: onnx.ModelProto, pattern: Pattern = UNSTRUCTURED) -> WeightTarget:
    targets, _ = discover_targets(model, Selection(min_size=1, pattern=pattern))
    assert len(targets) == 1
    return targets[0]


def run(model: onnx.ModelProto, feeds: dict, outputs=("y", "w_float")) -> list[np.ndarray]:
    model = copy.deepcopy(model)
    for name in outputs:
        if name not in {o.name for o in model.graph.output}:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(list(outputs), feeds)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits_of(a), bits_of(b))


def output_shapes(model: onnx.ModelProto) -> list:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output]


@contextlib.contextmanager
def chunk_elements(count: int, load_slack: float | None = None):
    """Rows per chunk, and optionally the size slack that lets cheaper rebuilds win
    (0: always the smallest plan, e.g. packed gap codes; 1: aligned codes nearly always)."""
    saved = compact.CHUNK_ELEMENTS, compact.LOAD_SLACK
    compact.CHUNK_ELEMENTS = count
    if load_slack is not None:
        compact.LOAD_SLACK = load_slack
    try:
        yield
    finally:
        compact.CHUNK_ELEMENTS, compact.LOAD_SLACK = saved


def densified_weight(model: onnx.ModelProto, name: str = "W") -> np.ndarray:
    dense = copy.deepcopy(model)
    formats.densify_model(dense)
    targets, _ = discover_targets(dense, ALL)
    (target,) = [t for t in targets if t.name == name]
    return np.array(read_array(target.tensor, Path(".")))


def check_stored(reference: onnx.ModelProto, stored: onnx.ModelProto, pruned: np.ndarray,
                 fmt: str, result: formats.StoreResult) -> None:
    """The four checks of the module docstring, plus stored_formats and folding."""
    onnx.checker.check_model(stored)
    feeds = {"x": np.random.default_rng(1).standard_normal(
        (3, reference.graph.input[0].type.tensor_type.shape.dim[1].dim_value),
        dtype=np.float32)}
    want_y, want_w = run(reference, feeds)
    got_y, got_w = run(stored, feeds)
    assert np.array_equal(got_y, want_y)
    assert same_bits(got_w, want_w)
    assert same_bits(densified_weight(stored), pruned)
    infos = formats.stored_formats(stored)
    if result.format == "dense":
        assert infos == {}
        return
    assert set(infos) == {"W"} and infos["W"].format == result.format
    assert infos["W"].nnz == np.count_nonzero(bits_of(pruned))
    assert same_bits(infos["W"].dense(), pruned)
    if fmt == "compact":
        onnx.checker.check_model(stored, full_check=True)
        assert output_shapes(stored) == output_shapes(reference)
        assert formats.unfolded_rebuild_nodes(stored) == []


# --- property tests ----------------------------------------------------------------------------

@EXAMPLES
@given(dtype=st.sampled_from(sorted(DTYPES)), pattern=st.sampled_from(PATTERNS),
       rows=st.integers(1, 12), columns=st.integers(1, 24),
       sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9, 0.97, 1.0]),
       fmt=st.sampled_from(["sparse", "compact"]),
       forms=st.sampled_from([None, ("gaps",), ("bitmask",), ("nm",), ("zeros",)]),
       layout=st.sampled_from(["matmul", "gemm"]), chunk=st.sampled_from([64, 1 << 20]),
       opset=st.sampled_from([11, 13, 17, 21]), slack=st.sampled_from([0.0, 1.0]),
       seed=st.integers(0, 2**16))
def test_stored_model_matches_dense_with_zeros(dtype, pattern, rows, columns, sparsity, fmt,
                                               forms, layout, chunk, opset, slack, seed):
    pattern = Pattern.parse(pattern)
    if dtype == "bfloat16":
        opset = max(opset, 13)  # Cast to and from bfloat16 starts at opset 13
    rng = np.random.default_rng(seed)
    m = max(pattern.m, 1)
    shape = (rows * 8 * m // math.gcd(8, m), columns) if layout == "matmul" else \
        (columns, rows * 8 * m // math.gcd(8, m))
    axis = 0 if layout == "matmul" else 1
    pruned = prune(random_weights(shape, DTYPES[dtype], rng), sparsity, pattern, axis, rng)
    if forms == ("zeros",):
        pruned[...] = 0
    reference = matmul_model(pruned, layout, opset)
    stored = copy.deepcopy(reference)
    with chunk_elements(chunk, slack):
        result = formats.store(only_target(stored, pattern), pruned, fmt, pattern,
                               model=stored, forms=forms if fmt == "compact" else None)
    if forms is not None and fmt == "compact" and (forms != ("nm",) or pattern.is_nm) \
            and pruned.any():
        assert result.format == f"compact-{forms[0]}"
    check_stored(reference, stored, pruned, fmt, result)


@EXAMPLES
@given(dtype=st.sampled_from(sorted(DTYPES)), shape=st.sampled_from([(8, 3), (64, 5), (16, 40)]),
       density=st.floats(0.0, 1.0), forms=st.sampled_from([("gaps",), ("bitmask",)]),
       slack=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16))
def test_any_bit_pattern_round_trips(dtype, shape, density, forms, slack, seed):
    """NaN payloads, infinities and -0.0 survive compact and sparse storage (numpy side)."""
    dtype = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    unsigned = np.dtype(f"u{dtype.itemsize}")
    weight = rng.integers(0, np.iinfo(unsigned).max, size=shape, dtype=unsigned,
                          endpoint=True).view(dtype)
    weight.reshape(-1)[rng.random(weight.size) >= density] = 0
    for fmt in ("sparse", "compact"):
        model = matmul_model(weight)
        with chunk_elements(compact.CHUNK_ELEMENTS, slack):
            formats.store(only_target(model), weight, fmt, model=model,
                          forms=forms if fmt == "compact" else None)
        assert same_bits(densified_weight(model), weight)


# --- placement: constants, subgraphs, external data --------------------------------------------

def constant_model(weight: np.ndarray) -> onnx.ModelProto:
    model = matmul_model(weight)
    del model.graph.initializer[:]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["W"], name="the_constant",
                                                value=make_tensor("W", weight, doc="")))
    return model


def subgraph_model(weight: np.ndarray) -> onnx.ModelProto:
    """The weight lives inside both branches of an If (as silero-vad keeps its weights)."""
    k, n = weight.shape

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Cast", ["W"], ["w_float"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "w_float"], ["branch_y"])], name, [],
            [helper.make_tensor_value_info("branch_y", TensorProto.FLOAT, [3, n])],
            [make_tensor("W", weight, doc="")])

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="the_if", then_branch=branch("then"),
                          else_branch=branch("else"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [numpy_helper.from_array(np.array(True), "flag")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("fmt", ["sparse", "compact"])
def test_constant_node_weight_stays_a_constant(fmt):
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    reference = constant_model(pruned)
    stored = copy.deepcopy(reference)
    result = formats.store(only_target(stored), pruned, fmt, model=stored)
    assert result.format != "dense"
    check_stored(reference, stored, pruned, fmt, result)
    assert formats.stored_formats(stored)["W"].source == "constant_node"
    formats.densify_model(stored)
    (constant,) = [n for n in stored.graph.node if n.op_type == "Constant"]
    assert constant.name == "the_constant" and constant.attribute[0].name == "value"
    assert not stored.graph.initializer
    assert [n.op_type for n in stored.graph.node] == [n.op_type for n in reference.graph.node]


@pytest.mark.parametrize("fmt", ["sparse", "compact"])
def test_subgraph_weights(fmt):
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    reference = subgraph_model(pruned)
    stored = copy.deepcopy(reference)
    targets, _ = discover_targets(stored, ALL)
    assert len(targets) == 2 and all(t.source == "subgraph:the_if" for t in targets)
    results = [formats.store(t, pruned, fmt, model=stored) for t in targets]
    assert all(r.format != "dense" for r in results)
    onnx.checker.check_model(stored)
    feeds = {"x": rng.standard_normal((3, 64), dtype=np.float32)}
    assert np.array_equal(run(stored, feeds, ("y",))[0], run(reference, feeds, ("y",))[0])
    infos = formats.stored_formats(stored)
    assert len(infos) == 2 and all(i.source == "subgraph:the_if" for i in infos.values())
    if fmt == "compact":
        assert formats.unfolded_rebuild_nodes(stored) == []
    assert formats.densify_model(stored) == 2
    for target in discover_targets(stored, ALL)[0]:
        assert same_bits(np.array(read_array(target.tensor, Path("."))), pruned)


@pytest.mark.parametrize("external", [True, False])
@pytest.mark.parametrize("fmt", ["sparse", "compact"])
def test_saved_model_round_trip(tmp_path, fmt, external):
    """Saved through io.save_model (with external data: values and indices go to the data
    file), loaded by onnxruntime, and loaded back (lazily too) for densify."""
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((512, 64), np.float32, rng), 0.9, Pattern(), 0, rng)
    reference = matmul_model(pruned)
    stored = copy.deepcopy(reference)
    formats.store(only_target(stored), pruned, fmt, model=stored)
    path = save_model(model_from_proto(stored, tmp_path), tmp_path / "m.onnx",
                      external=external)
    on_disk = onnx.load(str(path), load_external_data=False)
    if external:
        tensors = [s.values for s in on_disk.graph.sparse_initializer] + \
            [s.indices for s in on_disk.graph.sparse_initializer] + \
            list(on_disk.graph.initializer)
        big = [t for t in tensors if math.prod(t.dims) * 4 >= 4096]
        assert big and all(t.data_location == TensorProto.EXTERNAL for t in big)
        data = tmp_path / "m.onnx.data"
        assert model_file_bytes(path) == path.stat().st_size + data.stat().st_size
    feeds = {"x": rng.standard_normal((3, 512), dtype=np.float32)}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(["y"], feeds)[0], run(reference, feeds, ("y",))[0])
    for loaded in (load_model(path), load_model(path, lazy=True)):
        assert same_bits(formats.stored_formats(loaded.proto, loaded.base_dir)["W"].dense(),
                         pruned)
        formats.densify_model(loaded.proto, loaded.base_dir)
        (target,) = discover_targets(loaded.proto, ALL)[0]
        assert same_bits(np.array(read_array(target.tensor, loaded.base_dir)), pruned)


# --- when a format is not used, and why --------------------------------------------------------

def test_sparse_stays_dense_where_larger():
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.5, Pattern(), 0, rng)
    model = matmul_model(pruned)
    result = formats.store(only_target(model), pruned, "sparse", model=model)
    assert result.format == "dense" and "not smaller than dense" in result.reason
    assert not model.graph.sparse_initializer


def test_compact_stays_dense_at_zero_sparsity():
    pruned = random_weights((64, 16), np.float32, np.random.default_rng(0))
    model = matmul_model(pruned)
    result = formats.store(only_target(model), pruned, "compact", model=model)
    assert result.format == "dense" and "not smaller than dense" in result.reason
    assert METADATA_KEY not in {p.key for p in model.metadata_props}


def test_compact_needs_opset_11():
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    model = matmul_model(pruned, opset=10)
    result = formats.store(only_target(model), pruned, "compact", model=model)
    assert result.format == "dense" and "opset >= 11" in result.reason


def test_tensor_above_the_folding_limit_stays_dense(monkeypatch, caplog):
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    model = matmul_model(pruned)
    monkeypatch.setattr("onnxprune.formats.storage.FOLD_CAP_BYTES", 4096)
    logger = logging.getLogger("onnxprune.formats.storage")  # the CLI stops propagation
    logger.addHandler(caplog.handler)
    try:
        result = formats.store(only_target(model), pruned, "compact", model=model)
    finally:
        logger.removeHandler(caplog.handler)
    assert result.format == "dense" and "constant-folding limit" in result.reason
    assert "rebuilt at every inference" in caplog.text  # a warning, not a silent slowdown


def test_overridable_initializer_stays_dense():
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    model = matmul_model(pruned)
    target = only_target(model)
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 16]))
    for fmt in ("sparse", "compact"):
        result = formats.store(target, pruned, fmt, model=model)
        assert result.format == "dense" and "graph input" in result.reason


def test_dense_writes_the_array_back():
    weight = random_weights((8, 4), np.float32, np.random.default_rng(0))
    model = matmul_model(weight)
    pruned = weight.copy()
    pruned[0] = 0
    result = formats.store(only_target(model), pruned, "dense")
    assert result == formats.StoreResult("dense", pruned.nbytes)
    assert same_bits(numpy_helper.to_array(model.graph.initializer[0]), pruned)


def test_store_rejects_mismatched_weights():
    model = matmul_model(np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        formats.store(only_target(model), np.zeros((4, 8), np.float32), "compact")
    with pytest.raises(ValueError, match="format must be"):
        formats.store(only_target(model), np.zeros((8, 4), np.float32), "zip")


# --- choosing, reporting, recognizing ----------------------------------------------------------

def test_forms_are_chosen_by_size():
    rng = np.random.default_rng(0)
    weight = random_weights((512, 512), np.float32, rng)
    chosen = {}
    for level in ("0.5", "0.95", "2:4"):
        pattern = Pattern.parse(level) if ":" in level else Pattern()
        pruned = prune(weight, 0.0 if pattern.is_nm else float(level), pattern, 0, rng)
        model = matmul_model(pruned)
        chosen[level] = formats.store(only_target(model, pattern), pruned, "compact", pattern,
                                      model=model).format
    assert chosen == {"0.5": "compact-bitmask", "0.95": "compact-gaps", "2:4": "compact-nm"}


def test_two_four_is_packed_below_0_54_of_dense():
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((1024, 256), np.float32, rng), 0.0, Pattern(2, 4), 0, rng)
    table = formats.format_bytes_table(pruned, pattern="2:4", reduction_axis=0)
    assert table["compact_format"] == "compact-nm"
    assert table["compact"] <= 0.54 * table["dense"]


def test_compact_at_90_percent_is_near_the_entropy_bound():
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((1024, 1024), np.float32, rng), 0.9, Pattern(), 0, rng)
    table = formats.format_bytes_table(pruned)
    assert table["compact"] <= 1.15 * table["entropy_bound"]
    with chunk_elements(compact.CHUNK_ELEMENTS, 0.0):
        smallest = formats.format_bytes_table(pruned)
    assert smallest["compact"] <= 1.05 * table["entropy_bound"]


def test_gap_codes_are_aligned_where_that_costs_little_size():
    """At 90 % byte codes cost ~5 % more than packed planes and rebuild with one Cast
    instead of a table lookup per plane; with no slack the packed planes win."""
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((512, 512), np.float32, rng), 0.9, Pattern(), 0, rng)
    plans = compact.unstructured_plans([pruned])
    chosen = compact.choose_plan(plans)
    smallest = min(plans, key=lambda p: p.bytes)
    assert chosen.kind == "gaps" and chosen.aligned and chosen.width == 8
    assert not smallest.aligned and chosen.bytes <= smallest.bytes * (1 + compact.LOAD_SLACK)
    assert chosen.load_bytes < smallest.load_bytes
    model = matmul_model(pruned)
    formats.store(only_target(model), pruned, "compact", model=model)
    assert "Gather" not in {node.op_type for node in model.graph.node}


def test_aligned_gap_codes_keep_long_gaps_as_exceptions():
    weight = np.zeros((4, 50_000), np.float32)
    # gap + 1 of 255 fits a byte, 256 does not; 65,535 fits 16 bits, 69,488 does not
    positions = [0, 1, 256, 512, 70_000, 135_535, 199_999]
    weight.reshape(-1)[positions] = np.arange(1, len(positions) + 1)
    for width in (8, 16):
        plan = compact.EncodingPlan("gaps", 0, width=width, aligned=True)
        payload = compact.encode_chunk(weight, plan, None)
        assert payload.arrays["codes"].dtype == (np.uint8 if width == 8 else np.uint16)
        meta = {"prefix": "p", "shape": list(weight.shape), **compact.plan_meta(plan, None)}
        decoded = compact.decode_chunk(meta, 0, {"kind": "gaps", "rows": [0, 4],
                                                 "nnz": len(positions)},
                                       weight.dtype, lambda name, arrays=payload.arrays:
                                       arrays[name.rsplit("/", 1)[1]])
        assert same_bits(decoded, weight)
    reference = matmul_model(weight)
    stored = copy.deepcopy(reference)
    with chunk_elements(compact.CHUNK_ELEMENTS, 1.0):
        result = formats.store(only_target(stored), weight, "compact", model=stored,
                               forms=("gaps",))
    check_stored(reference, stored, weight, "compact", result)


def test_format_bytes_table():
    weight = np.zeros((100, 8), np.float16)
    weight[:10] = 1.0
    table = formats.format_bytes_table(weight, np.float16)
    assert table["numel"] == 800 and table["nnz"] == 80
    assert table["sparsity"] == pytest.approx(0.9)
    assert table["dense"] == 1600 and table["sparse"] == 80 * (2 + 8)
    assert table["entropy_bound"] == pytest.approx(
        (16 * 80 + 800 * formats.binary_entropy(0.1)) / 8)
    assert table["compact"] > 0 and table["compact_format"].startswith("compact-")
    empty = formats.format_bytes_table(np.zeros((0, 4), np.float32))
    assert empty["compact"] is None and empty["entropy_bound"] == 0


def test_binary_entropy():
    assert formats.binary_entropy(0.0) == formats.binary_entropy(1.0) == 0.0
    assert formats.binary_entropy(0.5) == pytest.approx(1.0)
    assert formats.binary_entropy(0.1) == pytest.approx(0.4689955935892812)


def test_metadata_marks_the_formats_used():
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    model = matmul_model(pruned)
    formats.store(only_target(model), pruned, "compact", model=model)
    assert {p.key: p.value for p in model.metadata_props}[METADATA_KEY] == "compact"
    (final,) = [n for n in model.graph.node if n.doc_string.startswith("onnxprune:compact {")]
    assert final.output[0] == "W"
    formats.densify_model(model)
    assert METADATA_KEY not in {p.key for p in model.metadata_props}
    assert [n.op_type for n in model.graph.node] == ["Cast", "MatMul"]
    assert not model.graph.value_info


def _compact_matmul_model() -> onnx.ModelProto:
    """A MatMul whose weight (90 % pruned) is stored compact: a rebuild to fold."""
    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    model = matmul_model(pruned)
    formats.store(only_target(model), pruned, "compact", model=model)
    return model


def test_folding_check_sees_unfolded_rebuilds():
    model = _compact_matmul_model()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert formats.unfolded_rebuild_nodes(model, options)
    assert formats.unfolded_rebuild_nodes(model) == []


def test_densify_reads_foreign_sparse_tensors():
    """Sparse tensors onnxprune did not write: [nnz, rank] coordinates, int64 data field."""
    weight = np.zeros((4, 3), np.float32)
    weight[1, 2], weight[3, 0] = 2.5, -1.0
    values = numpy_helper.from_array(np.array([2.5, -1.0], np.float32), "W")
    indices = helper.make_tensor("", TensorProto.INT64, [2, 2], [1, 2, 3, 0])
    model = matmul_model(np.zeros((4, 3), np.float32))
    del model.graph.initializer[:]
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4, 3]))
    onnx.checker.check_model(model)
    infos = formats.stored_formats(model)
    assert infos["W"].format == "sparse" and infos["W"].nnz == 2
    assert formats.densify_model(model) == 1
    assert same_bits(numpy_helper.to_array(model.graph.initializer[0]), weight)


def test_densify_leaves_a_dense_model_alone():
    model = matmul_model(np.ones((8, 4), np.float32))
    before = model.SerializeToString()
    assert formats.densify_model(model) == 0
    assert model.SerializeToString() == before


def test_prune_warns_when_compact_tensors_are_slow_to_start(monkeypatch, caplog):
    """Bitmask and N:M rebuilds write several times the tensor at session start; gap codes
    of sparse tensors do not, and tiny tensors are not worth a warning."""
    from onnxprune import api

    rng = np.random.default_rng(0)
    weight = random_weights((256, 128), np.float32, rng)
    monkeypatch.setattr(api, "SLOW_START_PARAMS", weight.size)
    messages = {}
    for sparsity in (0.5, 0.97):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnxprune.api"):
            _, report = api.prune(matmul_model(weight), sparsity=sparsity, format="compact")
        messages[sparsity] = [r.getMessage() for r in caplog.records]
        assert report.targets[0].format == ("compact-bitmask" if sparsity == 0.5
                                            else "compact-gaps")
    assert len(messages[0.5]) == 1 and "rebuilt by onnxruntime at session start" in \
        messages[0.5][0] and "32,768 parameters" in messages[0.5][0]
    assert messages[0.97] == []
    monkeypatch.setattr(api, "SLOW_START_PARAMS", weight.size + 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxprune.api"):
        api.prune(matmul_model(weight), sparsity=0.5, format="compact")
    assert caplog.records == []


# --- no unused initializer, caller's options untouched, chained errors (issue #17) ------------

def unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers of any graph that no node reads (subgraph nodes included) and no graph
    returns: onnxruntime removes each with a warning at every load."""
    graphs = [graph for graph, _ in walk_graphs(model.graph)]
    read = {name for graph in graphs for node in graph.node for name in node.input}
    read |= {output.name for graph in graphs for output in graph.output}
    return sorted(t.name for graph in graphs for t in graph.initializer if t.name not in read)


def compact_meta(model: onnx.ModelProto) -> list[dict]:
    return [compact.parse_meta(node.doc_string) for graph, _ in walk_graphs(model.graph)
            for node in graph.node if compact.parse_meta(node.doc_string)]


# (form as chosen, forms passed to store, sparsity or N:M, load slack): one case per form
FORM_CASES = {
    "zeros": (("zeros",), "1.0", None),
    "gaps": (("gaps",), "0.95", 0.0),  # packed bit planes
    "aligned-gaps": (("gaps",), "0.9", 1.0),
    "bitmask": (("bitmask",), "0.5", None),
    "nm": (("nm",), "2:4", None),
}


def form_name(meta: dict) -> str:
    kind = meta["format"].removeprefix("compact-")
    return "aligned-gaps" if kind == "gaps" and meta.get("codes") == "aligned" else kind


@pytest.mark.parametrize("chunk", [256, 1 << 20])
@pytest.mark.parametrize("layout", ["matmul", "gemm", "constant", "conv"])
@pytest.mark.parametrize("form", sorted(FORM_CASES))
def test_store_leaves_no_unused_initializer(form, layout, chunk):
    forms, level, slack = FORM_CASES[form]
    pattern = Pattern.parse(level) if ":" in level else Pattern()
    rng = np.random.default_rng(0)
    if layout == "conv":  # [O, I, kh, kw], N:M along axis 1: the rebuild transposes back
        weight = random_weights((16, 32, 3, 3), np.float32, rng)
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "W"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 3, 3])],
            [make_tensor("W", weight, doc="")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        axis = 1
    else:
        weight = random_weights((64, 32), np.float32, rng)
        model = constant_model(weight) if layout == "constant" else matmul_model(weight, layout)
        axis = 1 if layout == "gemm" else 0
    pruned = np.zeros_like(weight) if level == "1.0" else \
        prune(weight, 0.0 if pattern.is_nm else float(level), pattern, axis, rng)
    with chunk_elements(chunk, slack):
        result = formats.store(only_target(model, pattern), pruned, "compact", pattern,
                               model=model, forms=forms)
    assert result.format == "compact-" + forms[0]
    (meta,) = compact_meta(model)
    assert form_name(meta) == form
    assert (len(meta["chunks"]) > 1) == (chunk < weight.size)
    assert unused_initializers(model) == []


def two_layer_model(rng: np.random.Generator, zero_second: bool = False) -> onnx.ModelProto:
    """x @ W1 (MatMul, [512, 256]) then Gemm with transB (W2 [64, 256]), weights large
    enough that a streamed prune writes their payloads to the file as it goes."""
    w1 = random_weights((512, 256), np.float32, rng)
    w2 = np.zeros((64, 256), np.float32) if zero_second else \
        random_weights((64, 256), np.float32, rng)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]),
         helper.make_node("Gemm", ["h", "W2"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 64])],
        [make_tensor("W1", w1, doc=""), make_tensor("W2", w2, doc="")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("form", sorted(FORM_CASES))
def test_pruned_compact_model_has_no_unused_initializer(tmp_path, form, streamed):
    """Through `prune`: in memory (ModelProto in, ModelProto out) and streamed from file to
    file (payloads written to the output as they are made)."""
    import onnxprune

    _, level, slack = FORM_CASES[form]
    model = two_layer_model(np.random.default_rng(0), zero_second=form == "zeros")
    options = dict(format="compact", min_size=1)
    options.update(pattern=level) if ":" in level else \
        options.update(sparsity=0.5 if form == "zeros" else float(level))
    with chunk_elements(1 << 13, slack):
        if streamed:
            source = tmp_path / "in.onnx"
            source.write_bytes(model.SerializeToString())
            onnxprune.prune(str(source), str(tmp_path / "out.onnx"), **options)
            pruned = onnx.load(str(tmp_path / "out.onnx"))
        else:
            pruned, _ = onnxprune.prune(model, **options)
    assert form in {form_name(meta) for meta in compact_meta(pruned)}
    assert all(len(meta["chunks"]) > 1 for meta in compact_meta(pruned))
    assert unused_initializers(pruned) == []
    onnx.checker.check_model(pruned, full_check=True)


def test_onnxruntime_removes_no_initializer_of_a_two_four_transformer(tmp_path, capfd):
    """The issue's report: each compacted weight's `.../k0` was 'not used by any node'."""
    from conftest import MODELS_DIR

    import onnxprune

    out = tmp_path / "t.onnx"
    onnxprune.prune(str(MODELS_DIR / "transformer.onnx"), str(out), pattern="2:4",
                    format="compact")
    assert unused_initializers(onnx.load(str(out))) == []
    options = ort.SessionOptions()
    options.log_severity_level = 1
    capfd.readouterr()
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    captured = capfd.readouterr()
    assert "It is not used by any node" not in captured.err + captured.out


def test_folding_check_leaves_the_callers_options_alone():
    model = _compact_matmul_model()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    assert formats.unfolded_rebuild_nodes(model, options)  # the caller's level is used
    assert options.optimized_model_filepath == ""
    with pytest.raises(Exception, match="does not have configuration"):
        options.get_session_config_entry(
            "session.optimized_model_external_initializers_file_name")
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 1
    # the same options give the same answer twice (no saved path left from the first call)
    assert formats.unfolded_rebuild_nodes(model, options)


def test_undecodable_compact_tensor_keeps_the_underlying_error():
    """One line for the user; `-v` (the traceback) shows what failed underneath."""
    from onnxprune.errors import ModelLoadError

    rng = np.random.default_rng(0)
    pruned = prune(random_weights((64, 16), np.float32, rng), 0.9, Pattern(), 0, rng)
    model = matmul_model(pruned)
    formats.store(only_target(model), pruned, "compact", model=model)
    (values,) = [t for t in model.graph.initializer if t.name.endswith("/values")]
    values.CopyFrom(make_tensor(values.name, np.zeros(3, np.float32), doc=""))
    with pytest.raises(ModelLoadError, match="its stored form cannot be decoded") as caught:
        formats.stored_formats(model)["W"].dense()
    assert isinstance(caught.value.__cause__, (IndexError, ValueError, KeyError))
    assert not caught.value.__suppress_context__ or caught.value.__cause__ is not None


def test_densify_refuses_a_sparse_constant_without_output():
    from onnxprune.errors import OnnxPruneError

    model = constant_model(np.zeros((8, 4), np.float32))
    (constant,) = [n for n in model.graph.node if n.op_type == "Constant"]
    sparse = formats.sparse.make_sparse("W", np.eye(8, 4, dtype=np.float32))
    formats.sparse.set_constant_attribute(constant, helper.make_attribute("sparse_value",
                                                                          sparse))
    del constant.output[:]
    with pytest.raises(OnnxPruneError, match="^node 'the_constant' \\(Constant\\) has no "
                                             "output$"):
        formats.densify_model(model)
