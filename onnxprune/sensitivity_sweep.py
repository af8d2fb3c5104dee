"""Sensitivity analysis: how much the model's final outputs degrade when one target is pruned.

For each target alone, sparsity is swept over `levels` with the chosen method and pattern,
and the model's outputs in onnxruntime are compared with the dense model's on the
calibration (or synthetic) inputs: relative L2, cosine and, for outputs that look like class
scores, top-1 agreement. What can be shared is: the dense outputs are computed once, the
layer-input statistics once (one pass over the dense model), and each target gets one
session in which its weight is a graph input, so every sweep point is a run, not a session.

The curves (JSON) drive `--allocation sensitivity`; `plot` draws them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from .config import PruneConfig
from .errors import ConfigError, NothingToPruneError, OnnxPruneError
from .graph import StoredTensor
from .graph_suffix import SuffixPlan, suffix_model
from .inputs import Feed
from .io import LoadedModel, read_array, write_array
from .plan import TargetPlan
from .targets import WeightTarget, read_weights, stored_values

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
FORMAT_VERSION = 1
LABELLED = 5  # the most sensitive curves named in the plot

class Swept(Protocol):
    """What a sweep point is about: a target, or with --structure a channel group."""

    @property
    def name(self) -> str: ...


# called after each sweep point with the target (or group), the level and the number of
# points
SweepProgress = Callable[[Swept, float, int], None]


class PlotUnavailable(OnnxPruneError):
    """matplotlib is missing: the curves are written, the picture is not."""


@dataclass
class SweepPoint:
    """The model's outputs with one target pruned to `sparsity` (`achieved`: zeros / size)."""

    sparsity: float
    achieved: float
    relative_l2: float
    cosine: float
    top1: float | None = None


@dataclass
class TargetCurve:
    name: str
    op_type: str
    shape: list[int]
    numel: int
    points: list[SweepPoint] = field(default_factory=list)
    note: str = ""

    def error_at(self, sparsity: float) -> float:
        """Relative L2 at `sparsity`, linear between the swept points and from (0, 0);
        held at the last point beyond it."""
        xs = [0.0] + [p.sparsity for p in self.points]
        ys = [0.0] + [p.relative_l2 for p in self.points]
        return float(np.interp(sparsity, xs, ys))

    @property
    def worst(self) -> float:
        """Relative L2 at the highest level: how the curves are ranked."""
        return self.points[-1].relative_l2 if self.points else 0.0


