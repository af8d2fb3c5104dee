"""Time and peak memory of SparseGPT: one large layer, and a whole ~135 M-parameter LM.

    python tools/bench_sparsegpt.py                 # both cases
    python tools/bench_sparsegpt.py --case layer    # 4096 x 4096, 64k calibration tokens
    python tools/bench_sparsegpt.py --case lm --samples 64 --seq 256 [--external]

Each case runs in its own process so that its peak RSS (ru_maxrss) is its own.

layer: streams 64k tokens of 4096 features (a few high-variance features) into H = XᵀX in
    chunks, then prunes a 4096 x 4096 float32 matrix at 50 % and at 2:4.
lm: builds a synthetic decoder-only LM with the shapes of SmolLM-135M (hidden 576, 30 layers,
    9 query / 3 key-value heads, SwiGLU 1536, vocabulary 49152, tied embedding; random
    weights, RMSNorm, causal attention), as torch's dynamo exporter lays it out (weights as
    MatMul B [K, N] initializers), saves it, then loads it and prunes all 210 linear layers
    with sparsegpt at 50 % in the default sequential mode, on random token ids.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_layer(size: int, tokens: int) -> dict:
    from onnxprune.calib import CHUNK_ROWS, ActivationStats, relative_output_error
    from onnxprune.methods.sparsegpt import sparsegpt_prune

    rng = np.random.default_rng(0)
    scale = np.exp(rng.normal(0, 1, size)).astype(np.float32)
    weights = (rng.standard_normal((size, size), dtype=np.float32) / np.sqrt(size))
    stats = ActivationStats(1, size, hessian=True)
    started = time.perf_counter()
    for start in range(0, tokens, CHUNK_ROWS):
        count = min(CHUNK_ROWS, tokens - start)
        stats.add(0, rng.standard_normal((count, size), dtype=np.float32) * scale)
    accumulate = time.perf_counter() - started
    result = {"case": f"layer {size}x{size}", "tokens": tokens,
              "H_accumulation_s": round(accumulate, 2)}
    for label, kwargs in (("50%", {"sparsity": 0.5}), ("2:4", {"keep_n": 2, "group_m": 4})):
        started = time.perf_counter()
        pruned = sparsegpt_prune(weights, stats.hessian[0], **kwargs)
        result[f"sparsegpt_{label}_s"] = round(time.perf_counter() - started, 2)
        lost, total = relative_output_error(weights, pruned, stats.hessian[0])
        result[f"error_{label}"] = round(lost / total, 5)
        del pruned
    result["peak_rss_mb"] = round(peak_rss_mb())
    return result


# ------------------------------------------------------------------ synthetic LM

def build_lm(path: Path, *, layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536,
             vocab=49152, seed=0, external: bool = False) -> int:
    """Write the synthetic LM to `path`; returns its parameter count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    group = heads // kv_heads
    nodes, inits = [], []
    params = 0

    def weight(name, shape, std=0.02):
        nonlocal params
        array = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
        inits.append(numpy_helper.from_array(array, name))
        params += array.size
        return name

    def const(name, values, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=f"/{name}", **attrs))
        return name

    def rms_norm(x, prefix):
        norm_weight = f"{prefix}.weight"
        inits.append(numpy_helper.from_array(np.ones(hidden, np.float32), norm_weight))
        squared = node("Mul", [x, x], f"{prefix}/sq")
        mean = node("ReduceMean", [squared], f"{prefix}/mean", axes=[-1], keepdims=1)
        shifted = node("Add", [mean, "eps"], f"{prefix}/add")
        root = node("Sqrt", [shifted], f"{prefix}/sqrt")
        inverse = node("Reciprocal", [root], f"{prefix}/inv")
        scaled = node("Mul", [x, inverse], f"{prefix}/scaled")
        return node("Mul", [scaled, norm_weight], f"{prefix}/out")

    const("eps", [1e-5], np.float32)
    const("scale", [1.0 / np.sqrt(head_dim)], np.float32)
    const("big", [1e9], np.float32)
    const("one", [1.0], np.float32)
    const("idx1", [1])
    const("shape_q", [1, -1, kv_heads, group, head_dim])
    const("shape_kv", [1, -1, kv_heads, 1, head_dim])
    const("shape_out", [1, -1, hidden])
    embed = weight("model.embed_tokens.weight", (vocab, hidden))
    hidden_state = node("Gather", [embed, "input_ids"], "embed")
    # causal mask [T, T]: 0 on and below the diagonal, -1e9 above
    ids_shape = node("Shape", ["input_ids"], "mask/shape")
    seq = node("Gather", [ids_shape, "idx1"], "mask/seq")
    square = node("Concat", [seq, seq], "mask/square", axis=0)
    ones = node("ConstantOfShape", [square], "mask/ones",
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
    lower = node("Trilu", [ones], "mask/lower", upper=0)
    minus = node("Sub", [lower, "one"], "mask/minus")
    mask = node("Mul", [minus, "big"], "mask/mask")

    for layer in range(layers):
        p = f"model.layers.{layer}"
        normed = rms_norm(hidden_state, f"{p}.input_layernorm")
        q = node("MatMul", [normed, weight(f"{p}.self_attn.q_proj.weight", (hidden, hidden))],
                 f"{p}/q")
        k = node("MatMul", [normed, weight(f"{p}.self_attn.k_proj.weight",
                                           (hidden, kv_heads * head_dim))], f"{p}/k")
        v = node("MatMul", [normed, weight(f"{p}.self_attn.v_proj.weight",
                                           (hidden, kv_heads * head_dim))], f"{p}/v")
        q5 = node("Transpose", [node("Reshape", [q, "shape_q"], f"{p}/q5r")], f"{p}/q5",
                  perm=[0, 2, 3, 1, 4])  # [1, kv, group, T, d]
        k5 = node("Transpose", [node("Reshape", [k, "shape_kv"], f"{p}/k5r")], f"{p}/k5",
                  perm=[0, 2, 3, 4, 1])  # [1, kv, 1, d, T]
        v5 = node("Transpose", [node("Reshape", [v, "shape_kv"], f"{p}/v5r")], f"{p}/v5",
                  perm=[0, 2, 3, 1, 4])  # [1, kv, 1, T, d]
        scores = node("Mul", [node("MatMul", [q5, k5], f"{p}/qk"), "scale"], f"{p}/scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}/masked")], f"{p}/probs",
                     axis=-1)
        context = node("MatMul", [probs, v5], f"{p}/context")  # [1, kv, group, T, d]
        merged = node("Reshape", [node("Transpose", [context], f"{p}/ctxT",
                                       perm=[0, 3, 1, 2, 4]), "shape_out"], f"{p}/merged")
        attn = node("MatMul", [merged, weight(f"{p}.self_attn.o_proj.weight", (hidden, hidden))],
                    f"{p}/o")
        hidden_state = node("Add", [hidden_state, attn], f"{p}/residual1")
        normed = rms_norm(hidden_state, f"{p}.post_attention_layernorm")
        gate = node("MatMul", [normed, weight(f"{p}.mlp.gate_proj.weight",
                                              (hidden, intermediate))], f"{p}/gate")
        up = node("MatMul", [normed, weight(f"{p}.mlp.up_proj.weight",
                                            (hidden, intermediate))], f"{p}/up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sig")], f"{p}/silu")
        product = node("Mul", [silu, up], f"{p}/swiglu")
        down = node("MatMul", [product, weight(f"{p}.mlp.down_proj.weight",
                                               (intermediate, hidden))], f"{p}/down")
        hidden_state = node("Add", [hidden_state, down], f"{p}/residual2")
    final = rms_norm(hidden_state, "model.norm")
    tied = node("Transpose", [embed], "lm_head/transpose", perm=[1, 0])
    node("MatMul", [final, tied], "logits")
    graph = helper.make_graph(
        nodes, "synthetic_lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path), save_as_external_data=external,
              location=path.name + ".data", size_threshold=1024)
    return params


