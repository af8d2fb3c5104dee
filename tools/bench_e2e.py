"""End-to-end benchmark of `onnxprune prune` against what users would run instead.

Usage: python tools/bench_e2e.py [--workdir DIR] [--params 100e6] [--external-gb 3.2]
                                 [--repeat 3] [--skip-external] [--skip-torch]

Every figure comes from a fresh child process: wall time (best of --repeat, runs
interleaved with the baseline's) and peak resident set (``wait4``'s ``ru_maxrss``).

1. Inline model of ~100 M float32 parameters: `onnxprune prune` (magnitude, 50 %) against a
   bare ``onnx.save(onnx.load(in), out)``. Targets: time <= 1.5x, peak RSS <= 2x model.
2. External-data model of >= 3 GB (8192 x 8192 MatMul weights): the same prune against
   ``onnx.load`` + ``onnx.save(..., save_as_external_data=True)``. Target: peak RSS above
   the same command on a tiny copy of the graph (the constant: interpreter, libraries)
   <= 1.5x the largest target.
3. Global magnitude pruning of the inline model's weights, in process, against
   ``torch.nn.utils.prune.global_unstructured(L1Unstructured)`` (when torch is installed).
   Target: >= 5x faster. onnxprune's time includes reading the weights from the file.
4. Start-up: ``python -m onnxprune --help`` (target <= 0.3 s), whether a second run
   compiles numba code, and the end-to-end time with 1 and 2 numba threads (and 2 with
   OpenMP's passive wait policy, which matters on a loaded machine).

onnxprune renames its output into place (atomic) and, like the baselines, does not fsync it
unless asked; the inline case is also timed with `--fsync` for reference.
Models are generated with random weights in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

MiB = 1 << 20
TARGET_INLINE_TIME = 1.5
TARGET_INLINE_RSS = 2.0
TARGET_EXTERNAL_RSS = 1.5
TARGET_TORCH_SPEEDUP = 5.0
TARGET_HELP_SECONDS = 0.3


@dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes


# A child's peak RSS counts the RSS of the process that started it (exec records the old
# address space's high-water mark), so children are started by this small launcher, not by
# the benchmark process that holds the models.
LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - start
print(os.waitstatus_to_exitcode(status), seconds, usage.ru_maxrss * 1024)
"""