@dataclass
class SensitivityResult:
    """The curves of every target, and how they were measured."""

    model: str
    method: str
    pattern: str
    levels: list[float]
    samples: int
    synthetic: bool
    targets: list[TargetCurve]
    # "" for per-target curves; with `--structure S`, S: the curves are of channel groups
    # (a curve's name is the group's, its sparsity the share of its channels removed) and
    # `round_to` the rounding of their kept counts
    structure: str = ""
    round_to: int | None = None

    def most_sensitive(self, count: int = LABELLED) -> list[TargetCurve]:
        return sorted(self.targets, key=lambda c: -c.worst)[:count]

    def curve(self, name: str) -> TargetCurve | None:
        return next((c for c in self.targets if c.name == name), None)

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=True)

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityResult:
        targets = [TargetCurve(t["name"], t.get("op_type", ""), list(t.get("shape", [])),
                               int(t.get("numel", 0)),
                               [SweepPoint(**p) for p in t["points"]], t.get("note", ""))
                   for t in data["targets"]]
        return cls(data.get("model", ""), data.get("method", ""), data.get("pattern", ""),
                   list(data.get("levels", [])), int(data.get("samples", 0)),
                   bool(data.get("synthetic", False)), targets,
                   str(data.get("structure", "") or ""), data.get("round_to"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityResult:
        """Curves written by `onnxprune sensitivity`; a `ConfigError` naming what is wrong."""
        try:
            data = json.loads(Path(path).read_text())
            return cls.from_dict(data)
        except OSError as exc:
            raise ConfigError(f"--sensitivity {path}: cannot read ({exc.strerror or exc})"
                              ) from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--sensitivity {path}: not a sensitivity JSON "
                              f"({type(exc).__name__}: {exc})") from exc


def load_curves(path: str | os.PathLike, structure: str) -> SensitivityResult:
    """Curves written by `onnxprune sensitivity` for a prune of `structure` ("none": per
    target; else channel groups); a `ConfigError` when they are of the other kind."""
    result = SensitivityResult.load(path)
    if structure == "none" and result.structure:
        raise ConfigError(f"--sensitivity {path}: the curves are of channel groups "
                          f"(--structure {result.structure}); an unstructured prune needs "
                          "per-target curves")
    if structure != "none" and not result.structure:
        raise ConfigError(f"--sensitivity {path}: the curves are per target; a structured "
                          f"prune needs `onnxprune sensitivity --structure {structure}`")
    return result


def check_levels(levels: Sequence[float]) -> list[float]:
    """Sorted distinct sweep levels, each in (0, 1)."""
    values = sorted({float(v) for v in levels})
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise ConfigError(f"sensitivity levels must lie in (0, 1), got {list(levels)}")
    return values


def analyze(loaded: LoadedModel, config: PruneConfig, *,
            levels: Sequence[float] = DEFAULT_LEVELS, feeds: Sequence[Feed] | None = None,
            progress: SweepProgress | None = None,
            only: Collection[str] | None = None) -> SensitivityResult:
    """The sensitivity curve of every target of `loaded` selected by `config` (its method,
    pattern, selection, calibration); the model is left as it was. With an N:M pattern each
    target has one point, the pattern's own sparsity. `only`: the targets of these names
    (a worker's share of a sweep spread over several)."""
    from .calib import calibration_feeds
    from .pipeline import selection_of
    from .registry import METHODS
    from .targets import discover_targets

    levels = [config.pattern.sparsity] if config.pattern.is_nm else check_levels(levels)
    targets, skipped = discover_targets(loaded.proto, selection_of(config))
    if not targets:
        raise NothingToPruneError(f"nothing to analyse: no tensor qualified as a target "
                                  f"({len(skipped)} skipped; run `onnxprune inspect`)")
    if only is not None:
        targets = [t for t in targets if t.name in only]
    synthetic = feeds is None and config.calib is None
    if feeds is None:
        feeds = calibration_feeds(config, loaded.proto)
    method = METHODS.build(config.method, config.options)
    statistics = {}
    if method.needs or method.reconstructs:
        from .calib.one_pass import dense_statistics
        from .methods import Needs

        statistics = dense_statistics(loaded, targets, feeds,
                                      hessian=method.needs >= Needs.HESSIAN)
    sweep = OutputSweep(loaded, feeds)
    curves = []
    for target in targets:
        entry = statistics.get(target.name)
        note = entry if isinstance(entry, str) else ""
        view, stats = entry if isinstance(entry, tuple) else (None, None)
        target_method = method
        if (method.needs or method.reconstructs) and view is None:
            target_method = METHODS.build("magnitude")
            note = f"{note}; swept by magnitude"
            log.warning("%s: cannot calibrate (%s); swept by magnitude", target.name, entry)
        curve = TargetCurve(target.name, target.op_type, list(target.shape), target.numel,
                            note=note)
        grid = target.quant.grid(loaded.base_dir) if target.quant is not None else None
        dense = read_weights(target, loaded.base_dir, grid=grid)
        shared: dict = {}
        with sweep.for_target(target) as run:
            for level in levels:
                pruned = _prune_one(target, dense, level, config, target_method, view, stats,
                                    shared, grid)
                zeros = int(pruned.size - np.count_nonzero(pruned))
                stored = stored_values(target, pruned, loaded.base_dir, grid)
                curve.points.append(SweepPoint(level, zeros / target.numel if target.numel
                                               else 0.0, *run({target.tensor_name: stored})))
                if progress:
                    progress(target, level, len(targets) * len(levels))
        curves.append(curve)
    name = loaded.path.name if loaded.path is not None else (loaded.proto.graph.name or "")
    return SensitivityResult(name, config.method, str(config.pattern), list(levels), len(feeds),
                             synthetic, curves)


def _prune_one(target: WeightTarget, dense: np.ndarray, level: float, config: PruneConfig,
               method, view, stats, shared: dict, grid=None) -> np.ndarray:
    """The target's weights pruned to `level` alone, as the pipeline would prune them (on a
    quantized weight's `grid`: rebuilt values rounded onto it)."""
    from .methods import Job
    from .pipeline import keep_mask

    plan = TargetPlan(target.name, level, config.pattern, method.name)
    job = Job(target, dense, plan, config.seed, view, stats, shared=shared, config=config,
              grid=grid)
    if method.reconstructs:
        rebuilt = method.reconstruct(job)
        return rebuilt if grid is None else grid.round(rebuilt)
    return np.where(keep_mask(job, method), dense, np.zeros((), dense.dtype))


class OutputSweep:
    """Runs the model with some of its weights replaced, against the dense outputs."""

    def __init__(self, loaded: LoadedModel, feeds: Sequence[Feed]):
        from .runtime import session_options

        self.loaded = loaded
        self.feeds = list(feeds)
        folder = loaded.base_dir if loaded.uses_external_data or loaded.lazy else None
        self.options = session_options(data_folder=folder)
        session = self.session_of(loaded.proto.SerializeToString())
        self.reference = [self._outputs(session, feed) for feed in self.feeds]

    def session_of(self, data: bytes):
        """A session of a serialized model (with the sweep's options); a one-line error if
        onnxruntime cannot load it."""
        from .errors import ModelLoadError
        from .runtime import create_session, first_line

        try:
            return create_session(data, self.options)
        except Exception as exc:  # onnxruntime raises its own unrelated types
            raise ModelLoadError(f"onnxruntime cannot load the model ({first_line(exc)})"
                                 ) from exc

    @staticmethod
    def _outputs(session, feed: Feed) -> list[np.ndarray]:
        return [np.asarray(v) for v in OutputSweep._run(session, feed).values()]

    @staticmethod
    def outputs_named(session, feed: Feed, names: Sequence[str]) -> list[np.ndarray]:
        values = OutputSweep._run(session, feed)
        return [np.asarray(values[name]) for name in names]

    @staticmethod
    def _run(session, feed: Feed) -> dict:
        from .errors import CalibrationError
        from .inputs import describe_feed
        from .runtime import first_line, run_session

        try:
            return run_session(session, feed)
        except Exception as exc:  # onnxruntime raises its own unrelated types
            raise CalibrationError(f"onnxruntime cannot run the model on the sweep's inputs "
                                   f"({describe_feed(feed)}: {first_line(exc)}); give --calib, "
                                   "or the sizes with --dim or --input-shapes") from exc

    def error_of(self, model: onnx.ModelProto) -> tuple[float, float, float | None]:
        """(relative L2, cosine, top-1) of another model (same inputs and outputs)."""
        session = self.session_of(model.SerializeToString())
        return self.compare([self._outputs(session, feed) for feed in self.feeds])

    def for_target(self, target: WeightTarget) -> _TensorRuns:
        main = target.graph is self.loaded.proto.graph and target.source == "initializer"
        return _TensorRuns(self, [Replaced(target.tensor_name, target.stored_tensor, main)])

    def for_tensors(self, tensors: Sequence[Replaced],
                    suffix: tuple[SuffixPlan, list[Feed]] | None = None) -> _TensorRuns:
        """Runs with `tensors` replaced; with `suffix` (a plan and its cut values per feed,
        `graph_suffix`) only the part of the model after the cut runs."""
        return _TensorRuns(self, tensors, suffix)

    def compare(self, outputs: list[list[np.ndarray]]) -> tuple[float, float, float | None]:
        """(relative L2, cosine, top-1 agreement or None) of `outputs` against the dense ones,
        over every float output and sample together."""
        diff = ref = cand = dot = 0.0
        hits = rows = 0
        for reference, candidate in zip(self.reference, outputs, strict=True):
            for a, b in zip(reference, candidate, strict=True):
                if a.dtype.kind != "f" or a.shape != b.shape:
                    continue
                x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
                delta = x - y
                diff += float(delta @ delta)
                ref += float(x @ x)
                cand += float(y @ y)
                dot += float(x @ y)
                if 2 <= a.ndim <= 3 and a.shape[-1] >= 2:
                    last = a.shape[-1]
                    same = (np.argmax(a.reshape(-1, last), axis=-1)
                            == np.argmax(b.reshape(-1, last), axis=-1))
                    hits += int(same.sum())
                    rows += same.size
        relative = math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)
        cosine = dot / math.sqrt(ref * cand) if ref > 0 and cand > 0 else \
            (1.0 if ref == cand else 0.0)
        return relative, cosine, (hits / rows if rows else None)


