"""Scale of `prune --ray-address`, on paper where this machine cannot show it.

    python tools/bench_distributed_scale.py [--quick] [--link-gbps 10] [--calib-tokens N]
        [--real auto|smollm2|transformer|none] [--real-blocks 4] [--json PATH]

In the sequential calibrated loop the targets of one calibration stage are independent, and
with `--ray-address` each one's reconstruction runs as a Ray task that receives the target's
weights (float32) and its XᵀX (float64 [cols, cols]) and returns the rebuilt weights
(float32). This script projects what that buys on real shapes: SmolLM2-135M, and one
transformer block each with the shapes of Llama-3.2-1B, Llama-2-7B and Llama-2-70B.

1. Shapes. Per block: q, k, v, o, gate, up, down as [out, in] = [rows, cols]. Sequential
   mode groups them into 4 calibration stages (`ActivationCapture._plan`: a target's level
   is the number of target layers on the longest path before it): {q, k, v} (one input),
   {o}, {gate, up} (one input), {down}. Checked on SmolLM2-135M: 210 targets in 120 stages.
2. Measured here: `sparsegpt_prune` at 50 % unstructured, split into the factor of XᵀX
   (Cholesky + triangular inverse, O(cols³)) and the blocked OBS sweep (O(rows·cols²)),
   on random weights and XᵀX of random X (1,024 tokens; damped as usual), in CPU seconds
   of one thread (BLAS limited to one): this machine is shared, and CPU time does not
   count what other jobs take. Shapes too large for it are extrapolated from a fitted cost
   model (factor ≈ a·cols³ + e·cols², sweep ≈ b·rows·cols² + d·rows·cols), marked so.
3. Bytes per task: weights in (4·rows·cols) + XᵀX in (8·cols²) + weights back
   (4·rows·cols). A local Ray instance measures the object store's throughput and the
   per-task overhead; the cross-node projection uses an assumed link (--link-gbps).
4. Projection for 1, 4, 16 and 64 workers: a stage takes the makespan of its tasks (longest
   first onto the first free worker) plus the time its bytes take over the driver's link
   (the driver sends every input and receives every result); the "overlapped" column lets
   sends, compute and returns overlap in a simple event simulation instead. A model takes
   blocks × Σ stages. The serial run (no Ray) factors XᵀX once per input (q, k and v share
   it); a Ray task factors its own. Also projected: `--calib-mode one-pass`, where all of
   a model's targets form one stage. The capture passes (onnxruntime forwards and XᵀX
   sums) stay serial on the driver: estimated from GEMM rates measured here, in their own
   column.
5. Real runs: `onnxprune prune --method sparsegpt`, serial and with `--ray-address local`,
   on the demo transformer and (if exported: `python tools/export_lm.py`) on the first
   --real-blocks blocks of SmolLM2-135M (BLAS on one thread); wall times, and whether the
   outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKER_COUNTS = (1, 4, 16, 64)
HESSIAN_TOKENS = 1024  # rows of the random X behind a measured XᵀX (timing only)
SPARSITY = 0.5
GB = 1e9


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Linear:
    """One target: [rows, cols] = [out features, in features]; XᵀX is [cols, cols]."""

    name: str
    rows: int
    cols: int

    @property
    def bytes_in(self) -> int:
        """What a task receives: float32 weights, float64 XᵀX (and two float64 vectors)."""
        return 4 * self.rows * self.cols + 8 * self.cols * self.cols + 16 * self.cols

    @property
    def bytes_out(self) -> int:
        return 4 * self.rows * self.cols


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    blocks: int

    def stages(self) -> list[tuple[Linear, ...]]:
        """One block's calibration stages in sequential mode; targets in a stage that read
        the same input come first (the serial run factors that input's XᵀX once)."""
        hidden, ffn = self.hidden, self.intermediate
        query, key_value = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(Linear("q", query, hidden), Linear("k", key_value, hidden),
                 Linear("v", key_value, hidden)),
                (Linear("o", hidden, query),),
                (Linear("gate", ffn, hidden), Linear("up", ffn, hidden)),
                (Linear("down", hidden, ffn),)]

    def linears(self) -> list[Linear]:
        return [linear for stage in self.stages() for linear in stage]

    @property
    def block_params(self) -> int:
        return sum(t.rows * t.cols for t in self.linears())


