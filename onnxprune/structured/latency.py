"""Latency tables for `--latency-budget`: what each channel group costs in onnxruntime, at
several kept widths, measured on this machine with the model's real shapes.

A group's *region* is the part of the graph its channels run through: the nodes that read
its members (producers, consumers, per-channel ops, the Reshapes and attention ops whose
counts it edits) and every node on a path from one of them to another (activations,
Transpose/Reshape, the attention products between the projections). `region_model`
extracts it as a small ONNX model whose inputs are the values it reads from the rest of the
graph; their shapes and types come from one onnxruntime run of the full model on the
timing feeds (`timing_feeds`: synthetic inputs of the shape `--dim/--input-shapes` give),
which also gives the values of the integer and boolean ones (computed shapes, masks);
float inputs are fed random values of their shape. The region is then shrunk with
`surgery.shrink` (keep = its first w channels) at widths the allocation can choose
(`table_widths`: every eighth of the channels, rounded as `selection.rounded_count` rounds,
and one unit) and each width is timed: all widths of a region in one process, warmed up,
then in interleaved rounds (the order rotating every round), the fastest run per width.
The fastest, not the median: on this 2-core machine with other processes busy, 2/3 of the
runs of a 3x3 Conv of YOLOv8n waited for a core and took 3x as long, and the median of
25 rounds jumped between the two modes from one width to the next (1.7 or 5.8 ms at the
same width), while the fastest run was within 10 % across repeats. On a quiet machine the
two agree. The dense model's latency that the prediction starts from is its fastest run
too; the output is then timed against dense by medians (and fastest runs) as
tools/bench_structured.py times.

Regions of the same structure (op types, attributes, wiring, member and input shapes: a
transformer's identical blocks) share one table, timed once. Tables are cached in a JSON
file per model and machine (CPU model, onnxruntime version, threads) under the cache folder
(`$ONNXPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/onnxprune`, else `~/.cache/onnxprune`), or
in the file `--latency-table` names; a later run reads them and times nothing it finds.

Sessions use the CPU provider with intra-op spinning off: interleaved sessions with
spinning workers steal the cores the next one needs (see tools/bench_structured.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..errors import TimingError
from ..graph import Dataflow, GraphIndex, node_label
from ..inputs import Feed, synthetic_inputs
from ..io import LoadedModel
from ..runtime import create_session, first_line, session_options
from .groups import ChannelGroup, MemberRole
from .selection import rounded_count, unit

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
TABLE_STEPS = 8  # a table measures every 1/TABLE_STEPS of the channels
WARMUP = 2  # runs of every session before timing
ROUNDS = 25  # timed rounds of a table (at least MIN_ROUNDS when slow)
MIN_ROUNDS = 5
TABLE_SECONDS = 5.0  # a table stops after this much timing once it has MIN_ROUNDS
MODEL_ROUNDS = 30  # whole-model timing (dense, and the output against it)
MODEL_SECONDS = 30.0


class LatencyTable:
    """Measured latency (ms) of a region at kept widths, linearly interpolated between them.

    Medians on a busy machine still hold outliers (a width timed while another process took
    a core: 3x its neighbours), and a greedy allocation exploits every one, as a large
    saving for a few channels. So the table used is the measured one with outliers replaced
    by a robust line through all widths (Theil-Sen: median slope; an outlier is off it by
    more than 3 robust standard deviations and 5 % of the median latency), then made never
    to grow when channels are removed (each width takes the least latency of itself and
    every wider one). `latency(w)` for a width between two measured ones interpolates; a
    width outside the measured range takes the nearest end."""

    def __init__(self, widths: Sequence[int], ms: Sequence[float]):
        if len(widths) != len(ms) or not widths:
            raise ValueError("a latency table needs one time per width")
        order = np.argsort(widths)
        self.widths = np.asarray(widths, dtype=np.float64)[order]
        self.measured = np.asarray(ms, dtype=np.float64)[order]
        cleaned = _without_outliers(self.widths, self.measured)
        self.ms = np.minimum.accumulate(cleaned[::-1])[::-1]

    def __call__(self, width: float) -> float:
        return float(np.interp(width, self.widths, self.ms))

    def to_json(self) -> dict:
        return {"widths": [int(w) for w in self.widths],
                "ms": [round(float(t), 6) for t in self.measured]}

    @classmethod
    def from_json(cls, data: Mapping) -> LatencyTable:
        return cls([int(w) for w in data["widths"]], [float(t) for t in data["ms"]])


def _without_outliers(widths: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """`ms` with the points far off a Theil-Sen line through (widths, ms) put on it (see
    `LatencyTable`); unchanged under 4 points."""
    if len(ms) < 4:
        return ms
    pairs = [(j, i) for i in range(len(ms)) for j in range(i + 1, len(ms))]
    slope = float(np.median([(ms[j] - ms[i]) / (widths[j] - widths[i]) for j, i in pairs]))
    fit = float(np.median(ms - slope * widths)) + slope * widths
    off = np.abs(ms - fit)
    limit = max(3 * 1.4826 * float(np.median(off)), 0.05 * float(np.median(ms)))
    return np.where(off > limit, fit, ms)


@dataclass
class LatencyTables:
    """The tables of a set of groups, and what it took to get them."""

    tables: dict[str, LatencyTable]  # by group name
    dense_ms: float  # the whole dense model, median
    untimed: dict[str, str] = field(default_factory=dict)  # group name -> why not
    timed: int = 0  # regions timed in this run
    reused: int = 0  # groups whose table came from the cache or another region
    seconds: float = 0.0  # wall time spent getting the tables (and the dense latency)
    cache: str = ""  # the JSON file
    threads: int | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Region:
    """A group's region as a model of its own, and what it reads from the rest."""

    model: onnx.ModelProto
    inputs: dict[str, tuple[int, tuple[int, ...]]]  # name -> (elem type, shape)
    fixed: dict[str, np.ndarray]  # inputs fed their real values (integers, booleans)
    signature: str  # equal for regions of the same structure


