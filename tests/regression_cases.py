"""The regression matrix of prune runs, shared by `tools/record_regression.py` (which records
the outputs) and `tests/test_regression.py` (which checks that they have not changed).

A case is one file-to-file run of the public API `onnxprune.prune(model, output, ...)` for a
model, method, sparsity setting and storage format. Its result is the sha256 of every file
the run wrote, or the refusal (exception class and message) when the run raised an
`OnnxPruneError`. Calibrated runs (wanda, obd, sparsegpt) also keep each target's
reconstruction error, and their dense runs the zero mask of every target, so that a change
of bytes can be judged by what it changed.

Only the public API, onnx and numpy are used, so the same code checks the library before and
after a refactor of its internals.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from conftest import MODELS_DIR, example_feeds, real_model
from onnx import TensorProto, numpy_helper

import onnxprune

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "regression"
HASHES_FILE = FIXTURE_DIR / "hashes.json"
MASKS_FILE = FIXTURE_DIR / "masks.npz"
CALIB_DIR = FIXTURE_DIR / "calib"

DEMO_MODELS = ("mlp", "cnn", "transformer")
FLOAT64_MODEL = "mlp_float64"  # mlp.onnx with every float tensor and IO type made float64
REAL_MODEL_NAMES = ("silero_vad", "ppocr_cls")
MODELS = DEMO_MODELS[:1] + (FLOAT64_MODEL,) + DEMO_MODELS[1:] + REAL_MODEL_NAMES
METHODS = ("magnitude", "random", "wanda", "obd", "sparsegpt")
CALIBRATED = ("wanda", "obd", "sparsegpt")
# sparsegpt prunes stage by stage on the already pruned model by default; wanda and obd
# score every target on the dense model in one pass
SEQUENTIAL = ("sparsegpt",)
SETTINGS: dict[str, dict] = {
    "50%": {"sparsity": 0.5},
    "global": {"sparsity": 0.5, "scope": "global"},
    "2:4": {"pattern": "2:4"},
}
FORMATS = ("dense", "sparse", "compact")
SEED = 0
CALIB_SAMPLES = 4
OUTPUT_NAME = "pruned.onnx"


class Case(NamedTuple):
    """One run of the matrix."""

    model: str
    method: str
    setting: str
    format: str

    @property
    def key(self) -> str:
        return "|".join(self)

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED

    def mask_key(self, target: str) -> str:
        """Key in MASKS_FILE of a target's zero mask: masks come from the dense run of the
        same model, method and setting, and stand for every format."""
        return f"{self.model}|{self.method}|{self.setting}|{target}"


def all_cases() -> list[Case]:
    """The full matrix: every model x method x setting x format."""
    return [Case(*values) for values in itertools.product(MODELS, METHODS, SETTINGS, FORMATS)]


def default_cases() -> list[Case]:
    """A subset for every test run: each model, method, setting and format at least once.

    Every calibrated dense run is kept (they carry the masks and errors the declared
    exceptions need) and, per model, one run of every method x setting cycles through the
    formats; the global refusals of calibrated methods stay in once per method.
    """
    chosen: list[Case] = []
    for model in MODELS:
        rotation = itertools.cycle(FORMATS[MODELS.index(model) % len(FORMATS):] +
                                   FORMATS[:MODELS.index(model) % len(FORMATS)])
        for method, setting in itertools.product(METHODS, SETTINGS):
            if method in CALIBRATED and setting == "global":
                if model == MODELS[0]:
                    chosen.append(Case(model, method, setting, "dense"))
                continue
            fmt = "dense" if method in CALIBRATED else next(rotation)
            chosen.append(Case(model, method, setting, fmt))
    return chosen


# --------------------------------------------------------------------------- models

def float64_model(source: Path, destination: Path) -> Path:
    """Write `source` with every float32 initializer, Constant and IO type made float64."""
    model = onnx.load(str(source))
    graph = model.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                array = numpy_helper.to_array(attr.t).astype(np.float64)
                attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
    for value in itertools.chain(graph.input, graph.output, graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    onnx.checker.check_model(model, full_check=True)
    destination.write_bytes(model.SerializeToString(deterministic=True))
    return destination


def model_path(name: str, build_dir: Path) -> Path:
    """Path of a matrix model; the float64 mlp is built into `build_dir` on first use.

    A real model whose wheel is missing skips the calling test (`conftest.real_model`).
    """
    if name in DEMO_MODELS:
        return MODELS_DIR / f"{name}.onnx"
    if name == FLOAT64_MODEL:
        path = build_dir / f"{FLOAT64_MODEL}.onnx"
        return path if path.is_file() else float64_model(MODELS_DIR / "mlp.onnx", path)
    return real_model(name)


# --------------------------------------------------------------------------- calibration

def calibration_arrays(path: Path) -> dict[str, np.ndarray]:
    """CALIB_SAMPLES seeded samples stacked on a new first axis, keyed by graph input name."""
    samples = [example_feeds(path, seed=seed) for seed in range(CALIB_SAMPLES)]
    return {name: np.stack([sample[name] for sample in samples]) for name in samples[0]}


def calibration_path(name: str) -> Path:
    return CALIB_DIR / f"{name}.npz"


def write_calibration(name: str, path: Path) -> bool:
    """Write the model's calibration npz unless one with the same arrays is there already.

    Returns whether a file was written (an npz archive carries timestamps: rewriting equal
    arrays would change the committed bytes for nothing).
    """
    arrays = calibration_arrays(path)
    target = calibration_path(name)
    if target.is_file():
        with np.load(target) as stored:
            if set(stored.files) == set(arrays) and all(
                    stored[key].dtype == arrays[key].dtype
                    and np.array_equal(stored[key], arrays[key]) for key in arrays):
                return False
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    target.write_bytes(buffer.getvalue())
    return True


# --------------------------------------------------------------------------- runs

class RunResult(NamedTuple):
    """What the fixture keeps of a run, the zero masks of a calibrated dense run, and what
    the run left to look at (None for a refused run)."""

    record: dict
    masks: dict[str, np.ndarray]  # target name -> packed bits of (weights == 0)
    output: Path | None = None
    report: object = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prune_options(case: Case) -> dict:
    options = dict(SETTINGS[case.setting], method=case.method, format=case.format, seed=SEED)
    if case.calibrated:
        options["calib"] = str(calibration_path(case.model))
    return options


def run_case(case: Case, source: Path, work_dir: Path) -> RunResult:
    """Run one case into a fresh folder under `work_dir`."""
    out_dir = Path(tempfile.mkdtemp(dir=work_dir))
    output = out_dir / OUTPUT_NAME
    try:
        _, report = onnxprune.prune(source, output, **prune_options(case))
    except onnxprune.OnnxPruneError as exc:
        message = str(exc)
        # paths differ between checkouts and runs: keep the message, not where things lay
        for path, placeholder in ((source, "<model>"), (out_dir, "<out>"), (CALIB_DIR, "<calib>")):
            message = message.replace(str(path), placeholder)
        return RunResult({"refused": f"{type(exc).__name__}: {message}"}, {})
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    record: dict = {"sha256": sha256_file(output)}
    external = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in files if p != output}
    if external:
        record["external"] = external
    masks: dict[str, np.ndarray] = {}
    if case.calibrated:
        record["reconstruction_error"] = {t.name: t.reconstruction_error for t in report.targets}
        if case.format == "dense":
            weights = target_weights(output, [t.name for t in report.targets])
            masks = {name: np.packbits(array == 0) for name, array in weights.items()}
    return RunResult(record, masks, output, report)


# --------------------------------------------------------------------------- weights

def _stored_tensors(graph: onnx.GraphProto) -> Iterator[tuple[str, TensorProto]]:
    """(name, tensor) of every initializer and Constant value, subgraphs included."""
    for tensor in graph.initializer:
        yield tensor.name, tensor
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and \
                    attr.type == onnx.AttributeProto.TENSOR:
                yield node.output[0], attr.t
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _stored_tensors(attr.g)
            for sub in attr.graphs:
                yield from _stored_tensors(sub)


def target_weights(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The dense arrays named `names` (report target names) in the model at `path`."""
    model = onnx.load(str(path), load_external_data=True)
    found: dict[str, list[TensorProto]] = {}
    for name, tensor in _stored_tensors(model.graph):
        if name in names:
            found.setdefault(name, []).append(tensor)
    arrays = {}
    for name in names:
        tensors = found.get(name, [])
        if len(tensors) != 1:
            raise LookupError(f"{path}: {len(tensors)} stored tensors named {name!r}, need 1")
        arrays[name] = numpy_helper.to_array(tensors[0])
    return arrays


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(packed, count=size).astype(bool).reshape(shape)