def bench_lm(samples: int, seq: int, workdir: Path) -> dict:
    import logging

    from onnxprune.config import PruneConfig
    from onnxprune.io import load_model, save_model
    from onnxprune.pipeline import run

    path = workdir / "synthetic_lm.onnx"
    model_bytes = sum(p.stat().st_size for p in workdir.glob("synthetic_lm.onnx*"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rng = np.random.default_rng(1)
    feeds = [{"input_ids": rng.integers(0, 49152, (1, seq), dtype=np.int64)}
             for _ in range(samples)]
    started = time.perf_counter()
    loaded = load_model(path, lazy=True)  # as `onnxprune prune MODEL -o OUT` loads it
    targets = run(loaded, PruneConfig(method="sparsegpt", sparsity=0.5), feeds=feeds).targets
    pruned_at = time.perf_counter()
    peak_before_save = peak_rss_mb()
    save_model(loaded, workdir / "pruned.onnx")
    total = time.perf_counter() - started
    errors = [t.reconstruction_error for t in targets]
    zeros = sum(t.zeros for t in targets)
    numel = sum(t.numel for t in targets)
    layout = "external data" if Path(str(path) + ".data").exists() else "inline"
    return {"case": f"synthetic LM (SmolLM-135M shapes, {layout})",
            "model_mb": round(model_bytes / 2**20),
            "targets": len(targets), "pruned_params": numel, "sparsity": round(zeros / numel, 4),
            "calibration": f"{samples} x {seq} = {samples * seq} tokens",
            "prune_s": round(pruned_at - started, 1), "with_save_s": round(total, 1),
            "layer_work_s": round(sum(t.seconds for t in targets), 1),
            "median_error": round(float(np.median(errors)), 4),
            "peak_rss_before_save_mb": round(peak_before_save),
            "peak_rss_mb": round(peak_rss_mb()),
            "peak_rss_x_model": round(peak_rss_mb() * 2**20 / model_bytes, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("layer", "lm", "all"), default="all")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--external", action="store_true",
                        help="save the synthetic LM with external data, as large exports are")
    parser.add_argument("--worker", choices=("layer", "lm", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "layer":
        print(json.dumps(bench_layer(args.size, args.tokens)))
        return
    if args.worker == "build":
        params = build_lm(Path(args.workdir) / "synthetic_lm.onnx", external=args.external)
        print(json.dumps({"params": params}))
        return
    if args.worker == "lm":
        print(json.dumps(bench_lm(args.samples, args.seq, Path(args.workdir))))
        return

    def child(*extra: str) -> dict:
        command = [sys.executable, __file__, *extra, "--size", str(args.size), "--tokens",
                   str(args.tokens), "--samples", str(args.samples), "--seq", str(args.seq)]
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        return json.loads(output.strip().splitlines()[-1])

    import numba
    print(f"cores: {numba.config.NUMBA_NUM_THREADS}, numpy {np.__version__}")
    if args.case in ("layer", "all"):
        print(json.dumps(child("--worker", "layer"), indent=1))
    if args.case in ("lm", "all"):
        with tempfile.TemporaryDirectory() as workdir:
            started = time.perf_counter()
            built = child("--worker", "build", "--workdir", workdir,
                          *(["--external"] if args.external else []))
            print(f"built synthetic LM: {built['params']:,} parameters in "
                  f"{time.perf_counter() - started:.0f} s")
            print(json.dumps(child("--worker", "lm", "--workdir", workdir), indent=1))


if __name__ == "__main__":
    main()
