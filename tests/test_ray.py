"""A local Ray cluster of two worker processes (on loopback): the search, the sensitivity
sweep and a calibration stage's reconstructions spread over it give exactly the outputs of
the serial runs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import numpy_helper

import onnxprune
from onnxprune.config import PruneConfig
from onnxprune.io import load_model
from onnxprune.search import Constraint, search
from onnxprune.search.distributed import sweep_in_workers
from onnxprune.search.space import SearchSpace
from onnxprune.sensitivity_sweep import analyze

ray = pytest.importorskip("ray")
DIGITS = MODELS_DIR / "digits.onnx"
DATA = MODELS_DIR / "digits-test.npz"


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    assert ray.cluster_resources()["CPU"] == 2
    yield
    ray.shutdown()


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_search_on_ray_writes_the_serial_answer(cluster, tmp_path) -> None:
    space = SearchSpace({"method": ["magnitude", "wanda"]}, {}, (0.5, 0.95), 0.01)
    common = dict(space=space, base=PruneConfig(calib=str(DATA), calib_samples=200),
                  constraint=Constraint(min_top1=0.97), data=str(DATA))
    serial = search(DIGITS, tmp_path / "serial.onnx", workers=1, **common)
    on_ray = search(DIGITS, tmp_path / "ray.onnx", ray_address="local", **common)
    assert on_ray.answers == serial.answers
    assert (tmp_path / "ray.onnx").read_bytes() == (tmp_path / "serial.onnx").read_bytes()
    assert json.loads((tmp_path / "ray.search.json").read_text())["best"]["passed"]


def test_sensitivity_on_ray_gives_the_serial_curves(cluster) -> None:
    config = PruneConfig(method="wanda", min_size=1000)
    path = MODELS_DIR / "transformer.onnx"
    serial = analyze(load_model(path), config, levels=[0.3, 0.6, 0.9])
    spread = sweep_in_workers(str(path), config, [0.3, 0.6, 0.9], workers=2,
                              ray_address="local")
    assert spread.to_dict() == serial.to_dict()


@pytest.mark.parametrize(("model", "method"), [("transformer.onnx", "sparsegpt"),
                                                ("digits.onnx", "admm"),
                                                ("cnn.onnx", "sparsegpt")])
def test_a_stage_rebuilt_on_ray_is_bit_identical_to_the_serial_run(cluster, tmp_path, model,
                                                                   method) -> None:
    source = MODELS_DIR / model
    options = dict(method=method, min_size=500, sparsity=0.6)
    onnxprune.prune(source, tmp_path / "serial.onnx", **options)
    _, report = onnxprune.prune(source, tmp_path / "ray.onnx", ray_address="local", **options)
    serial, spread = _weights(tmp_path / "serial.onnx"), _weights(tmp_path / "ray.onnx")
    assert serial.keys() == spread.keys()
    assert all(np.array_equal(serial[name], spread[name]) for name in serial)
    assert sum(t.zeros for t in report.targets) > 0


def test_sensitivity_on_ray_ships_external_data_and_calibration(cluster, tmp_path) -> None:
    """Workers get the model's external data file and the calibration file through the
    object store (the sweep used to send the model file alone)."""
    model = onnx.load(MODELS_DIR / "digits.onnx")
    path = tmp_path / "digits-ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    config = PruneConfig(method="wanda", min_size=1000, calib=str(DATA), calib_samples=50)
    serial = analyze(load_model(path), config, levels=[0.5, 0.9])
    spread = sweep_in_workers(str(path), config, [0.5, 0.9], workers=2, ray_address="local")
    assert spread.to_dict() == serial.to_dict()


def test_a_quantized_stage_rebuilt_on_ray_from_its_float_reference_is_the_serial_run(
        cluster, tmp_path) -> None:
    """The Ray path starts each quantized target from the same float weights as the serial
    run (--float-reference), and writes the same integers."""
    from test_quantized import _make

    source = _make("qdq-int8-channel", tmp_path)
    options = dict(method="sparsegpt", min_size=100, sparsity=0.6, calib=str(DATA),
                   calib_samples=100, float_reference=str(DIGITS))
    onnxprune.prune(source, tmp_path / "serial.onnx", **options)
    onnxprune.prune(source, tmp_path / "ray.onnx", ray_address="local", **options)
    plain = dict(options, float_reference=None)
    onnxprune.prune(source, tmp_path / "plain.onnx", **plain)
    serial, spread = _weights(tmp_path / "serial.onnx"), _weights(tmp_path / "ray.onnx")
    assert all(np.array_equal(serial[name], spread[name]) for name in serial)
    plain_weights = _weights(tmp_path / "plain.onnx")  # the reference made a difference
    assert any(not np.array_equal(serial[n], plain_weights[n]) for n in serial)