def machine(threads: int | None) -> dict:
    """What a table depends on besides the region: the CPU, onnxruntime, the threads."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count() or 0,
            "onnxruntime": ort.__version__,
            "threads": "default" if threads is None else int(threads)}


def cache_folder() -> Path:
    """Where latency tables are cached unless `--latency-table` names a file."""
    if os.environ.get("ONNXPRUNE_CACHE_DIR"):
        return Path(os.environ["ONNXPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxprune"


def model_hash(loaded: LoadedModel) -> str:
    """sha256 of the model file (of the serialized proto for a model not read from one)."""
    digest = hashlib.sha256()
    if loaded.path is not None and Path(loaded.path).is_file():
        with open(loaded.path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    else:
        digest.update(loaded.proto.SerializeToString())
    return digest.hexdigest()


def timing_feeds(model: onnx.ModelProto, dims: Mapping[str, int] | None,
                 input_shapes: Mapping[str, Sequence[int]] | None, seed: int = 0) -> Feed:
    """One synthetic feed of the shapes `--dim` / `--input-shapes` give (defaults for the
    other dynamic dims, as for calibration)."""
    return synthetic_inputs(model, 1, seed, dict(dims or {}), input_shapes)[0]


def measure_tables(loaded: LoadedModel, groups: Sequence[ChannelGroup], feed: Feed, *,
                   round_to: int, threads: int | None = None,
                   table_file: str | os.PathLike | None = None) -> LatencyTables:
    """The latency table of every group whose region can be timed, and the dense model's
    latency, read from the cache where they are in it and measured otherwise (see the
    module doc). A group whose region cannot be extracted, shrunk or run is in `untimed`
    with why."""
    started = time.perf_counter()
    host = machine(threads)
    shapes_key = json.dumps({n: list(np.shape(v)) for n, v in sorted(feed.items())})
    digest = model_hash(loaded)
    path = (Path(table_file) if table_file is not None else cache_folder() / "latency" /
            f"{digest[:16]}-{_short_hash(json.dumps(host, sort_keys=True))}.json")
    cache = _read_cache(path, host)
    tables = cache.setdefault("tables", {})
    dense_key = f"{digest}:{shapes_key}"
    regions = _regions(loaded, groups, feed)
    result = LatencyTables({}, 0.0, threads=threads, cache=str(path),
                           input_shapes={n: list(np.shape(v)) for n, v in feed.items()})
    for group in groups:
        region = regions.get(group.name)
        if isinstance(region, str):
            result.untimed[group.name] = region
            continue
        assert region is not None
        entry = tables.get(region.signature)
        if entry is None:
            try:
                entry = _time_region(loaded, group, region, round_to, threads).to_json()
            except Exception as exc:  # onnxruntime and the rewrite raise many types
                result.untimed[group.name] = f"not timed: {first_line(exc)}"
                continue
            tables[region.signature] = entry
            result.timed += 1
            _write_cache(path, cache)  # a long run keeps what it measured
        else:
            result.reused += 1
        result.tables[group.name] = LatencyTable.from_json(entry)
    dense = cache.setdefault("dense_ms", {})
    if dense_key not in dense:
        session = _session(_model_source(loaded), loaded, threads)
        runs = _timed_runs([session], feed, rounds=MODEL_ROUNDS, max_seconds=MODEL_SECONDS)
        dense[dense_key] = min(runs[0]) * 1e3
        _write_cache(path, cache)
    result.dense_ms = float(dense[dense_key])
    result.seconds = time.perf_counter() - started
    for name, why in result.untimed.items():
        log.warning("group %s kept whole under --latency-budget: %s", name, why)
    log.info("latency tables: %d regions timed, %d reused, %.1f s (%s)", result.timed,
             result.reused, result.seconds, path)
    return result


def measure_ratio(dense: str | bytes, pruned: str | bytes, feed: Feed, *,
                  threads: int | None = None, data_folder: str | os.PathLike | None = None,
                  rounds: int = MODEL_ROUNDS, max_seconds: float = MODEL_SECONDS) -> dict:
    """Latencies (ms) of two models (paths or serialized) on the same feed, timed in
    interleaved rounds after warm-up: medians and their ratio, fastest runs and theirs."""
    sessions = [create_session(source, session_options(
        intra_op_threads=threads, spinning=False,
        data_folder=data_folder if isinstance(source, bytes) else None))
        for source in (dense, pruned)]
    before, after = _timed_runs(sessions, feed, rounds=rounds, max_seconds=max_seconds)
    dense_ms, pruned_ms = statistics.median(before) * 1e3, statistics.median(after) * 1e3
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "ratio": pruned_ms / dense_ms,
            "dense_fastest_ms": min(before) * 1e3, "pruned_fastest_ms": min(after) * 1e3,
            "fastest_ratio": min(after) / min(before), "rounds": len(before)}


def table_widths(group: ChannelGroup, round_to: int) -> list[int]:
    """The kept widths a table measures: every 1/TABLE_STEPS of the channels, rounded as
    the allocation rounds counts, and one unit (the least a group keeps)."""
    steps = {rounded_count(group, k * group.channels / TABLE_STEPS, round_to)
             for k in range(1, TABLE_STEPS + 1)}
    steps.add(min(unit(group, round_to), group.channels))
    return sorted(steps)


# ------------------------------------------------------------------ regions

def region_nodes(flow: Dataflow, group: ChannelGroup) -> list[int] | str:
    """The positions (in `flow.nodes`) of the group's region: the nodes that read a member
    or are edited by the group, the nodes on a path from one of them to another (forward
    walks stop at consumers, backward walks at producers), and the static nodes that
    compute what they read; or why there is none."""
    readers: dict[str, list[int]] = {}
    for index, reads in enumerate(flow.reads):
        for name in reads:
            readers.setdefault(name, []).append(index)
    by_label = {node_label(node, i): i for i, node in enumerate(flow.nodes)}
    by_name = {node.name: i for i, node in enumerate(flow.nodes) if node.name}
    producers: set[int] = set()
    consumers: set[int] = set()
    anchors: set[int] = set()
    for member in group.members:
        found = readers.get(member.tensor, [])
        if not found:
            return f"{member.tensor} is read by no node of the main graph"
        anchors.update(found)
        if member.role is MemberRole.OUTPUT:
            producers.update(found)
        elif member.role is MemberRole.INPUT:
            consumers.update(found)
    for shape in group.shapes:
        node = by_name.get(shape.node or "", by_label.get(shape.node or ""))
        anchors.update([node] if node is not None else readers.get(shape.tensor, []))
    for edit in group.attributes:
        node = by_name.get(edit.node, by_label.get(edit.node))
        if node is None:
            return f"node {edit.node} not found in the main graph"
        anchors.add(node)
    forward = _walk(anchors - consumers, lambda i: (r for o in flow.nodes[i].output if o
                                                     for r in readers.get(o, [])),
                    stop=consumers)
    backward = _walk(anchors - producers, lambda i: (flow.producer[r] for r in flow.reads[i]
                                                      if r in flow.producer),
                     stop=producers | flow.static_nodes)
    nodes = anchors | (forward & backward)
    pending = [r for i in nodes for r in flow.reads[i]]
    while pending:  # static values the region reads (shape arithmetic, Constants)
        producer = flow.producer.get(pending.pop())
        if producer is not None and producer in flow.static_nodes and producer not in nodes:
            nodes.add(producer)
            pending.extend(flow.reads[producer])
    return sorted(nodes)


def _walk(start: set[int], step: Callable[[int], object], stop: set[int]) -> set[int]:
    """Every node reached from `start` (included) by `step`, not going on from `stop`."""
    seen = set(start)
    pending = [i for i in start if i not in stop]
    while pending:
        for following in step(pending.pop()):  # type: ignore[attr-defined]
            if following not in seen:
                seen.add(following)
                if following not in stop:
                    pending.append(following)
    return seen


def _regions(loaded: LoadedModel, groups: Sequence[ChannelGroup], feed: Feed
             ) -> dict[str, Region | str]:
    """Each group's region, or why it has none; the values the regions read from the rest
    of the graph come from one run of the full model."""
    flow = GraphIndex(loaded.proto).dataflow
    nodes: dict[str, list[int]] = {}
    found: dict[str, Region | str] = {}
    for group in groups:
        chosen = region_nodes(flow, group)
        if isinstance(chosen, str):
            found[group.name] = chosen
        else:
            nodes[group.name] = chosen
    wanted = sorted({name for chosen in nodes.values() for name in _reads_from_outside(
        flow, chosen) if name not in feed})
    values = dict(feed)
    if wanted:
        values.update(_run_with_outputs(loaded, wanted, feed))
    for name, chosen in nodes.items():
        group = next(g for g in groups if g.name == name)
        try:
            found[name] = _region(loaded, flow, group, chosen, values)
        except Exception as exc:  # an odd graph: the group is left untimed, with why
            found[name] = f"region not extracted: {first_line(exc)}"
    return found


def _reads_from_outside(flow: Dataflow, chosen: Sequence[int]) -> list[str]:
    produced = {o for i in chosen for o in flow.nodes[i].output if o}
    return sorted({r for i in chosen for r in flow.reads[i]
                   if r not in produced and r not in flow.initializers})


def _region(loaded: LoadedModel, flow: Dataflow, group: ChannelGroup, chosen: Sequence[int],
            values: Mapping[str, np.ndarray]) -> Region:
    proto = loaded.proto
    model = onnx.ModelProto(ir_version=proto.ir_version)
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    graph = model.graph
    graph.name = f"region_{group.name}"
    for i in chosen:
        graph.node.add().CopyFrom(flow.nodes[i])
    reads = {r for i in chosen for r in flow.reads[i]}
    for name in sorted(reads & set(flow.initializers)):
        graph.initializer.add().CopyFrom(flow.initializers[name])
    inputs: dict[str, tuple[int, tuple[int, ...]]] = {}
    fixed: dict[str, np.ndarray] = {}
    for name in _reads_from_outside(flow, chosen):
        array = np.asarray(values[name])
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        inputs[name] = (elem, tuple(array.shape))
        graph.input.append(helper.make_tensor_value_info(name, elem, array.shape))
        if array.dtype.kind not in "fc":
            fixed[name] = array
    read_inside = {r for node in graph.node for r in node.input}
    # a consumer's output is the region's result even where a later region node reads it
    consumed = {m.tensor for m in group.members if m.role is MemberRole.INPUT}
    consumer_outputs = {o for i in chosen if consumed & set(flow.reads[i])
                        for o in flow.nodes[i].output if o}
    for node in graph.node:
        for name in node.output:
            if name and (name not in read_inside or name in consumer_outputs):
                graph.output.append(onnx.ValueInfoProto(name=name))
    return Region(model, inputs, fixed, _signature(model, group, fixed))


def _run_with_outputs(loaded: LoadedModel, names: Sequence[str], feed: Feed
                      ) -> dict[str, np.ndarray]:
    """The values of main-graph `names` when the full model runs on `feed`."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = _session(model.SerializeToString(), loaded, None)
    try:
        outputs = session.run(list(names), feed)
    except Exception as exc:  # onnxruntime raises its own unrelated types
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feed.items())
        raise TimingError(f"onnxruntime cannot run the model at the timing shapes ({shapes}: "
                          f"{first_line(exc)}); give the sizes with --dim or "
                          "--input-shapes") from exc
    return dict(zip(names, outputs, strict=True))