@dataclass(frozen=True)
class Replaced:
    """A stored tensor a sweep point replaces; `main`: a main-graph initializer (which can
    be fed as a graph input instead of rewritten)."""

    name: str
    tensor: onnx.TensorProto
    main: bool

    @classmethod
    def of(cls, stored: StoredTensor) -> Replaced:
        return cls(stored.name, stored.tensor,
                   stored.kind == "initializer" and stored.scope.is_main)


class _TensorRuns:
    """A context giving ``run({name: values}) -> (relative L2, cosine, top-1)`` for a few
    stored tensors replaced at once: where all are main-graph initializers they are graph
    inputs of one session, else they are written into the model and a session is made per
    point (put back after)."""

    def __init__(self, sweep: OutputSweep, tensors: Sequence[Replaced],
                 suffix: tuple[SuffixPlan, list[Feed]] | None = None):
        self.sweep = sweep
        self.tensors = {stored.name: stored for stored in tensors}
        self.session = None
        self.originals: dict[str, np.ndarray] = {}
        self.suffix = suffix
        self.feeds = sweep.feeds if suffix is None else suffix[1]

    def __enter__(self):
        proto = self.sweep.loaded.proto
        if proto.ir_version >= 4 and all(t.main for t in self.tensors.values()):
            if self.suffix is not None:
                plan, cut = self.suffix
                proto = suffix_model(proto, plan, cut[0])
            self.session = self.sweep.session_of(_with_inputs(proto, list(self.tensors.values())))
        else:  # a Constant node or a subgraph's tensor: rewritten per point, put back after
            self.feeds = self.sweep.feeds  # in the whole model
            self.originals = {name: read_array(t.tensor, self.sweep.loaded.base_dir).copy()
                              for name, t in self.tensors.items()}
        return self.run

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            write_array(self.tensors[name].tensor, original)
        self.session = None

    def run(self, values: Mapping[str, np.ndarray]) -> tuple[float, float, float | None]:
        arrays = {name: np.ascontiguousarray(array) for name, array in values.items()}
        extra: dict[str, np.ndarray]  # the weights fed as inputs, or none
        if self.session is not None:
            session, extra = self.session, arrays
        else:  # the model holds its own values again once the session has read it
            for name, array in arrays.items():
                write_array(self.tensors[name].tensor, array)
            data = self.sweep.loaded.proto.SerializeToString()
            for name, original in self.originals.items():
                write_array(self.tensors[name].tensor, original)
            session, extra = self.sweep.session_of(data), {}
        outputs = [self.sweep._outputs(session, {**feed, **extra}) for feed in self.feeds]
        return self.sweep.compare(outputs)