def run_child(args: list[str], env: dict | None = None) -> Run:
    """Run a command to the end; its wall time and peak resident set."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                          **(env or {})})
    try:
        status, seconds, peak = done.stdout.split()
    except ValueError:
        status, seconds, peak = "launcher", "0", "0"
    if done.returncode or status != "0":
        raise RuntimeError(f"{' '.join(args)} failed ({status}): {done.stderr}")
    return Run(float(seconds), int(peak))


def remove(*paths: Path) -> None:
    for path in paths:
        for candidate in (path, Path(f"{path}.data")):
            candidate.unlink(missing_ok=True)


def best_of(runs: list[Run]) -> Run:
    return Run(min(r.seconds for r in runs), max(r.peak_rss for r in runs))


def compare(make_baseline, make_ours, outputs: list[Path], repeat: int) -> tuple[Run, Run]:
    """Interleave baseline and onnxprune runs; outputs deleted before each (not timed)."""
    baseline, ours = [], []
    for _ in range(repeat):
        for runs, make in ((baseline, make_baseline), (ours, make_ours)):
            remove(*outputs)
            subprocess.run(["sync"], check=False)
            runs.append(make())
    remove(*outputs)
    return best_of(baseline), best_of(ours)


# --- models ------------------------------------------------------------------------------

def write_chain(path: Path, layers: int, side: int, external: bool, seed: int = 0) -> int:
    """MatMul chain of `layers` [side, side] float32 weights; returns the weight bytes."""
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    previous = "x"
    data_name = path.name + ".weights"
    data = open(path.parent / data_name, "wb") if external else None  # noqa: SIM115
    try:
        for layer in range(layers):
            weights = rng.standard_normal((side, side), dtype=np.float32)
            name = f"layers.{layer}.weight"
            if external:
                offset = data.tell()
                data.write(weights.tobytes())
                tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[side, side],
                                     data_location=TensorProto.EXTERNAL)
                for key, value in (("location", data_name), ("offset", str(offset)),
                                   ("length", str(weights.nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
            else:
                tensor = onnx.numpy_helper.from_array(weights, name)
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [previous, name], [f"h{layer}"]))
            previous = f"h{layer}"
    finally:
        if data is not None:
            data.close()
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, side])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, side])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return layers * side * side * 4


# --- rows --------------------------------------------------------------------------------

PY = sys.executable
LOAD_SAVE = "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
LOAD_SAVE_EXTERNAL = ("import onnx, sys, os; onnx.save(onnx.load(sys.argv[1]), sys.argv[2], "
                      "save_as_external_data=True, all_tensors_to_one_file=True, "
                      "location=os.path.basename(sys.argv[2]) + '.data')")


def prune_command(model: Path, out: Path, *options: str) -> list[str]:
    return [PY, "-m", "onnxprune", "prune", str(model), "-o", str(out), "-q", *options]


def bench_inline(workdir: Path, params: float, repeat: int, rows: list) -> Path:
    side = 4096
    layers = max(1, round(params / side / side))
    model = workdir / "inline.onnx"
    size = write_chain(model, layers, side, external=False)
    base_out, our_out = workdir / "inline_base.onnx", workdir / "inline_ours.onnx"
    baseline, ours = compare(lambda: run_child([PY, "-c", LOAD_SAVE, str(model), str(base_out)]),
                             lambda: run_child(prune_command(model, our_out)),
                             [base_out, our_out], repeat)
    label = f"inline {layers * side * side / 1e6:.0f} M params ({size / MiB:.0f} MiB)"
    time_ratio = ours.seconds / baseline.seconds
    rss_ratio = ours.peak_rss / size
    rows.append([f"{label}: time", f"{ours.seconds:.2f} s", f"{baseline.seconds:.2f} s",
                 f"{time_ratio:.2f}x", f"<= {TARGET_INLINE_TIME}x",
                 verdict(time_ratio <= TARGET_INLINE_TIME)])
    rows.append([f"{label}: peak RSS", mib(ours.peak_rss), mib(baseline.peak_rss),
                 f"{rss_ratio:.2f}x model", f"<= {TARGET_INLINE_RSS}x model",
                 verdict(rss_ratio <= TARGET_INLINE_RSS)])
    _, durable = compare(lambda: run_child([PY, "-c", LOAD_SAVE, str(model), str(base_out)]),
                         lambda: run_child(prune_command(model, our_out, "--fsync")),
                         [base_out, our_out], repeat)
    rows.append([f"{label}: time with --fsync", f"{durable.seconds:.2f} s",
                 f"{baseline.seconds:.2f} s", f"{durable.seconds / baseline.seconds:.2f}x", "-",
                 "info"])
    return model


def bench_external(workdir: Path, gigabytes: float, repeat: int, rows: list) -> None:
    side = 8192
    target = side * side * 4
    layers = max(1, math.ceil(gigabytes * 1e9 / target))
    model, tiny = workdir / "external.onnx", workdir / "tiny.onnx"
    size = write_chain(model, layers, side, external=True)
    write_chain(tiny, layers, 64, external=True)
    base_out, our_out = workdir / "external_base.onnx", workdir / "external_ours.onnx"
    baseline, ours = compare(
        lambda: run_child([PY, "-c", LOAD_SAVE_EXTERNAL, str(model), str(base_out)]),
        lambda: run_child(prune_command(model, our_out)), [base_out, our_out], repeat)
    constant = min(run_child(prune_command(tiny, workdir / "tiny_out.onnx", "--min-size", "16")
                             ).peak_rss for _ in range(2))
    remove(workdir / "tiny_out.onnx")
    label = f"external {size / 1e9:.1f} GB, {layers} x {target / MiB:.0f} MiB"
    above = (ours.peak_rss - constant) / target
    rows.append([f"{label}: time", f"{ours.seconds:.2f} s", f"{baseline.seconds:.2f} s",
                 f"{ours.seconds / baseline.seconds:.2f}x", "-", "info"])
    rows.append([f"{label}: peak RSS", mib(ours.peak_rss), mib(baseline.peak_rss),
                 f"{above:.2f}x target + {mib(constant)}",
                 f"<= {TARGET_EXTERNAL_RSS}x target + c", verdict(above <= TARGET_EXTERNAL_RSS)])


def bench_torch(model: Path, repeat: int, rows: list) -> None:
    """Global 50 % magnitude pruning of the same weights, in this process."""
    try:
        import torch
        from torch.nn.utils import prune as torch_prune
    except ImportError:
        print("torch is not installed: skipping the torch comparison", file=sys.stderr)
        return
    from onnxprune.config import PruneConfig
    from onnxprune.io import load_model, read_array
    from onnxprune.pipeline import run

    class Discard:  # the weights go nowhere: only the pruning is timed
        def put(self, target, weights, plan):
            return None

    config = PruneConfig(sparsity=0.5, scope="global")
    loaded = load_model(model, lazy=True)
    run(loaded, config, sink=Discard())  # numba warm-up

    def ours() -> None:
        run(load_model(model, lazy=True), config, sink=Discard())

    arrays = [read_array(t, loaded.base_dir, writable=True) for t in loaded.proto.graph.initializer]

    def theirs() -> float:
        modules = [torch.nn.Linear(a.shape[0], a.shape[1], bias=False) for a in arrays]
        with torch.no_grad():
            for module, array in zip(modules, arrays, strict=True):
                module.weight.copy_(torch.from_numpy(array))
        start = time.perf_counter()
        torch_prune.global_unstructured([(m, "weight") for m in modules],
                                        pruning_method=torch_prune.L1Unstructured, amount=0.5)
        return time.perf_counter() - start

    our_times, their_times = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        ours()
        our_times.append(time.perf_counter() - start)
        their_times.append(theirs())
    ours_s, theirs_s = min(our_times), min(their_times)
    speedup = theirs_s / ours_s
    numel = sum(a.size for a in arrays)
    rows.append([f"global magnitude 50 %, {numel / 1e6:.0f} M weights vs torch "
                 f"{torch.__version__} ({torch.get_num_threads()} threads)",
                 f"{ours_s:.2f} s", f"{theirs_s:.2f} s", f"{speedup:.1f}x faster",
                 f">= {TARGET_TORCH_SPEEDUP}x", verdict(speedup >= TARGET_TORCH_SPEEDUP)])


def bench_startup(workdir: Path, model: Path, repeat: int, rows: list) -> None:
    help_time = min(run_child([PY, "-m", "onnxprune", "--help"]).seconds for _ in range(7))
    rows.append(["`python -m onnxprune --help`", f"{help_time:.3f} s", "-", "-",
                 f"<= {TARGET_HELP_SECONDS} s", verdict(help_time <= TARGET_HELP_SECONDS)])

    small = workdir / "small.onnx"
    write_chain(small, 2, 256, external=False)
    out = workdir / "small_out.onnx"
    commands = [prune_command(small, out, *options) for options in
                ((), ("--scope", "global"), ("--pattern", "2:4", "--method", "random"))]
    compiled = loaded = 0
    for debug in (False, True):  # the first round compiles whatever is not cached yet
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                       "NUMBA_DEBUG_CACHE": "1" if debug else "0"})
            remove(out)
            compiled += debug * (done.stdout + done.stderr).count("data saved to")
            loaded += debug * (done.stdout + done.stderr).count("data loaded from")
    rows.append(["second run (layer, global, 2:4): numba kernels compiled", str(compiled),
                 f"{loaded} loaded from cache", "-", "0", verdict(compiled == 0)])

    our_out = model.with_name("threads.onnx")
    settings = {"1 thread": {"NUMBA_NUM_THREADS": "1"}, "2 threads": {"NUMBA_NUM_THREADS": "2"},
                "2, passive": {"NUMBA_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}}
    times = {}
    for _ in range(repeat):
        for label, env in settings.items():  # interleaved: the machine's load drifts
            remove(our_out)
            seconds = run_child(prune_command(model, our_out), env=env).seconds
            times[label] = min(times.get(label, seconds), seconds)
    remove(our_out)
    one = times["1 thread"]
    rows.append(["inline prune, NUMBA_NUM_THREADS=1 vs 2", f"{times['2 threads']:.2f} s (2)",
                 f"{one:.2f} s (1)", f"{one / times['2 threads']:.2f}x with 2", "-", "info"])
    rows.append(["  the same, 2 threads, OMP_WAIT_POLICY=PASSIVE",
                 f"{times['2, passive']:.2f} s (2)", f"{one:.2f} s (1)",
                 f"{one / times['2, passive']:.2f}x with 2", "-", "info"])


# --- output ------------------------------------------------------------------------------

def mib(n: int) -> str:
    return f"{n / MiB:,.0f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(rows: list[list[str]]) -> None:
    header = ["measure", "onnxprune", "baseline", "ratio", "target", ""]
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to generate the models (default: a temporary directory)")
    parser.add_argument("--params", type=float, default=100e6,
                        help="parameters of the inline model [100e6]")
    parser.add_argument("--external-gb", type=float, default=3.2,
                        help="size of the external-data model in GB [3.2]")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measure [3]")
    parser.add_argument("--skip-external", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="onnxprune-bench-", dir=args.workdir))
    rows: list[list[str]] = []
    try:
        print(f"machine: {os.cpu_count()} cores, load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; models in {workdir}",
              file=sys.stderr)
        inline = bench_inline(workdir, args.params, args.repeat, rows)
        if not args.skip_external:
            bench_external(workdir, args.external_gb, max(1, args.repeat - 1), rows)
        if not args.skip_torch:
            bench_torch(inline, args.repeat, rows)
        bench_startup(workdir, inline, args.repeat, rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    print("(time: best of runs interleaved with the baseline's)")
    return 0 if all(row[-1] != "MISS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