def _signature(model: onnx.ModelProto, group: ChannelGroup, fixed: Mapping[str, np.ndarray]
               ) -> str:
    """A hash equal for regions of the same structure: value names replaced by their order
    of appearance, node names by their position."""
    names: dict[str, str] = {}

    def canonical(name: str) -> str:
        return names.setdefault(name, f"v{len(names)}") if name else ""

    parts: list = []
    graph = model.graph
    for value in graph.input:
        elem, dims = value.type.tensor_type.elem_type, [
            d.dim_value for d in value.type.tensor_type.shape.dim]
        extra = (hashlib.sha256(np.ascontiguousarray(fixed[value.name]).tobytes()).hexdigest()
                 if value.name in fixed else "")
        parts.append(("input", canonical(value.name), elem, dims, extra))
    for tensor in graph.initializer:
        values = ""  # weights count by their shape; the values of shape constants matter
        if tensor.data_type not in FLOAT_TYPES and not tensor.external_data \
                and tensor.ByteSize() <= 4096:
            nameless = onnx.TensorProto()
            nameless.CopyFrom(tensor)
            nameless.name = ""
            values = hashlib.sha256(nameless.SerializeToString()).hexdigest()
        parts.append(("init", canonical(tensor.name), tensor.data_type, list(tensor.dims),
                      values))
    labels = {}
    for position, node in enumerate(graph.node):
        labels[node.name or node_label(node, position)] = position
        attrs = sorted((a.name, hashlib.sha256(a.SerializeToString()).hexdigest())
                       for a in node.attribute)
        parts.append(("node", node.op_type, node.domain, [canonical(i) for i in node.input],
                      [canonical(o) for o in node.output], attrs))
    parts.append(("group", group.kind.value, group.channels, group.multiple_of,
                  [(canonical(m.tensor), m.axis, m.role.value, m.offset, m.block)
                   for m in group.members],
                  [(labels.get(a.node, -1), a.attribute, a.channels_per_unit, a.index,
                    a.units_per_channel) for a in group.attributes],
                  [(canonical(s.tensor), s.index, s.per_channel,
                    labels.get(s.node or "", -1)) for s in group.shapes]))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# ------------------------------------------------------------------ timing

