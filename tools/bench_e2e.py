"""End-to-end benchmark of `onnxprune prune` against what users would run instead.

Usage: python tools/bench_e2e.py [--workdir DIR] [--params 100e6] [--external-gb 3.2]
                                 [--repeat 3] [--skip-external] [--skip-torch]
                                 [--case all|standard|calibrated-stream]
                                 [--stream-layers 56] [--stream-methods sparsegpt,wanda]

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

5. Calibrated streaming (``--case calibrated-stream``): a residual stack of --stream-layers
   blocks ``h + Relu(LayerNorm(h) @ W)`` with 2048 x 2048 float32 weights in one external
   data file (56 blocks: 940 MB), pruned by ``prune MODEL -o OUT --method M --format compact
   --calib CALIB --calib-mode sequential`` (8 samples of 64 tokens; wanda's default one-pass
   mode holds every target's statistics at once: 56 x 32 MiB here). Target: peak RSS <=
   0.5x the model file. The output must be identical to the in-memory path's
   (``onnxprune.prune(onnx.load(MODEL))``, then saved): every tensor of both, densified, is
   compared bit for bit.
Models are generated with random weights in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
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
TARGET_STREAM_RSS = 0.5


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

def append_external(data, data_name: str, name: str, weights: np.ndarray) -> TensorProto:
    """A float32 initializer whose bytes are appended to the open external data file."""
    offset = data.tell()
    data.write(weights.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(weights.shape),
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", data_name), ("offset", str(offset)),
                       ("length", str(weights.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


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
                tensor = append_external(data, data_name, name, weights)
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


def write_residual_stack(path: Path, layers: int, side: int, seed: int = 0) -> int:
    """`layers` blocks h + Relu(LayerNorm(h) @ W) on x [batch, tokens, side], the [side, side]
    float32 weights in one external data file; returns the model's size on disk."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".weights"
    scale = np.float32(1 / math.sqrt(side))
    norm = [onnx.numpy_helper.from_array(np.ones(side, np.float32), "norm.scale"),
            onnx.numpy_helper.from_array(np.zeros(side, np.float32), "norm.bias")]
    nodes, initializers = [], []
    previous = "x"
    with open(path.parent / data_name, "wb") as data:
        for layer in range(layers):
            weights = rng.standard_normal((side, side), dtype=np.float32) * scale
            name = f"layers.{layer}.weight"
            initializers.append(append_external(data, data_name, name, weights))
            block = f"layers.{layer}"
            nodes += [
                helper.make_node("LayerNormalization", [previous, "norm.scale", "norm.bias"],
                                 [f"{block}.norm"], axis=-1),
                helper.make_node("MatMul", [f"{block}.norm", name], [f"{block}.mm"]),
                helper.make_node("Relu", [f"{block}.mm"], [f"{block}.act"]),
                helper.make_node("Add", [previous, f"{block}.act"], [f"{block}.out"])]
            previous = f"{block}.out"
    shape = ["batch", "tokens", side]
    graph = helper.make_graph(
        nodes, "residual_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, shape)],
        norm + initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path.stat().st_size + (path.parent / data_name).stat().st_size


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


# In memory: the whole model is loaded with its external data, pruned as a ModelProto and
# saved with onnx's own writer (external data, so that a > 2 GB result would also save).
PRUNE_IN_MEMORY = """
import os, sys, onnx, onnxprune
model, out, method, calib = sys.argv[1:]
proto, _ = onnxprune.prune(onnx.load(model), method=method, format="compact", calib=calib,
                           calib_mode="sequential")
onnx.save(proto, out, save_as_external_data=True, all_tensors_to_one_file=True,
          location=os.path.basename(out) + ".data")
"""

# sha256 of every tensor of a model after densifying it, and of its graph without them
DIGEST = """
import hashlib, json, sys, onnx
from onnxprune.formats import densify_model
from onnxprune.io import iter_all_tensors, load_model, read_array
loaded = load_model(sys.argv[1])
densify_model(loaded.proto, loaded.base_dir)
digests = {}
for tensor in iter_all_tensors(loaded.proto.graph):
    array = read_array(tensor, loaded.base_dir)
    digests[tensor.name] = f"{array.dtype}{list(array.shape)}:" + hashlib.sha256(
        array.tobytes()).hexdigest()
graph = onnx.GraphProto()
graph.CopyFrom(loaded.proto.graph)
del graph.initializer[:]
digests["<graph>"] = hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()
print(json.dumps(digests))
"""


def model_digests(model: Path) -> dict[str, str]:
    done = subprocess.run([PY, "-c", DIGEST, str(model)], capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return json.loads(done.stdout)


def bench_calibrated_stream(workdir: Path, layers: int, methods: list[str], rows: list,
                            samples: int = 8, tokens: int = 64) -> None:
    side = 2048
    model, calib = workdir / "stack.onnx", workdir / "stack_calib.npz"
    size = write_residual_stack(model, layers, side)
    rng = np.random.default_rng(1)
    np.savez(calib, x=rng.standard_normal((samples, 1, tokens, side), dtype=np.float32))
    label = (f"calibrated stream, {size / 1e6:.0f} MB external, {layers} x "
             f"{side * side * 4 / MiB:.0f} MiB")
    print(f"{label}: {samples} calibration samples of {tokens} tokens", file=sys.stderr)
    for method in methods:
        streamed, in_memory = workdir / "stack_stream.onnx", workdir / "stack_memory.onnx"
        options = ("--method", method, "--format", "compact", "--calib", str(calib),
                   "--calib-mode", "sequential")
        ours = run_child(prune_command(model, streamed, *options))
        memory = run_child([PY, "-c", PRUNE_IN_MEMORY, str(model), str(in_memory), method,
                            str(calib)])
        ratio = ours.peak_rss / size
        rows.append([f"{label}: {method} compact, time (one run)", f"{ours.seconds:.1f} s",
                     f"{memory.seconds:.1f} s (in memory)", "-", "-", "info"])
        rows.append([f"{label}: {method} compact, peak RSS", mib(ours.peak_rss),
                     f"{mib(memory.peak_rss)} (in memory)", f"{ratio:.2f}x model",
                     f"<= {TARGET_STREAM_RSS}x model", verdict(ratio <= TARGET_STREAM_RSS)])
        ours_digests, memory_digests = model_digests(streamed), model_digests(in_memory)
        differ = sorted(name for name in ours_digests.keys() | memory_digests.keys()
                        if ours_digests.get(name) != memory_digests.get(name))
        rows.append([f"{label}: {method} compact, output vs in-memory path",
                     f"{len(ours_digests) - 1} tensors", "-",
                     f"{len(differ)} differ" + (f" (e.g. {differ[0]})" if differ else ""),
                     "identical", verdict(not differ)])
        remove(streamed, in_memory)


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
    parser.add_argument("--case", choices=("all", "standard", "calibrated-stream"),
                        default="all", help="standard: rows 1-4; calibrated-stream: row 5")
    parser.add_argument("--stream-layers", type=int, default=56,
                        help="2048 x 2048 blocks of the calibrated-stream model [56: 940 MB]")
    parser.add_argument("--stream-methods", default="sparsegpt,wanda",
                        help="calibrated methods to stream, comma-separated [sparsegpt,wanda]")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="onnxprune-bench-", dir=args.workdir))
    rows: list[list[str]] = []
    try:
        print(f"machine: {os.cpu_count()} cores, load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; models in {workdir}",
              file=sys.stderr)
        if args.case in ("all", "standard"):
            inline = bench_inline(workdir, args.params, args.repeat, rows)
            if not args.skip_external:
                bench_external(workdir, args.external_gb, max(1, args.repeat - 1), rows)
            if not args.skip_torch:
                bench_torch(inline, args.repeat, rows)
            bench_startup(workdir, inline, args.repeat, rows)
        if args.case in ("all", "calibrated-stream"):
            bench_calibrated_stream(workdir, args.stream_layers,
                                    args.stream_methods.split(","), rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    print("(time: best of runs interleaved with the baseline's)")
    return 0 if all(row[-1] != "MISS" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
