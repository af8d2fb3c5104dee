"""End to end: prune the demo models and real exports, check the properties promised.

Every target gets exactly the requested sparsity (layer scope) or the total is exact
(global scope); N:M groups along the reported axis hold at most N non-zeros; kept values are
bit-identical; the output passes onnx.checker and runs in onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_MODEL_NAMES, MODELS_DIR, REAL_MODELS, example_feeds, real_model

import onnxprune
from onnxprune.config import Pattern
from onnxprune.io import load_model, read_array
from onnxprune.patterns import prune_count
from onnxprune.targets import Selection, discover_targets

MODEL_CASES = [
    pytest.param(("demo", name), id=name.removesuffix(".onnx")) for name in DEMO_MODEL_NAMES
]
# PicoDet runs on 800x608 images: its cases take seconds each
MODEL_CASES += [pytest.param(("real", name), id=name,
                             marks=[pytest.mark.slow] if name == "picodet_layout" else [])
                for name in sorted(REAL_MODELS)]


def _path(case):
    kind, name = case
    return MODELS_DIR / name if kind == "demo" else real_model(name)


def _weights_by_name(path, pattern: Pattern | None = None):
    loaded = load_model(path)
    targets, _ = discover_targets(loaded.proto, Selection(pattern=pattern or Pattern()))
    return {t.name: (t, np.array(read_array(t.tensor, loaded.base_dir))) for t in targets}


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(f"u{array.dtype.itemsize}")


def _check_kept_bit_identical(before: np.ndarray, after: np.ndarray) -> None:
    kept = _bits(after) != 0
    assert np.array_equal(_bits(after)[kept], _bits(before)[kept])
    # everything not kept is exactly zero (+0.0 bits)
    assert not _bits(after)[~kept].any()


def _check_runs(model_path, reference_path):
    model = onnx.load(str(model_path))
    reference = onnx.load(str(reference_path))
    try:
        onnx.checker.check_model(reference, full_check=True)
        reference_full = True
    except Exception:
        reference_full = False
    onnx.checker.check_model(model, full_check=reference_full)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, example_feeds(model_path))
    assert all(np.all(np.isfinite(o)) for o in outputs if o.dtype.kind == "f")
    return outputs


@pytest.mark.parametrize("case", MODEL_CASES)
def test_layer_scope_exact_sparsity(case, tmp_path):
    source = _path(case)
    out = tmp_path / source.name
    _, report = onnxprune.prune(source, out, sparsity=0.5)
    before = _weights_by_name(source)
    after = _weights_by_name(out)
    assert report.targets and set(after) == set(before) == {t.name for t in report.targets}
    for entry in report.targets:
        target, original = before[entry.name]
        pruned = after[entry.name][1]
        zeros = int(np.count_nonzero(pruned == 0))
        assert zeros == prune_count(target.numel, 0.5) == entry.zeros, entry.name
        _check_kept_bit_identical(original, pruned)
        # magnitude: nothing kept is smaller than anything pruned
        kept = np.abs(original[pruned != 0].astype(np.float64))
        removed = np.abs(original[pruned == 0].astype(np.float64))
        assert kept.min() >= removed.max()
    _check_runs(out, source)


@pytest.mark.slow
@pytest.mark.parametrize("case", MODEL_CASES)
def test_global_scope_exact_total(case, tmp_path):
    source = _path(case)
    out = tmp_path / source.name
    _, report = onnxprune.prune(source, out, sparsity=0.5, scope="global")
    before = _weights_by_name(source)
    after = _weights_by_name(out)
    total = sum(t.numel for t, _ in before.values())
    zeros = sum(int(np.count_nonzero(w == 0)) for _, w in after.values())
    assert zeros == prune_count(total, 0.5) == report.summary.zeros
    kept_min = min(
        np.abs(before[n][1][w != 0].astype(np.float64)).min()
        for n, (_, w) in after.items()
        if np.any(w != 0)
    )
    removed_max = max(
        np.abs(before[n][1][w == 0].astype(np.float64)).max()
        for n, (_, w) in after.items()
        if np.any(w == 0)
    )
    assert kept_min >= removed_max  # one threshold over the whole model
    for name, (_, pruned) in after.items():
        _check_kept_bit_identical(before[name][1], pruned)
    _check_runs(out, source)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("case", MODEL_CASES)
def test_nm_pattern_along_reported_axis(case, pattern, tmp_path):
    source = _path(case)
    out = tmp_path / source.name
    parsed = Pattern.parse(pattern)
    _, report = onnxprune.prune(source, out, pattern=pattern)
    before = _weights_by_name(source, parsed)
    after = _weights_by_name(out, parsed)
    assert report.targets
    for entry in report.targets:
        target, original = before[entry.name]
        pruned = after[entry.name][1]
        assert entry.axis == target.reduction_axis
        groups = np.moveaxis(pruned, entry.axis, -1).reshape(-1, parsed.m)
        nonzero = np.count_nonzero(groups, axis=1)
        assert nonzero.max() <= parsed.n, entry.name
        original_groups = np.moveaxis(original, entry.axis, -1).reshape(-1, parsed.m)
        # exactly N survive in each group that had at least N non-zeros
        full = np.count_nonzero(original_groups, axis=1) >= parsed.n
        assert np.all(nonzero[full] == parsed.n)
        _check_kept_bit_identical(original, pruned)
        if pattern == "2:4":
            assert entry.is_2_4
    _check_runs(out, source)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_zero_sparsity_is_bit_identical(case, tmp_path):
    source = _path(case)
    out = tmp_path / source.name
    onnxprune.prune(source, out, sparsity=0.0)
    for name, (_, original) in _weights_by_name(source).items():
        assert np.array_equal(_bits(_weights_by_name(out)[name][1]), _bits(original))
    feeds = example_feeds(source)
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(ref, got, strict=True):
        assert np.array_equal(a, b)


def test_random_method_is_seeded_and_exact(tmp_path):
    source = MODELS_DIR / "mlp.onnx"
    first, _ = onnxprune.prune(source, sparsity=0.7, method="random", seed=3)
    again, _ = onnxprune.prune(source, sparsity=0.7, method="random", seed=3)
    other, report = onnxprune.prune(source, sparsity=0.7, method="random", seed=4)
    assert first.SerializeToString() == again.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()
    for entry in report.targets:
        assert entry.zeros == prune_count(entry.numel, 0.7)


def test_metadata_opsets_and_doc_strings_survive(tmp_path):
    source = MODELS_DIR / "transformer.onnx"
    out = tmp_path / "t.onnx"
    onnxprune.prune(source, out, sparsity=0.5)
    a, b = onnx.load(str(source)), onnx.load(str(out))
    added = [(p.key, p.value) for p in b.metadata_props if p.key.startswith("onnxprune:")]
    assert added  # the provenance (test_ux.py)
    kept = [(p.key, p.value) for p in b.metadata_props if not p.key.startswith("onnxprune:")]
    assert kept == [(p.key, p.value) for p in a.metadata_props]
    assert a.doc_string == b.doc_string
    assert a.opset_import == b.opset_import and a.ir_version == b.ir_version
    assert a.graph.doc_string == b.graph.doc_string
    assert [n.name for n in a.graph.node] == [n.name for n in b.graph.node]


def test_input_model_proto_not_mutated():
    model = onnx.load(str(MODELS_DIR / "mlp.onnx"))
    before = model.SerializeToString()
    pruned, _ = onnxprune.prune(model, sparsity=0.5)
    assert model.SerializeToString() == before
    assert pruned.SerializeToString() != before


def test_pass_on_model_proto_and_graphsurgeon_graph():
    import onnx_graphsurgeon as gs

    model = onnx.load(str(MODELS_DIR / "cnn.onnx"))
    before = model.SerializeToString()
    result = onnxprune.PrunePass(pattern="2:4")(model)
    assert result.modified and isinstance(result.model, onnx.ModelProto)
    assert model.SerializeToString() == before
    graph = gs.import_onnx(model)
    graph_result = onnxprune.PrunePass(pattern="2:4")(graph)
    assert isinstance(graph_result.model, gs.Graph)
    exported = gs.export_onnx(graph_result.model)
    pruned = {t.name: t for t in discover_targets(exported, Selection())[0]}
    assert pruned and all(
        np.count_nonzero(onnx.numpy_helper.to_array(t.tensor)) * 2 == t.numel
        for t in pruned.values()
    )
    # the graph we passed in still has its dense weights
    original = gs.export_onnx(graph)
    dense = discover_targets(original, Selection())[0]
    assert all(np.count_nonzero(onnx.numpy_helper.to_array(t.tensor)) == t.numel for t in dense)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_weight_dtypes(dtype, tmp_path):
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    onnx_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 96)).astype(np_dtype)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx_type, [2, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx_type, [2, 96])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    pruned, report = onnxprune.prune(model, sparsity=0.25)
    stored = onnx.numpy_helper.to_array(pruned.graph.initializer[0])
    assert stored.dtype == np.dtype(np_dtype)
    assert report.targets[0].zeros == prune_count(weight.size, 0.25)
    _check_kept_bit_identical(weight, stored)
    nm, _ = onnxprune.prune(model, pattern="2:4")
    stored = onnx.numpy_helper.to_array(nm.graph.initializer[0])
    assert np.count_nonzero(stored.reshape(16, 4, 96).astype(np.float32), axis=1).max() == 2