def _time_region(loaded: LoadedModel, group: ChannelGroup, region: Region, round_to: int,
                 threads: int | None) -> LatencyTable:
    """The region's table: each width's model (the first w channels kept) timed together."""
    from .surgery import shrink

    widths = table_widths(group, round_to)
    rng = np.random.default_rng(0)
    feed = {name: region.fixed[name] if name in region.fixed else
            rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(elem))
            for name, (elem, shape) in region.inputs.items()}
    sessions = []
    for width in widths:
        model = region.model if width >= group.channels else shrink(
            region.model, [group], {group.name: np.arange(width, dtype=np.int64)},
            base_dir=loaded.base_dir)
        sessions.append(_session(model.SerializeToString(), loaded, threads))
    ms = [min(runs) * 1e3 for runs in _timed_runs(sessions, feed, rounds=ROUNDS,
                                                  max_seconds=TABLE_SECONDS)]
    log.debug("group %s: %s", group.name,
              ", ".join(f"{w}: {t:.3f} ms" for w, t in zip(widths, ms, strict=True)))
    return LatencyTable(widths, ms)


def _timed_runs(sessions: Sequence[ort.InferenceSession], feed: Feed, *, rounds: int,
                max_seconds: float) -> list[list[float]]:
    """The run times (s) of each session on `feed`: every session warmed up, then timed
    in rounds, the order rotating every round; stops after `rounds` rounds, or once
    `max_seconds` have passed after at least MIN_ROUNDS."""
    for session in sessions:
        for _ in range(WARMUP):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    for done in range(rounds):
        for offset in range(len(sessions)):
            which = (done + offset) % len(sessions)
            begin = time.perf_counter()
            sessions[which].run(None, feed)
            times[which].append(time.perf_counter() - begin)
        if done + 1 >= MIN_ROUNDS and time.perf_counter() - started > max_seconds:
            break
    return times