def _with_inputs(proto: onnx.ModelProto, tensors: Sequence[Replaced]) -> bytes:
    """The serialized model with the given main-graph initializers also listed as graph
    inputs: an initializer that is a graph input is a default the run's feed overrides
    (ONNX IR >= 4). The proto is left as it was (the initializers are not touched)."""
    graph = proto.graph
    listed = {i.name for i in graph.input}
    added = 0
    for stored in tensors:
        if stored.name not in listed:
            graph.input.append(helper.make_tensor_value_info(
                stored.name, stored.tensor.data_type, list(stored.tensor.dims)))
            added += 1
    try:
        return proto.SerializeToString()
    finally:
        for _ in range(added):
            del graph.input[len(graph.input) - 1]


def plot(result: SensitivityResult, path: str | os.PathLike, labelled: int = LABELLED) -> None:
    """One curve per target (relative L2 of the outputs vs the target's sparsity); the
    `labelled` most sensitive are coloured and named, the rest drawn grey."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("the sensitivity plot needs matplotlib: pip install "
                              "'onnxprune[plot]' (the JSON curves were written)") from exc
    named = {c.name for c in result.most_sensitive(labelled)}
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    for curve in result.targets:
        xs = [p.sparsity for p in curve.points]
        ys = [p.relative_l2 for p in curve.points]
        if curve.name in named:
            continue
        axes.plot(xs, ys, color="0.75", linewidth=0.8, zorder=1)
    for curve in result.most_sensitive(labelled):
        xs = [p.sparsity for p in curve.points]
        ys = [p.relative_l2 for p in curve.points]
        axes.plot(xs, ys, marker="o", markersize=3, linewidth=1.6, zorder=2,
                  label=f"{_short(curve.name)} {curve.shape}")
    axes.set_yscale("log")
    axes.set_xlabel("share of channels removed from the one pruned group" if result.structure
                    else "sparsity of the one pruned target")
    axes.set_ylabel("relative L2 error of the model outputs")
    source = "synthetic inputs" if result.synthetic else "calibration data"
    what = (f"groups of --structure {result.structure}, {result.method}" if result.structure
            else f"targets, {result.method} {result.pattern}")
    axes.set_title(f"{result.model}: {len(result.targets)} {what}, {result.samples} samples "
                   f"({source})", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title=f"most sensitive {len(named)} (others grey)", fontsize=8,
                title_fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _short(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]
