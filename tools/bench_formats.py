"""Benchmark the storage formats on a synthetic 50 M-parameter model.

For each pruning level (unstructured 50/90/95/99 % and 2:4) the model is written dense
(zeros in place), sparse and compact; the table gives the file size against dense and
against the entropy bound of its weights, session-creation time (wall clock, and CPU time
of all threads, which other jobs on the machine disturb less) and inference latency
against dense-with-zeros (timed alternating in one process, medians), the peak memory a
fresh process adds while creating the session, and checks that every format gives
exactly the dense outputs and that onnxruntime folded every rebuild.

    python tools/bench_formats.py [--layers 6] [--hidden 4096] [--ffn 2048] [--repeats 7]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxprune import formats  # noqa: E402
from onnxprune.config import Pattern  # noqa: E402
from onnxprune.formats.graphs import bits_of, make_tensor  # noqa: E402
from onnxprune.io import model_file_bytes, model_from_proto, read_array, save_model  # noqa: E402
from onnxprune.targets import discover_targets  # noqa: E402

FORMAT_NAMES = ("dense", "sparse", "compact")


def build_model(layers: int, hidden: int, ffn: int, batch: int, seed: int,
                dtype: str = "float32") -> onnx.ModelProto:
    """An MLP stack x -> [MatMul W_up [hidden, ffn] -> Relu -> MatMul W_down [ffn, hidden]]*.

    float16 and bfloat16 weights are stored in that type and read through a Cast to float.
    """
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    nodes, initializers, x = [], [], "x"
    for layer in range(layers // 2):
        for name, shape in ((f"layer{layer}.up.weight", (hidden, ffn)),
                            (f"layer{layer}.down.weight", (ffn, hidden))):
            weight = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])
            initializers.append(make_tensor(name, weight.astype(np_dtype), doc=""))
            read = name
            if dtype != "float32":
                read = name + ".float"
                nodes.append(helper.make_node("Cast", [name], [read], to=TensorProto.FLOAT))
            out = f"{name}.out"
            nodes.append(helper.make_node("MatMul", [x, read], [out], name=f"{name}.matmul"))
            x = out
            if shape[1] == ffn:
                nodes.append(helper.make_node("Relu", [x], [x + ".relu"]))
                x += ".relu"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, hidden])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def magnitude_prune(weights: np.ndarray, level: str, reduction_axis: int) -> np.ndarray:
    """Zero the smallest weights: a fraction of all of them, or N of every M along the axis."""
    pruned = weights.copy()
    if ":" in level:
        n, m = map(int, level.split(":"))
        moved = np.moveaxis(pruned, reduction_axis, -1)
        groups = np.ascontiguousarray(moved).reshape(-1, m)
        drop = np.argpartition(np.abs(groups), m - n - 1, axis=1)[:, :m - n]
        np.put_along_axis(groups, drop, 0, axis=1)
        return np.ascontiguousarray(np.moveaxis(groups.reshape(moved.shape), -1,
                                                reduction_axis))
    k = int(round(float(level) * pruned.size))
    flat = pruned.reshape(-1)
    if k:
        flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
    return pruned


def write_formats(dense_model: onnx.ModelProto, level: str, directory: Path
                  ) -> tuple[dict[str, Path], float, Counter]:
    """Prune once, write one file per format; return paths, entropy bound, forms used."""
    pattern = Pattern.parse(level) if ":" in level else Pattern()
    pruned = onnx.ModelProto()
    pruned.CopyFrom(dense_model)
    targets, _ = discover_targets(pruned)
    arrays = {}
    for target in targets:
        arrays[target.name] = magnitude_prune(read_array(target.tensor, directory), level,
                                              target.reduction_axis)
    bound = sum(formats.entropy_bound_bytes(a.size, int(np.count_nonzero(bits_of(a))),
                                            a.itemsize) for a in arrays.values())
    paths, forms = {}, Counter()
    for fmt in FORMAT_NAMES:
        model = onnx.ModelProto()
        model.CopyFrom(pruned)
        for target in discover_targets(model)[0]:
            result = formats.store(target, arrays[target.name], fmt, pattern, model=model)
            forms[f"{fmt}:{result.format}"] += 1
        path = directory / f"{level.replace(':', 'of')}_{fmt}.onnx"
        save_model(model_from_proto(model, directory), path)
        paths[fmt] = path
        del model
    return paths, bound, forms


def time_sessions(paths: dict[str, Path], feeds: dict, repeats: int, runs: int) -> dict:
    """Session creation and inference latency per format, alternating formats each round."""
    import onnxruntime as ort

    created = {fmt: [] for fmt in paths}
    created_cpu = {fmt: [] for fmt in paths}
    latency = {fmt: [] for fmt in paths}
    outputs = {}
    for _ in range(repeats):
        for fmt, path in paths.items():
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            created[fmt].append(time.perf_counter() - start)
            created_cpu[fmt].append(time.process_time() - start_cpu)
            outputs[fmt] = session.run(None, feeds)[0]
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, feeds)
                latency[fmt].append(time.perf_counter() - start)
            del session
    equal = {fmt: bool(np.array_equal(outputs[fmt], outputs["dense"])) for fmt in paths}
    return {"create": {f: statistics.median(v) for f, v in created.items()},
            "create_cpu": {f: statistics.median(v) for f, v in created_cpu.items()},
            "latency": {f: statistics.median(v) for f, v in latency.items()},
            "equal": equal}


_PEAK_SCRIPT = """
import sys, onnxruntime as ort
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
print(status("VmHWM") - before)
"""


def peak_session_bytes(path: Path) -> int | None:
    """Peak resident memory a fresh process adds while it creates the session (Linux)."""
    if not Path("/proc/self/status").exists():
        return None
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path)], capture_output=True,
                          text=True, check=False)
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16",
                                                               "bfloat16"))
    parser.add_argument("--levels", default="0.5,0.9,0.95,0.99,2:4")
    parser.add_argument("--repeats", type=int, default=7, help="session creations per format")
    parser.add_argument("--runs", type=int, default=10, help="inferences per session")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    dense_model = build_model(args.layers, args.hidden, args.ffn, args.batch, args.seed,
                              args.dtype)
    params = sum(int(np.prod(t.dims)) for t in dense_model.graph.initializer)
    feeds = {"x": np.random.default_rng(1).standard_normal((args.batch, args.hidden),
                                                           dtype=np.float32)}
    print(f"model: {args.layers} MatMuls, {params / 1e6:.1f} M {args.dtype} parameters; "
          f"onnxruntime {ort.__version__}, {args.repeats} session creations x {args.runs} runs "
          "per format, alternating")
    header = ("level", "format", "file MB", "x dense", "x entropy", "create s", "x dense",
              "cpu s", "x dense", "peak MB", "latency ms", "x dense", "exact", "forms")
    rows = [header]
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        for level in args.levels.split(","):
            directory = Path(tmp) / level.replace(":", "of")
            directory.mkdir()
            paths, bound, forms = write_formats(dense_model, level, directory)
            unfolded = formats.unfolded_rebuild_nodes(paths["compact"])
            timing = time_sessions(paths, feeds, args.repeats, args.runs)
            dense_bytes = model_file_bytes(paths["dense"])
            for fmt in FORMAT_NAMES:
                size = model_file_bytes(paths[fmt])
                peak = peak_session_bytes(paths[fmt])
                used = ", ".join(f"{n}x {k.split(':', 1)[1]}" for k, n in sorted(forms.items())
                                 if k.startswith(fmt + ":"))
                rows.append((level, fmt, f"{size / 1e6:.1f}", f"{size / dense_bytes:.3f}",
                             f"{size / bound:.3f}", f"{timing['create'][fmt]:.3f}",
                             f"{timing['create'][fmt] / timing['create']['dense']:.2f}",
                             f"{timing['create_cpu'][fmt]:.3f}",
                             f"{timing['create_cpu'][fmt] / timing['create_cpu']['dense']:.2f}",
                             "-" if peak is None else f"{peak / 1e6:.0f}",
                             f"{timing['latency'][fmt] * 1e3:.2f}",
                             f"{timing['latency'][fmt] / timing['latency']['dense']:.2f}",
                             "yes" if timing["equal"][fmt] else "NO", used))
            if unfolded:
                print(f"{level}: {len(unfolded)} rebuild nodes NOT folded: {unfolded[:5]}")
            print(f"{level}: entropy bound {bound / 1e6:.1f} MB", file=sys.stderr)
            for path in paths.values():
                path.unlink()
                Path(str(path) + ".data").unlink(missing_ok=True)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(str(cell).rjust(w) if 1 < i < 13 else str(cell).ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