def _session(source: str | bytes, loaded: LoadedModel, threads: int | None
             ) -> ort.InferenceSession:
    """A timing session: CPU, `threads` intra-op threads, no spinning; the tensors a lazy
    load or external data reference are found in the model's folder."""
    folder = loaded.base_dir if (loaded.lazy or loaded.uses_external_data) else None
    try:
        return create_session(source, session_options(intra_op_threads=threads,
                                                      spinning=False, data_folder=folder))
    except Exception as exc:  # onnxruntime raises its own unrelated types
        raise TimingError(f"onnxruntime cannot load the model to time it "
                          f"({first_line(exc)})") from exc


def _model_source(loaded: LoadedModel) -> str | bytes:
    if loaded.path is not None and Path(loaded.path).is_file():
        return str(loaded.path)
    return loaded.proto.SerializeToString()


# ------------------------------------------------------------------ cache

def _read_cache(path: Path, host: dict) -> dict:
    """The cache file's content when it was measured on this machine, else a new one."""
    fresh = {"format": CACHE_FORMAT, "machine": host, "tables": {}, "dense_ms": {}}
    if not path.is_file():
        return fresh
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("latency tables %s unreadable (%s): measuring again", path, exc)
        return fresh
    if data.get("format") != CACHE_FORMAT or data.get("machine") != host:
        log.warning("latency tables %s were measured on another machine or setup (%s): "
                    "measuring again", path, data.get("machine"))
        return fresh
    return data


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(data, indent=1, sort_keys=True))
        partial.replace(path)
    except OSError as exc:
        log.warning("latency tables not cached at %s: %s", path, exc)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------ allocation

