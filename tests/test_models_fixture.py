"""The test models themselves: demo models are reproducible, valid and runnable; real ones run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import (
    DEMO_DIM_VALUES,
    DEMO_MODEL_NAMES,
    DEMO_SKIPS,
    DEMO_TARGETS,
    MAKE_MODELS,
    REAL_MODELS,
    example_feeds,
    real_model,
)
from onnx import numpy_helper

MIN_SIZE = 4096  # the default --min-size
MAX_DEMO_BYTES = 2 * 1024 * 1024


def _float_tensors(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Float initializers and Constant-node values of one graph, by name."""
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {name: array for name, array in tensors.items() if array.dtype == np.float32}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_make_models_is_reproducible(tmp_path: Path, models_dir: Path) -> None:
    subprocess.run(
        [sys.executable, str(MAKE_MODELS), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(DEMO_MODEL_NAMES)
    for name in DEMO_MODEL_NAMES:
        assert (tmp_path / name).read_bytes() == (models_dir / name).read_bytes(), (
            f"models/{name} differs from what tools/make_models.py builds; rerun it"
        )


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_demo_model_is_valid(models_dir: Path, name: str) -> None:
    path = models_dir / name
    assert path.stat().st_size < MAX_DEMO_BYTES
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.doc_string and model.graph.doc_string
    props = {p.key: p.value for p in model.metadata_props}
    assert props["onnxprune.demo_model"] == name.removesuffix(".onnx")


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_demo_model_targets_and_skips_are_as_documented(models_dir: Path, name: str) -> None:
    tensors = _float_tensors(onnx.load(str(models_dir / name)).graph)
    targets, skips = DEMO_TARGETS[name], DEMO_SKIPS[name]
    for tensor_name, reduction_axis in targets.items():
        array = tensors[tensor_name]
        assert array.size >= MIN_SIZE, tensor_name
        assert array.shape[reduction_axis] % 8 == 0, (tensor_name, array.shape)
    assert set(skips) <= set(tensors)
    # Every other float tensor is a bias or norm parameter: 1-D and small.
    for tensor_name, array in tensors.items():
        if tensor_name not in targets and tensor_name not in skips:
            assert array.ndim <= 1 and array.size < MIN_SIZE, tensor_name


@pytest.mark.parametrize("name", DEMO_MODEL_NAMES)
def test_demo_model_runs(models_dir: Path, name: str) -> None:
    path = models_dir / name
    feeds = example_feeds(path, seed=0)
    np.testing.assert_equal(feeds, example_feeds(path, seed=0))
    session = _session(path)
    (logits,) = session.run(None, feeds)
    declared = session.get_outputs()[0].shape
    assert list(logits.shape) == [DEMO_DIM_VALUES.get(d, d) for d in declared]
    assert np.isfinite(logits).all() and logits.std() > 0.1


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_runs(name: str) -> None:
    path = real_model(name)
    session = _session(path)
    outputs = session.run(None, example_feeds(path, seed=0))
    assert all(np.isfinite(output).all() for output in outputs)


def test_real_model_rejects_unknown_name() -> None:
    with pytest.raises(KeyError, match="known: "):
        real_model("no_such_model")