ARCHITECTURES = [
    Architecture("SmolLM2-135M", 576, 1536, 9, 3, 64, 30),
    Architecture("Llama-3.2-1B", 2048, 8192, 32, 8, 64, 16),
    Architecture("Llama-2-7B", 4096, 11008, 32, 32, 128, 32),
    Architecture("Llama-2-70B", 8192, 28672, 64, 8, 128, 80),
]


# ---------------------------------------------------------------- measured reconstruction


def best_time(run: Callable[[], object], min_total: float = 30.0, max_runs: int = 3,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """The shortest of up to `max_runs` runs, stopping once they took `min_total` seconds:
    a shared machine's noise only ever adds time."""
    times: list[float] = []
    while not times or (sum(times) < min_total and len(times) < max_runs):
        started = clock()
        run()
        times.append(clock() - started)
    return min(times)


def cpu_time(run: Callable[[], object]) -> float:
    """CPU seconds of this process (one BLAS thread, numba on one thread): what the work
    costs one core, whatever other jobs on a shared machine take from it."""
    return best_time(run, clock=time.process_time)


def random_hessian(cols: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((HESSIAN_TOKENS, cols), dtype=np.float32)
    return (x.T @ x).astype(np.float64)


def measure_reconstruction(shapes: set[tuple[int, int]], max_cols: int, max_sweep: float,
                           passes: int) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
    """CPU seconds of the factor per cols and of the sweep per (rows, cols), for the shapes
    with cols <= max_cols and rows·cols² <= max_sweep: the least over `passes` passes over
    all shapes (a busy spell of the machine then spoils one pass, not every run)."""
    from onnxprune.methods.sparsegpt import (
        DEFAULT_DAMP,
        dead_inputs,
        inverse_cholesky_upper,
        sparsegpt_prune,
    )

    rng = np.random.default_rng(0)
    warm = random_hessian(128, rng)  # numba kernels load (or compile) outside the timings
    sparsegpt_prune(rng.standard_normal((64, 128), dtype=np.float32), warm, sparsity=SPARSITY)
    factors: dict[int, float] = {}
    sweeps: dict[tuple[int, int], float] = {}
    for number in range(1, passes + 1):
        print(f" pass {number} of {passes}", file=sys.stderr)
        for cols in sorted({c for _, c in shapes if c <= max_cols}):
            hessian = random_hessian(cols, rng)
            upper = None

            def factor(hessian=hessian):
                nonlocal upper
                upper = inverse_cholesky_upper(hessian, DEFAULT_DAMP, dead_inputs(hessian)
                                               ).astype(np.float32, order="F")

            seconds = cpu_time(factor)
            factors[cols] = min(seconds, factors.get(cols, seconds))
            print(f"  factor   cols {cols:>6}: {seconds:8.3f} s", file=sys.stderr, flush=True)
            for rows in sorted({r for r, c in shapes if c == cols and r * c * c <= max_sweep}):
                weights = rng.standard_normal((rows, cols), dtype=np.float32)

                def sweep(weights=weights, hessian=hessian, upper=upper):
                    sparsegpt_prune(weights, hessian, sparsity=SPARSITY, upper=upper)

                seconds = cpu_time(sweep)
                sweeps[(rows, cols)] = min(seconds, sweeps.get((rows, cols), seconds))
                print(f"  sweep {rows:>6} x {cols:<6}: {seconds:8.3f} s", file=sys.stderr,
                      flush=True)
            del hessian, upper
    return factors, sweeps


@dataclass
class CostModel:
    """seconds ≈ Σ coefficient · term, fitted to measured points (non-negative least squares,
    relative errors: small shapes weigh as much as large ones)."""

    terms: Callable[[int, int], list[float]]
    coefficients: np.ndarray

    @classmethod
    def fit(cls, terms: Callable[[int, int], list[float]],
            points: dict[tuple[int, int], float]) -> CostModel:
        from scipy.optimize import nnls

        rows = np.array([np.array(terms(*shape)) / seconds for shape, seconds in points.items()])
        coefficients, _ = nnls(rows, np.ones(len(points)))
        return cls(terms, coefficients)

    def __call__(self, rows: int, cols: int) -> float:
        return float(np.dot(self.coefficients, self.terms(rows, cols)))


def factor_terms(rows: int, cols: int) -> list[float]:
    return [float(cols) ** 3, float(cols) ** 2]


def sweep_terms(rows: int, cols: int) -> list[float]:
    return [float(rows) * cols * cols, float(rows) * cols]


def holdout_check(terms, points: dict[tuple[int, int], float], size, label) -> str:
    """Refit without the largest measured point and say how far off it predicts it."""
    largest = max(points, key=size)
    rest = {shape: s for shape, s in points.items() if shape != largest}
    if len(rest) < 3:
        return "too few points for a hold-out check"
    predicted = CostModel.fit(terms, rest)(*largest)
    return (f"fitted without {label(largest)}, predicts it at {predicted:.2f} s, measured "
            f"{points[largest]:.2f} s ({100 * (predicted / points[largest] - 1):+.0f} %)")


@dataclass
class TaskCost:
    linear: Linear
    factor_s: float
    sweep_s: float
    factor_measured: bool
    sweep_measured: bool

    @property
    def seconds(self) -> float:
        """A Ray task's compute: it factors its own XᵀX."""
        return self.factor_s + self.sweep_s


# ---------------------------------------------------------------- Ray and GEMM rates


@dataclass
class RayCosts:
    init_s: float
    task_overhead_s: float  # round trip of an empty task, driver to worker and back
    put_gb_per_s: float  # an argument of `size` bytes into the local object store, to a task
    get_gb_per_s: float  # a result of `size` bytes from a task back to the driver
    size: int


def measure_ray(size: int) -> RayCosts | None:
    try:
        import ray
    except ImportError:
        return None

    if ray.is_initialized():
        ray.shutdown()
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    init_s = time.perf_counter() - started
    try:
        @ray.remote(num_cpus=1)
        def echo(value):
            return value

        @ray.remote(num_cpus=1)
        def touch(array):
            return float(array[:: 1 << 12].sum())  # the argument is mapped, not copied

        @ray.remote(num_cpus=1)
        def make(count):
            return np.ones(count, dtype=np.float32)

        for _ in range(20):
            ray.get(echo.remote(0))
        overhead = best_time(lambda: [ray.get(echo.remote(i)) for i in range(50)]) / 50
        array = np.random.default_rng(0).standard_normal(size // 8)
        ray.get(touch.remote(array[:1000]))
        put = best_time(lambda: ray.get(touch.remote(array)))
        ray.get(make.remote(1000))
        get = best_time(lambda: np.array(ray.get(make.remote(size // 4))))
    finally:
        ray.shutdown()
    return RayCosts(init_s, overhead, size / max(put - overhead, 1e-9) / GB,
                    size / max(get - overhead, 1e-9) / GB, size)


@dataclass
class CaptureRates:
    """Rates of this machine for the serial capture: XᵀX summed per token and input feature
    squared (ActivationStats.add), and float32 GEMM FLOP/s (the forward's linear layers)."""

    gram_per_s: float  # tokens·cols² per second
    flops_per_s: float


def measure_capture_rates() -> CaptureRates:
    from onnxprune.calib import ActivationStats

    rng = np.random.default_rng(1)
    tokens, cols = 4096, 2048
    chunk = rng.standard_normal((tokens, cols), dtype=np.float32)
    stats = ActivationStats(1, cols, True)
    gram = cpu_time(lambda: stats.add(0, chunk))
    weights = rng.standard_normal((cols, cols), dtype=np.float32)
    gemm = cpu_time(lambda: chunk @ weights)
    return CaptureRates(tokens * cols * cols / gram, 2 * tokens * cols * cols / gemm)


def capture_seconds(arch: Architecture, tokens: int, seq: int, rates: CaptureRates) -> float:
    """One block's capture: its forward (linear layers and attention) over the calibration
    tokens and the XᵀX sums of its 4 distinct inputs; embedding and head left out."""
    flops = 2 * tokens * arch.block_params + 4 * tokens * seq * arch.heads * arch.head_dim
    inputs = [stage[0].cols for stage in arch.stages()]
    return flops / rates.flops_per_s + tokens * sum(c * c for c in inputs) / rates.gram_per_s


# ---------------------------------------------------------------- projection


def makespan(durations: list[float], workers: int) -> float:
    """Longest first, each onto the first free worker."""
    free = [0.0] * min(workers, len(durations))
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(free, free[0] + duration)
    return max(free, default=0.0)


def overlapped(tasks: list[TaskCost], workers: int, bandwidth: float, overhead: float) -> float:
    """Event simulation: the driver sends inputs one after another (longest task first)
    over its uplink; a task starts when its input has arrived and a worker is free; results
    come back one after another over the downlink (full duplex)."""
    free = [0.0] * min(workers, len(tasks))
    sent = returned = 0.0
    ends = []
    for task in sorted(tasks, key=lambda t: t.seconds, reverse=True):
        sent += task.linear.bytes_in / bandwidth
        start = max(sent, free[0])
        heapq.heapreplace(free, start + task.seconds + overhead)
        ends.append((start + task.seconds + overhead, task.linear.bytes_out / bandwidth))
    for end, back in sorted(ends):
        returned = max(returned, end) + back
    return returned


@dataclass
class Row:
    mode: str
    workers: str
    compute_s: float
    transfer_s: float
    total_s: float
    overlapped_s: float
    speedup: float
    with_capture_s: float
    speedup_with_capture: float
    driver_gb: float  # bytes the driver sends and receives
    peak_task_gb: float  # the largest task's input


def serial_seconds(stage: list[TaskCost]) -> float:
    """The serial run: one factor per distinct input, every sweep."""
    factors = {task.linear.cols: task.factor_s for task in stage}
    return sum(factors.values()) + sum(task.sweep_s for task in stage)


def project(arch: Architecture, costs: dict[str, TaskCost], bandwidth: float, overhead: float,
            capture_block_s: float) -> list[Row]:
    stages = [[costs[linear.name] for linear in stage] for stage in arch.stages()]
    blocks = arch.blocks
    serial_block = sum(serial_seconds(stage) for stage in stages)
    serial = blocks * serial_block
    serial_capture = serial + blocks * capture_block_s
    moved = blocks * sum(t.linear.bytes_in + t.linear.bytes_out for s in stages for t in s)
    peak = max(t.linear.bytes_in for s in stages for t in s) / GB
    rows = [Row("sequential", "serial, no Ray", serial, 0.0, serial, serial, 1.0,
                serial_capture, 1.0, 0.0, peak)]
    everything = [task for _ in range(blocks) for stage in stages for task in stage]
    for workers in WORKER_COUNTS:
        compute = blocks * sum(makespan([t.seconds + overhead for t in stage], workers)
                               for stage in stages)
        transfer = moved / bandwidth
        total = compute + transfer
        lapped = blocks * sum(overlapped(stage, workers, bandwidth, overhead)
                              for stage in stages)
        rows.append(Row("sequential", str(workers), compute, transfer, total, lapped,
                        serial / total, total + blocks * capture_block_s,
                        serial_capture / (total + blocks * capture_block_s), moved / GB, peak))
    for workers in WORKER_COUNTS:
        # one-pass: every target is captured from the dense model in one stage, so all of
        # the model's tasks are independent (other numerics: not the serial run's output)
        compute = makespan([t.seconds + overhead for t in everything], workers)
        transfer = moved / bandwidth
        total = compute + transfer
        lapped = overlapped(everything, workers, bandwidth, overhead)
        rows.append(Row("one-pass", str(workers), compute, transfer, total, lapped,
                        serial / total, total + blocks * capture_block_s,
                        serial_capture / (total + blocks * capture_block_s), moved / GB, peak))
    return rows


# ---------------------------------------------------------------- real runs


@dataclass
class RealRun:
    model: str
    targets: str
    serial_s: float
    ray_s: float
    identical: bool
    stages: str
    serial_reconstruction_s: float
    projected_reconstruction_s: float | None = None  # serial, from the per-target costs


def prune_seconds(command: list[str], log: Path) -> tuple[float, str]:
    """Wall time of one prune, BLAS on one thread as in the measurements (the Ray tasks
    take the caller's count): on this shared 2-CPU machine two BLAS threads per process
    made the same SmolLM2 run several times slower."""
    one_thread = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "MKL_NUM_THREADS")}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **one_thread})
    seconds = time.perf_counter() - started
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed, see {log}")
    return seconds, done.stderr


def same_weights(first: Path, second: Path) -> bool:
    if first.read_bytes() == second.read_bytes():
        return True
    import onnx
    from onnx import numpy_helper

    tensors = [{t.name: numpy_helper.to_array(t) for t in onnx.load(p).graph.initializer}
               for p in (first, second)]
    return tensors[0].keys() == tensors[1].keys() and all(
        np.array_equal(tensors[0][name], tensors[1][name]) for name in tensors[0])


def real_run(name: str, model: Path, extra: list[str], work: Path) -> RealRun:
    base = [sys.executable, "-m", "onnxprune", "prune", "-v", str(model), "--method",
            "sparsegpt", *extra]
    outputs = {}
    times = {}
    logs = {}
    for label, more in (("serial", []), ("ray", ["--ray-address", "local"])):
        outputs[label] = work / f"{name}-{label}.onnx"
        report = work / f"{name}-{label}.json"
        times[label], logs[label] = prune_seconds(
            [*base, "-o", str(outputs[label]), "--report", str(report), *more],
            work / f"{name}-{label}.log")
    stages = re.search(r"(\d+) calibrated targets in (\d+) stage", logs["serial"])
    report = json.loads((work / f"{name}-serial.json").read_text())
    rebuilt = [t for t in report["targets"] if t.get("method") == "sparsegpt"]
    return RealRun(name, str(len(rebuilt)), times["serial"], times["ray"],
                   same_weights(outputs["serial"], outputs["ray"]),
                   f"{stages[1]} targets in {stages[2]} stages" if stages else "?",
                   sum(t.get("seconds") or 0.0 for t in rebuilt))


def real_runs(args, smollm2_block_s: float) -> list[RealRun]:
    """The demo transformer (always), and the first --real-blocks blocks of SmolLM2-135M
    when it was exported (not in --quick unless asked for)."""
    if args.real == "none":
        return []
    runs = []
    model = Path(args.workdir) / "smollm2-135m.onnx"
    with tempfile.TemporaryDirectory(prefix="onnxprune-scale-") as tmp:
        work = Path(tmp)
        if args.real in ("auto", "transformer"):
            runs.append(real_run("transformer", ROOT / "models" / "transformer.onnx", [], work))
        if args.real == "smollm2" or (args.real == "auto" and not args.quick
                                      and model.exists()):
            if not model.exists():
                sys.exit(f"no {model}: run python tools/export_lm.py first")
            blocks = "|".join(str(b) for b in range(args.real_blocks))
            run = real_run(f"SmolLM2-135M, blocks 0-{args.real_blocks - 1}", model,
                           ["--include", rf"^model\.layers\.({blocks})\.", "--exclude",
                            "lm_head", "--calib", str(Path(args.workdir) / "calib.npz"),
                            "--calib-samples", "8"], work)
            run.projected_reconstruction_s = args.real_blocks * smollm2_block_s
            runs.append(run)
    return runs


# ---------------------------------------------------------------- output


def markdown(header: list[str], lines: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first `text_columns` left-aligned, the rest right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Measured:
    factors: dict[int, float]
    sweeps: dict[tuple[int, int], float]
    factor_model: CostModel
    sweep_model: CostModel
    checks: list[str]
    ray: RayCosts | None
    rates: CaptureRates


def cost_origin(cost: TaskCost) -> str:
    if cost.factor_measured and cost.sweep_measured:
        return "measured"
    if not cost.factor_measured and not cost.sweep_measured:
        return "extrapolated"
    return "factor measured, sweep extrapolated" if cost.factor_measured else (
        "sweep measured, factor extrapolated")


def hessian_gb(arch: Architecture) -> tuple[float, float]:
    """XᵀX on the driver: (the largest stage's, with Ray's copy of each task's argument
    in the object store; one-pass: every distinct input's of the whole model)."""
    largest = max(8 * (stage[0].cols ** 2 + sum(t.cols ** 2 for t in stage))
                  for stage in arch.stages())
    every = arch.blocks * sum(8 * stage[0].cols ** 2 for stage in arch.stages())
    return largest / GB, every / GB


def print_report(args, measured: Measured, costs_by_arch: dict[str, dict[str, TaskCost]],
                 tables: dict[str, list[Row]], runs: list[RealRun], bandwidth: float,
                 overhead: float, max_cols: int, elapsed: float) -> None:
    print(f"\n## Projected time of the reconstructions (a worker = one core of this "
          f"machine; driver link {args.link_gbps:g} Gbit/s, assumed)\n")
    lines = []
    for arch in ARCHITECTURES:
        rows = tables[arch.name]
        serial = rows[0]
        for mode, label, total, speedup in (
                ("sequential", "sequential", "total_s", "speedup"),
                ("one-pass", "one-pass", "total_s", "speedup"),
                ("sequential", f"sequential + capture ({args.calib_tokens:,} tokens)",
                 "with_capture_s", "speedup_with_capture")):
            cells = [duration(getattr(serial, total))]
            cells += [f"{duration(getattr(r, total))} ({getattr(r, speedup):.2f}x)"
                      for r in rows[1:] if r.mode == mode]
            lines.append([arch.name, label, *cells])
    print(markdown(["model", "mode", "serial, no Ray",
                    *(f"{w} worker{'s' if w > 1 else ''}" for w in WORKER_COUNTS)], lines,
                   text_columns=2))

    print(f"\n## Per-target cost (this machine: {os.cpu_count()} CPUs shared with other "
          f"jobs; CPU seconds of one thread; load average {os.getloadavg()[0]:.1f} at the end)\n")
    lines = []
    for arch in ARCHITECTURES:
        for t in arch.linears():
            cost = costs_by_arch[arch.name][t.name]
            lines.append([arch.name, t.name, f"{t.rows} x {t.cols}",
                          f"{cost.factor_s:.2f}", f"{cost.sweep_s:.2f}",
                          f"{t.bytes_in / 2**20:,.0f}", f"{t.bytes_out / 2**20:,.0f}",
                          cost_origin(cost)])
    print(markdown(["model", "target", "rows x cols", "factor s", "sweep s", "MiB in",
                    "MiB out", "time"], lines, text_columns=2))
    a3, a2 = measured.factor_model.coefficients
    b, d = measured.sweep_model.coefficients
    print(f"\nfactor ≈ {a3:.3g}·cols³ + {a2:.3g}·cols² s; sweep ≈ {b:.3g}·rows·cols² + "
          f"{d:.3g}·rows·cols s (fitted on the measured entries)")
    for check in measured.checks:
        print(f"hold-out check, {check}")

    print("\n## Transfers and capture\n")
    ray = measured.ray
    if ray:
        print(f"MEASURED, local Ray on this machine (object store in shared memory, no "
              f"network): ray.init {ray.init_s:.1f} s; empty task round trip "
              f"{1000 * ray.task_overhead_s:.1f} ms; a {ray.size >> 20} MiB argument to a "
              f"task {ray.put_gb_per_s:.2f} GB/s, a result back {ray.get_gb_per_s:.2f} GB/s.")
    else:
        print("Ray is not installed: no object-store measurement, no per-task overhead.")
    print(f"ASSUMED for the projection: the driver's link, {args.link_gbps:g} Gbit/s = "
          f"{bandwidth / GB:.2f} GB/s each way; every task's input leaves the driver and "
          f"every result returns to it over that link; per-task overhead "
          f"{1000 * overhead:.1f} ms (measured above).")
    rates = measured.rates
    print(f"Capture estimate: {args.calib_tokens:,} calibration tokens in windows of "
          f"{args.seq}; MEASURED rates here (one thread): XᵀX sums "
          f"{rates.gram_per_s / 1e9:.1f} G token·cols²/s, float32 GEMM "
          f"{rates.flops_per_s / 1e9:.1f} GFLOP/s.")

    for arch in ARCHITECTURES:
        rows = tables[arch.name]
        stage_gb, every_gb = hessian_gb(arch)
        print(f"\n## {arch.name}: {arch.blocks} blocks x 4 stages, {7 * arch.blocks} "
              f"targets, {arch.blocks * arch.block_params / 1e9:.2f} G weights\n")
        print(f"largest task input {rows[0].peak_task_gb:.2f} GB; XᵀX on the driver: "
              f"sequential up to {stage_gb:.2f} GB per stage (with the tasks' copies), "
              f"one-pass {every_gb:,.1f} GB (every input's, before any copy)\n")
        print(markdown(
            ["calib mode", "workers", "compute", "transfer", "total", "overlapped",
             "speed-up", "+ serial capture", "speed-up", "driver moves GB"],
            [[r.mode, r.workers, duration(r.compute_s), duration(r.transfer_s),
              duration(r.total_s), duration(r.overlapped_s), f"{r.speedup:.2f}x",
              duration(r.with_capture_s), f"{r.speedup_with_capture:.2f}x",
              f"{r.driver_gb:,.0f}"] for r in rows], text_columns=2))

    if runs:
        print("\n## Real runs: onnxprune prune --method sparsegpt, serial vs --ray-address "
              "local (this machine: 2 CPUs = 2 task slots; BLAS on one thread)\n")
        print(markdown(["model", "targets rebuilt", "stages", "serial s",
                        "of which reconstruction s", "projected reconstruction s",
                        "Ray local s", "bit-identical"],
                       [[r.model, r.targets, r.stages, f"{r.serial_s:.1f}",
                         f"{r.serial_reconstruction_s:.1f}",
                         "-" if r.projected_reconstruction_s is None
                         else f"{r.projected_reconstruction_s:.1f}", f"{r.ray_s:.1f}",
                         "yes" if r.identical else "NO"] for r in runs], text_columns=3))
        print("\n(serial s: the whole command, start-up, model read and write and capture "
              "included; reconstruction s: the report's per-target seconds of the rebuilt "
              "targets; projected: the per-target costs above, one thread's CPU seconds)")

    print(NOTES.format(link=args.link_gbps, tokens=args.calib_tokens, max_cols=max_cols,
                       elapsed=elapsed))


NOTES = """
## Notes

- Measured here: per-target factor and sweep times (entries marked measured), the local
  Ray object store's throughput and per-task overhead, GEMM and XᵀX rates, the real runs.
  Extrapolated: entries so marked (cost model above). Assumed: the {link:g} Gbit/s driver
  link, and that a worker computes as fast as one core of this machine (CPU seconds of
  one thread: robust to the other jobs on this shared 2-CPU machine). A node with more
  cores factors a large XᵀX faster (LAPACK is threaded), which shortens compute, not
  transfers: those then weigh more.
- sequential = the default mode, where `--ray-address` gives the serial run's output: a
  stage has 1 to 3 targets (q, k, v; o; gate, up; down), so more than 3 workers never
  help, and the down projection (a stage of its own, with the largest XᵀX) bounds every
  block. A Ray task factors its own XᵀX, which the serial run shares between q, k and v
  (and gate and up): on 1 worker the Ray run is slower than the serial one.
- one-pass = `--calib-mode one-pass`: every target is captured from the dense model in one
  stage, so all of them are independent and 64 workers have work, but the output is not
  the sequential run's (later layers are not calibrated on the pruned earlier ones), and
  the driver holds every input's XᵀX at once.
- The capture passes stay serial: each stage's onnxruntime forward and XᵀX sums run on
  the driver between the stages' reconstructions ("+ serial capture", an estimate from
  the GEMM rates above, linear in --calib-tokens; at {tokens:,} tokens it is most of the
  time on this CPU). Splitting the calibration samples over workers and summing their
  XᵀX would be the next step.
- Where the projection stops holding: (1) memory: a stage's XᵀX and Ray's copy of each
  task's argument (q, k and v each get their own copy of one XᵀX) must fit on the driver;
  70B down alone is 6.6 GB of XᵀX, and factoring it takes about 3 such matrices on the
  worker; one-pass holds every input's (hundreds of GB for 70B); (2) network: one driver
  link carries every byte, and tasks on one node or behind one switch contend; (3)
  stragglers: a stage waits for its slowest task, so a slow or busy node stretches every
  stage; (4) Ray: the per-task overhead is measured on loopback, and worker start-up (a
  task's runtime_env starts new worker processes) is not in the projection; (5) the cost
  model is fitted on shapes up to {max_cols} columns: extrapolating to 28,672 columns
  assumes the same BLAS efficiency there; and even CPU seconds vary from run to run on
  this shared machine (up to 3x for one shape: other jobs on the same physical core and
  the hypervisor count against this process), which the hold-out checks above show.

run time: {elapsed:.0f} s"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one pass over the shapes with cols <= 4096, not two up to "
                             "11008 (1-2 minutes); the demo transformer as the real run")
    parser.add_argument("--link-gbps", type=float, default=10.0,
                        help="ASSUMED network bandwidth of the driver's link, Gbit/s [10]")
    parser.add_argument("--calib-tokens", type=int, default=128 * 2048,
                        help="calibration tokens for the capture estimate [128 x 2048]")
    parser.add_argument("--seq", type=int, default=2048, help="calibration window [2048]")
    parser.add_argument("--real", choices=["auto", "smollm2", "transformer", "none"],
                        default="auto", help="real prune runs, serial vs --ray-address local "
                                             "[auto: both if SmolLM2 is exported]")
    parser.add_argument("--real-blocks", type=int, default=4,
                        help="SmolLM2 blocks pruned in the real run [4]")
    parser.add_argument("--workdir", default="/tmp/onnxprune-lm",
                        help="where tools/export_lm.py wrote SmolLM2 [/tmp/onnxprune-lm]")
    parser.add_argument("--json", help="also write everything as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    bandwidth = args.link_gbps / 8 * GB
    max_cols, max_sweep = (4096, 4096.0 ** 3) if args.quick else (11008, 8192.0 ** 3)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
          file=sys.stderr)

    shapes = {(t.rows, t.cols) for arch in ARCHITECTURES for t in arch.linears()}
    print("sparsegpt reconstruction, 50 % unstructured:", file=sys.stderr)
    with threadpool_limits(1):
        factors, sweeps = measure_reconstruction(shapes, max_cols, max_sweep,
                                                 passes=1 if args.quick else 2)
    factor_model = CostModel.fit(factor_terms, {(0, c): s for c, s in factors.items()})
    sweep_model = CostModel.fit(sweep_terms, sweeps)
    checks = [
        "factor model " + holdout_check(
            factor_terms, {(0, c): s for c, s in factors.items()}, lambda shape: shape[1],
            lambda shape: f"cols {shape[1]}"),
        "sweep model " + holdout_check(
            sweep_terms, sweeps, lambda shape: shape[0] * shape[1] ** 2,
            lambda shape: f"{shape[0]} x {shape[1]}")]

    print("Ray object store and GEMM rates:", file=sys.stderr)
    ray_costs = measure_ray(256 << 20)
    overhead = ray_costs.task_overhead_s if ray_costs else 0.0
    with threadpool_limits(1):
        rates = measure_capture_rates()

    costs_by_arch: dict[str, dict[str, TaskCost]] = {}
    tables: dict[str, list[Row]] = {}
    for arch in ARCHITECTURES:
        costs = {}
        for t in arch.linears():
            measured_sweep = (t.rows, t.cols) in sweeps
            costs[t.name] = TaskCost(
                t, factors.get(t.cols, factor_model(0, t.cols)),
                sweeps.get((t.rows, t.cols), sweep_model(t.rows, t.cols)),
                t.cols in factors, measured_sweep)
        costs_by_arch[arch.name] = costs
        capture_block = capture_seconds(arch, args.calib_tokens, args.seq, rates)
        tables[arch.name] = project(arch, costs, bandwidth, overhead, capture_block)

    smollm2 = tables[ARCHITECTURES[0].name][0].total_s / ARCHITECTURES[0].blocks
    runs = real_runs(args, smollm2)
    elapsed = time.perf_counter() - started

    print_report(args, Measured(factors, sweeps, factor_model, sweep_model, checks, ray_costs,
                                rates), costs_by_arch, tables, runs, bandwidth, overhead,
                 max_cols, elapsed)

    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "elapsed_s": elapsed,
            "factors": {str(k): v for k, v in factors.items()},
            "sweeps": {f"{r}x{c}": v for (r, c), v in sweeps.items()},
            "ray": asdict(ray_costs) if ray_costs else None, "capture_rates": asdict(rates),
            "tables": {name: [asdict(r) for r in rows] for name, rows in tables.items()},
            "real_runs": [asdict(r) for r in runs]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
