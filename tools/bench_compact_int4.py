"""Compact int4: file sizes of int4 models pruned dense and compact, against the entropy bound.

A float MLP (`--layers` MatMuls of `--hidden` x `--hidden`, ReLU between) is quantized by
onnxruntime's tools to int4 weights: `quantize_static` QDQ per channel (opset 21: the
rebuild ends in a Cast to int4) and the same at opset 17 (onnxruntime writes its
com.microsoft DequantizeLinear; the rebuild ends in its QuantizeLinear), and
`MatMulNBitsQuantizer` in QDQ form (symmetric blocks of 32). Each is pruned by magnitude
to 50 % and to 2:4, written dense (`--format dense`) and compact, and checked: onnxruntime
gives bit-identical outputs for both, and `densify` gives back the dense file's tensors
byte for byte.

Columns: the file bytes dense and compact; "targets": the stored bytes of the pruned
weights compact against dense (int4, two to a byte); the file's entropy bound: every byte
that is not a pruned target (graph, scales, the rebuild nodes) plus, per target, 4 bits a
kept value + H(sparsity) bits a position (`inspect --json`'s `format_bytes.entropy_bound`),
for 2:4 the smaller of that and 4-bit values + log2(6) bits per group of 4; "x bound" =
compact file / bound, "targets x bound" the same for the pruned weights alone.

    python tools/bench_compact_int4.py [--layers 4] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxprune.cli import main as onnxprune  # noqa: E402

NM_POSITION_BITS = math.log2(6) / 4  # a position of 2:4, per weight
FORMS = ("qdq-channel-21", "qdq-channel-17", "nbits-qdq")


def float_model(path: Path, layers: int, hidden: int) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for layer in range(layers):
        weight = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"W{layer}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{layer}"], [f"h{layer}"]))
        current = f"h{layer}"
        if layer < layers - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{layer}"]))
            current = f"r{layer}"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, hidden])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [8, hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def quantize(source: Path, out: Path, form: str, hidden: int) -> None:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"x": rng.standard_normal((8, hidden)).astype(np.float32)}
                                 for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    if form == "nbits-qdq":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=True,
                                         quant_format=q.QuantFormat.QDQ)
        quantizer.process()
        onnx.save(quantizer.model.model, out)
        return
    if form.endswith("-21"):
        converted = out.with_name("float-21.onnx")
        onnx.save(onnx.version_converter.convert_version(onnx.load(source), 21), converted)
        source = converted
    q.quantize_static(str(source), str(out), Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, weight_type=q.QuantType.QInt4)


def outputs(path: Path, hidden: int) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((8, hidden)).astype(np.float32)
    return session.run(None, {"x": x})


def inspected(path: Path, folder: Path) -> list[dict]:
    report = folder / "inspect.json"
    with report.open("w") as out:
        saved, sys.stdout = sys.stdout, out
        try:
            assert onnxprune(["inspect", str(path), "--json", "--min-size", "4096"]) == 0
        finally:
            sys.stdout = saved
    return json.loads(report.read_text())["targets"]


def measure(quantized: Path, pattern: str, folder: Path, hidden: int) -> dict:
    option = ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    files = {fmt: folder / f"{fmt}.onnx" for fmt in ("dense", "compact")}
    for fmt, out in files.items():
        assert onnxprune(["prune", str(quantized), "-o", str(out), *option, "-q",
                          "--min-size", "4096", "--format", fmt]) == 0
    same = all(np.array_equal(a, b) for a, b in zip(outputs(files["dense"], hidden),
                                                    outputs(files["compact"], hidden),
                                                    strict=True))
    back = folder / "back.onnx"
    assert onnxprune(["densify", str(files["compact"]), "-o", str(back), "-q"]) == 0
    tensors = [{t.name: t.SerializeToString() for t in onnx.load(path).graph.initializer}
               for path in (files["dense"], back)]
    targets = inspected(files["compact"], folder)
    stored = sum(t["bytes"] for t in targets)
    dense_targets = sum(t["format_bytes"]["dense"] for t in targets)
    floor = 0.0
    for t in targets:
        bound = float(t["format_bytes"]["entropy_bound"])
        if ":" in pattern:
            nnz = t["numel"] - t["zeros"]
            bound = min(bound, nnz / 2 + t["numel"] * NM_POSITION_BITS / 8)
        floor += bound
    compact_bytes = files["compact"].stat().st_size
    return {"dense": files["dense"].stat().st_size, "compact": compact_bytes,
            "targets": stored / dense_targets, "bound": compact_bytes - stored + floor,
            "targets_bound": stored / floor, "formats": sorted({t["format"] for t in targets}),
            "identical": same, "densify": tensors[0] == tensors[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int4-") as tmp:
        folder = Path(tmp)
        source = folder / "float.onnx"
        float_model(source, args.layers, args.hidden)
        for form in FORMS:
            quantized = folder / f"{form}.onnx"
            quantize(source, quantized, form, args.hidden)
            for pattern in ("0.5", "2:4"):
                work = folder / f"{form}-{pattern.replace(':', '_')}"
                work.mkdir()
                rows.append({"form": form, "pattern": pattern,
                             **measure(quantized, pattern, work, args.hidden)})
    print(f"{args.layers} x MatMul {args.hidden} x {args.hidden}, int4\n")
    print("| form | pruned | dense bytes | compact bytes | compact / dense | targets | "
          "× bound | targets × bound | stored as | outputs identical | densify exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        pruned = "2:4" if ":" in r["pattern"] else f"{float(r['pattern']):.0%}"
        print(f"| {r['form']} | {pruned} | {r['dense']:,} | {r['compact']:,} | "
              f"{r['compact'] / r['dense']:.3f} | {r['targets']:.3f} | "
              f"{r['compact'] / r['bound']:.3f} | {r['targets_bound']:.3f} | "
              f"{', '.join(r['formats'])} | {r['identical']} | {r['densify']} |")
    return 0 if all(r["identical"] and r["densify"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