# a trial within this much of the budget (ratio to dense) is not allocated again
CALIBRATION_TOLERANCE = 0.02


def allocate(loaded: LoadedModel, groups: Sequence[ChannelGroup],
             scores: Mapping[str, np.ndarray], params_per_channel: Mapping[str, float],
             feed: Feed, *, budget: float, round_to: int,
             normalization: str = "mean", threads: int | None = None,
             table_file: str | os.PathLike | None = None, calibrate: bool = True,
             costs: Mapping[str, Callable[[int], float]] | None = None
             ) -> tuple[dict[str, int], dict]:
    """Kept counts under a latency budget, and what the report says of them.

    The tables (`measure_tables`) predict each group's saving alone; the savings of a
    whole model differ (a layer between two groups loses input and output channels; an op
    in the full model runs with colder caches than in its region), so with `calibrate` the
    model is shrunk at the counts the tables chose and timed against dense (interleaved,
    fastest runs, as the tables are timed); where that misses the budget by more than
    `CALIBRATION_TOLERANCE`, the tables' savings are scaled by measured / predicted saving
    and the counts chosen once more for the budget those scaled savings must meet. `costs`
    as `budget_counts` takes them (the sensitivity allocation's predicted errors)."""
    from .selection import budget_counts, keep_sets, predicted_latency
    from .surgery import shrink

    measured = measure_tables(loaded, groups, feed, round_to=round_to, threads=threads,
                              table_file=table_file)
    dense_ms = measured.dense_ms
    counts = budget_counts(groups, scores, params_per_channel, measured.tables, dense_ms,
                           budget, round_to, normalization, costs)
    predicted = predicted_latency(groups, measured.tables, dense_ms, counts) / dense_ms
    info: dict = {
        "budget": budget, "dense_ms": dense_ms, "table_seconds": measured.seconds,
        "regions_timed": measured.timed, "tables_reused": measured.reused,
        "untimed": dict(measured.untimed), "table_file": measured.cache,
        "threads": measured.threads, "input_shapes": measured.input_shapes}
    if calibrate and predicted < 1.0:
        started = time.perf_counter()
        trial = shrink(loaded.proto, groups, keep_sets(groups, scores, counts),
                       base_dir=loaded.base_dir)
        timed = measure_ratio(_model_source(loaded), trial.SerializeToString(), feed,
                              threads=threads, data_folder=loaded.base_dir)
        del trial
        factor = (1.0 - timed["fastest_ratio"]) / (1.0 - predicted)
        calibration = {"trial_predicted_ratio": predicted,
                       "trial_measured_ratio": timed["fastest_ratio"], "factor": factor}
        if abs(timed["fastest_ratio"] - budget) > CALIBRATION_TOLERANCE and factor > 0:
            # predicted savings × factor must reach (1 - budget) of dense
            target = max(0.0, 1.0 - (1.0 - budget) / factor)
            counts = budget_counts(groups, scores, params_per_channel, measured.tables,
                                   dense_ms, target, round_to, normalization, costs)
            calibration["table_budget"] = target
        calibration["seconds"] = time.perf_counter() - started
        info["calibration"] = calibration
        predicted = predicted_latency(groups, measured.tables, dense_ms, counts) / dense_ms
        info["calibrated_ratio"] = 1.0 - factor * (1.0 - predicted)
    info["predicted_ms"] = predicted * dense_ms
    info["predicted_ratio"] = predicted
    if info.get("calibrated_ratio", predicted) > budget + CALIBRATION_TOLERANCE:
        log.warning("--latency-budget %g is not reachable by the tables: they predict "
                    "%.3f x dense at best", budget, info.get("calibrated_ratio", predicted))
    info["tables"] = {name: table.to_json() for name, table in measured.tables.items()}
    return counts, info
