"""Perplexity of the OFFICIAL FLAP code (An et al., AAAI 2024) on our SmolLM2-135M export.

    python tools/export_lm.py --workdir /tmp/onnxprune-lm     # once: GGUF, calibration, text
    # the official code, fetched outside the repository (github CASIA-IVA-Lab/FLAP), e.g.
    #   git clone <mirror of CASIA-IVA-Lab/FLAP> /tmp/FLAP
    python tools/flap_reference.py --workdir /tmp/onnxprune-lm --flap-dir /tmp/FLAP \
        --out /tmp/flap_ref.json

Needs torch (CPU) and transformers (5.x); nothing else of this tool is used by onnxprune.

What it does, so that FLAP and onnxprune see exactly the same model, data and metric:

- Model: a Hugging Face `LlamaForCausalLM` (sdpa attention, float32) holding the float32
  weights dequantized from WORKDIR/SmolLM2-135M-Instruct.Q4_1.gguf by tools/export_lm.py's
  own `read_gguf` / `unpermute_rotary` (imported, not copied): 30 layers, hidden 576, 9
  query / 3 key-value heads of 64, SwiGLU 1536, tied embedding, rope theta from the GGUF.
  Its dense perplexity is checked against the ONNX model's (tools/bench_lm.py's
  `perplexity`, onnxruntime) before anything is pruned; the tool stops if they differ by
  more than --tolerance (relative).
- Calibration: WORKDIR/calib.npz `input_ids` [64, 1, 256] (the windows onnxprune uses),
  handed to FLAP in place of its own wikitext2 loader (`lib.prune.get_loaders` is replaced
  by a function returning these windows; nsamples = 64, seqlen = 256).
- Evaluation: the first --eval-tokens of WORKDIR/eval_tokens.npy, non-overlapping windows
  of 256, exp(mean NLL of the 255 next-token predictions per window), float64 log-softmax:
  the same windows and averaging as tools/bench_lm.py's `perplexity`.
- FLAP's defaults: metric WIFV, bias compensation on (its `compress(..., bias=True)`), real
  pruning (no --unstr). 20 % run: structure AL-AM (adaptive across layers and modules),
  pruning_ratio searched so that the real fraction of decoder linear parameters removed is
  --ratio (see below). FFN-only run: structure AL-MM (adaptive across layers, fixed
  attention/MLP split) with remove_heads = 0 and the pruning_ratio whose
  `cal_remove_neuron` is exactly --ffn-ratio of all 30 x 1536 FFN units.

The official code is run from a patched copy under /tmp (--patched-dir), made fresh on
each run from the pristine clone at --flap-dir by the textual replacements in PATCHES (each
checked to match). What was changed, and why (nothing else):

1. lib/prune.py: head size 128 was a literal (LLaMA-1/2); SmolLM2's is 64. Every `128`
   that means the head size (repeat_interleave in `compress`, the per-head reshapes of the
   scores, `hidden_size` after pruning, `cal_remove_neuron`) reads the module constant
   HEAD_DIM, set to 64 by this tool.
2. lib/prune.py, AL-AM: the weight of one head against one FFN unit in the global ranking
   was the literal 512/3 = (4 x 128 x d) / (3 x d), the parameters of one MHA head of 128
   over those of one SwiGLU unit. It reads HEAD_WEIGHT, set here to the real GQA cost of
   one query head: q rows + o columns + its 1/3 share of the k and v rows of its KV head,
   (2 + 2/3) x 64 / 3 = 56.9 FFN units (an FFN unit is 3 x 576 parameters). With it,
   FLAP's own count of a layer's attention, 9 x 56.9 x 1728 = 1536 x 576, equals the true
   one (q and o 576 x 576 each, k and v 192 x 576 each). Unchanged, as in the original:
   the weights live in `torch.ones_like(indices)`, an int64 tensor, so the head weight is
   truncated (to 56 here, to 170 in the original).
3. lib/prune.py: the per-channel input means kept for bias compensation were cast to fp16
   (`.type(torch.half)`, the official model is fp16); with our float32 model that cast
   makes `compress`'s matmul fail on mixed dtypes. They are kept in the layer's dtype.
4. lib/prune.py, AL-MM: `sorted_attn[-int(args.remove_heads)]` with remove_heads = 0 is
   the largest score, so every head would be removed. With remove_heads = 0 every head is
   kept (the FFN-only run; the code has no MLP-only structure otherwise).

Outside the official code (the model side, not FLAP's algorithm):

- GQA: the official code assumes num_heads == num_key_value_heads. Before FLAP runs, each
  layer's k_proj / v_proj rows are repeated so that every query head has its own copy of
  its KV head (num_key_value_groups = 1): the function is unchanged, and FLAP then scores
  and removes query heads one by one (q rows, o columns and the copy of k / v that serves
  it). Parameters are counted as GQA: a KV head (k and v rows) is counted removed only
  when all 3 of its query heads are removed; a kept KV head counts once.
- o_proj and down_proj get a zero bias (FLAP's own modeling_llama / get_llm does the same)
  for the compensation to land in.
- transformers 5 decoder layers need `position_embeddings`; FLAP calls a layer with
  attention_mask / position_ids only, so a forward pre-hook computes the rotary tables
  from position_ids (attention_mask None = causal in sdpa, as in the full model).
- A layer left with no query head gets an attention that returns o_proj's bias only.
- `lib.prune.compress` is wrapped (it calls the original) only to record each layer's
  masks for the counts; `lib.prune.get_loaders` returns our windows (above).
- `datasets` (imported by FLAP's lib/data.py, whose loaders are not used) is stubbed when
  it is not installed.

Reported (JSON on stdout and in --out): dense perplexity (ONNX and torch), and for each
run the perplexity, prune time (FLAP's `prune_flap` call: calibration forward, scoring,
compression), heads / KV heads / FFN units removed, the fraction of decoder linear-layer
parameters really removed (GQA count, biases not counted; the added biases are given
separately) and the fraction FLAP itself counts removed (HEAD_WEIGHT units). The 20 % run
first uses pruning_ratio = --ratio; when the real removed fraction falls short (query
heads removed without their whole KV group free no k / v rows) the ratio is raised by the
shortfall and FLAP rerun, up to --match-tries times; every try is reported.

Measured with the command above (FLAP commit 3bb57db, torch 2.13.0 CPU, transformers
5.25.0, 2 threads on a shared 2-core machine, 64 x 256 eval tokens): dense 34.1453 in both
torch and ONNX (relative difference 1.4e-7); FLAP AL-AM pruning_ratio 0.2 removes 19.49 %
of the decoder linear parameters (23 query heads, 1 KV head, 10953 FFN units), ppl 58.85;
raised to 0.2051 it removes 20.02 % (25 heads, 2 KV heads, 11151 units), ppl 60.32 (1.77x
dense); AL-MM at 50 % of FFN units (23040, attention untouched, 37.5 % of the decoder
linear parameters), ppl 873.9 (25.6x). Prune times (calibration included) varied from 59
to 489 s with the machine's load (4-6 on 2 cores) and say little.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "smollm2-135m.onnx"

# (file, old, new, expected count, why): applied to a fresh copy of the official code
PATCHES = [
    ("lib/prune.py", "from tqdm import tqdm\n",
     "from tqdm import tqdm\n\nHEAD_DIM = 128  # onnxprune patch 1\n"
     "HEAD_WEIGHT = 512.0 / 3  # onnxprune patch 2\n", 1, "module constants"),
    ("lib/prune.py", "repeat_interleave(128)", "repeat_interleave(HEAD_DIM)", 2, "head size"),
    ("lib/prune.py", "retain_heads * 128", "retain_heads * HEAD_DIM", 1, "head size"),
    ("lib/prune.py", "* args.remove_heads * 128", "* args.remove_heads * HEAD_DIM", 1,
     "head size"),
    ("lib/prune.py", "(args.remove_heads // num_layers) * 128",
     "(args.remove_heads // num_layers) * HEAD_DIM", 1, "head size"),
    ("lib/prune.py", "W_metric.reshape(-1, 128)", "W_metric.reshape(-1, HEAD_DIM)", 3,
     "head size"),
    ("lib/prune.py", "reshape(len(layers), -1, 128)", "reshape(len(layers), -1, HEAD_DIM)", 1,
     "head size"),
    ("lib/prune.py", "reshape(-1, 128).sum(dim=1)    # importance",
     "reshape(-1, HEAD_DIM).sum(dim=1)    # importance", 1, "head size (wanda_sp)"),
    ("lib/prune.py", "= 512.0 / 3\n", "= HEAD_WEIGHT\n", 1, "head weight in AL-AM"),
    ("lib/prune.py", "baseline_inp.type(torch.half)",
     "baseline_inp.to(subset[name].weight.dtype)", 2, "bias means in the model's dtype"),
    ("lib/prune.py",
     "attn_mask = (attn_metric > attn_thres)  # 1 means retain",
     "attn_mask = (attn_metric > attn_thres) if args.remove_heads else "
     "torch.ones_like(attn_metric, dtype=torch.bool)  # 1 means retain", 1,
     "AL-MM with remove_heads = 0 keeps every head"),
]


# ---------------------------------------------------------------- the official code

def patched_copy(flap_dir: Path, patched_dir: Path) -> dict:
    """A fresh copy of the official code with PATCHES applied; its commit and the patches."""
    if not (flap_dir / "lib" / "prune.py").is_file():
        sys.exit(f"flap_reference: {flap_dir} has no lib/prune.py (clone CASIA-IVA-Lab/FLAP)")
    if patched_dir.resolve() == flap_dir.resolve():
        sys.exit("flap_reference: --patched-dir must differ from --flap-dir")
    if patched_dir.exists():
        shutil.rmtree(patched_dir)
    shutil.copytree(flap_dir, patched_dir, ignore=shutil.ignore_patterns(".git"))
    for name, old, new, count, _why in PATCHES:
        path = patched_dir / name
        text = path.read_text()
        found = text.count(old)
        if found != count:
            sys.exit(f"flap_reference: patch {old!r} matches {found} times in {name}, "
                     f"expected {count} (a different FLAP revision?)")
        path.write_text(text.replace(old, new))
    diff = subprocess.run(["diff", "-u", str(flap_dir / "lib/prune.py"),
                           str(patched_dir / "lib/prune.py")], capture_output=True, text=True)
    (patched_dir / "onnxprune.patch").write_text(diff.stdout)
    commit = subprocess.run(["git", "-C", str(flap_dir), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return {"flap_dir": str(flap_dir), "commit": commit, "patched_dir": str(patched_dir),
            "patch_file": str(patched_dir / "onnxprune.patch"),
            "patches": [{"file": f, "old": o, "new": n, "why": w}
                        for f, o, n, _c, w in PATCHES]}


def import_flap(patched_dir: Path):
    """lib.prune of the patched copy (datasets stubbed when absent: its loaders are unused)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")

        def load_dataset(*_args, **_kwargs):
            raise RuntimeError("flap_reference: FLAP's own data loaders are not used")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    sys.path.insert(0, str(patched_dir))
    import lib.prune as flap_prune
    if not str(Path(flap_prune.__file__).resolve()).startswith(str(patched_dir.resolve())):
        sys.exit(f"flap_reference: imported {flap_prune.__file__}, not the patched copy")
    return flap_prune


# ---------------------------------------------------------------- the model

def load_gguf(workdir: Path) -> tuple[dict, dict]:
    from export_lm import read_gguf

    path = workdir / GGUF_FILE
    if not path.is_file():
        sys.exit(f"flap_reference: {path} not found; run tools/export_lm.py first")
    return read_gguf(path)


def build_model(config: dict, weights: dict):
    """LlamaForCausalLM (float32, sdpa) with the GGUF weights, laid out as the ONNX export."""
    import torch
    from export_lm import unpermute_rotary
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=len(config["tokens"]), hidden_size=config["hidden"],
        intermediate_size=config["ffn"], num_hidden_layers=config["layers"],
        num_attention_heads=config["heads"], num_key_value_heads=config["kv_heads"],
        head_dim=config["hidden"] // config["heads"], hidden_act="silu",
        max_position_embeddings=2048, rms_norm_eps=config["eps"],
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    state = {"model.embed_tokens.weight": weights["token_embd.weight"],
             "model.norm.weight": weights["output_norm.weight"]}
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for layer in range(config["layers"]):
        for source, target in names.items():
            value = weights[f"blk.{layer}.{source}.weight"]
            if source == "attn_q":
                value = unpermute_rotary(value, config["heads"])
            elif source == "attn_k":
                value = unpermute_rotary(value, config["kv_heads"])
            state[f"model.layers.{layer}.{target}.weight"] = value
    tensors = {name: torch.from_numpy(np.ascontiguousarray(value, np.float32))
               for name, value in state.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    rotary = model.model.rotary_emb
    inv_freq, scaling = rotary.compute_default_rope_parameters(hf_config)
    rotary.inv_freq, rotary.original_inv_freq = inv_freq, inv_freq.clone()
    rotary.attention_scaling = scaling
    left = [name for name, p in model.named_parameters(remove_duplicate=False)
            if p.is_meta] + [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        sys.exit(f"flap_reference: weights not loaded: {left[:5]}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        sys.exit("flap_reference: lm_head is not tied to the embedding")
    model.eval()
    return model


def prepare_for_flap(model) -> None:
    """MHA-equivalent copy of GQA (k / v rows repeated), zero biases, rotary pre-hooks."""
    import torch

    cfg = model.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    head_dim = cfg.head_dim
    rotary = model.model.rotary_emb

    def add_rotary(_module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
            kwargs["position_embeddings"] = rotary(hidden, position_ids)
        return args, kwargs

    for layer in model.model.layers:
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            rows = proj.weight.data.reshape(cfg.num_key_value_heads, head_dim, -1)
            proj.weight = torch.nn.Parameter(
                rows.repeat_interleave(group, dim=0).reshape(-1, rows.shape[-1]).clone())
            proj.out_features = proj.weight.shape[0]
        attn.num_key_value_groups = 1
        for proj in (attn.o_proj, layer.mlp.down_proj):
            proj.bias = torch.nn.Parameter(torch.zeros(proj.out_features))
        layer.register_forward_pre_hook(add_rotary, with_kwargs=True)
    cfg.num_key_value_heads = cfg.num_attention_heads
    model.seqlen = None  # set by run_flap


class BiasOnlyAttention:
    """Stand-in forward for an attention left with no head: o_proj's bias only."""

    def __init__(self, o_proj):
        self.o_proj = o_proj

    def __call__(self, hidden_states, **_kwargs):
        return self.o_proj.bias.expand_as(hidden_states), None


# ---------------------------------------------------------------- evaluation

def torch_perplexity(model, tokens: np.ndarray, seq: int) -> float:
    """tools/bench_lm.py's perplexity, in torch: non-overlapping windows of seq tokens."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - seq + 1, seq):
            window = tokens[start:start + seq]
            logits = model(torch.from_numpy(window[None])).logits[0, :-1].double()
            log_norm = torch.logsumexp(logits, -1)
            target = torch.from_numpy(window[1:])
            total += float((log_norm - logits[torch.arange(seq - 1), target]).sum())
            count += seq - 1
    return math.exp(total / count)


# ---------------------------------------------------------------- counting

def count_removed(masks: list, config: dict, head_weight: float) -> dict:
    """Removed heads / KV heads / FFN units and parameter fractions (GQA and FLAP's count)."""
    hidden, heads, kv_heads = config["hidden"], config["heads"], config["kv_heads"]
    head_dim, ffn, group = hidden // heads, config["ffn"], heads // kv_heads
    per_layer = hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim + 3 * ffn)
    total = per_layer * config["layers"]
    removed = removed_heads = removed_kv = removed_units = 0
    per_layer_kept = []
    for attn_mask, mlp_mask in masks:
        kept = attn_mask.numpy().astype(bool)
        kept_kv = kept.reshape(kv_heads, group).any(1)
        units = int(mlp_mask.numpy().astype(bool).sum())
        removed_heads += int((~kept).sum())
        removed_kv += int((~kept_kv).sum())
        removed_units += ffn - units
        removed += hidden * head_dim * (2 * int((~kept).sum()) + 2 * int((~kept_kv).sum()))
        removed += 3 * hidden * (ffn - units)
        per_layer_kept.append([int(kept.sum()), int(kept_kv.sum()), units])
    flap_total = config["layers"] * (heads * head_weight + ffn)
    return {
        "decoder_linear_params": total,
        "removed_params": removed,
        "removed_fraction": removed / total,
        "removed_fraction_flap_count": (removed_heads * head_weight + removed_units)
                                       / flap_total,
        "heads_removed": removed_heads, "heads_total": heads * config["layers"],
        "kv_heads_removed": removed_kv, "kv_heads_total": kv_heads * config["layers"],
        "ffn_units_removed": removed_units, "ffn_units_total": ffn * config["layers"],
        "bias_params_added": 2 * hidden * config["layers"],
        "kept_per_layer_q_kv_ffn": per_layer_kept,
    }


# ---------------------------------------------------------------- one FLAP run

def run_flap(flap, config: dict, weights: dict, calib: np.ndarray, structure: str,
             ratio: float, remove_heads: int) -> tuple[object, list, float]:
    """Fresh model, FLAP's prune_flap on it; (model, [(attn_mask, mlp_mask)] per layer, s)."""
    import torch

    model = build_model(config, weights)
    prepare_for_flap(model)
    model.seqlen = calib.shape[-1]
    windows = [(torch.from_numpy(np.ascontiguousarray(w)), None) for w in calib]
    flap.get_loaders = lambda *_a, **_k: (windows, None)
    recorded: dict[int, list] = {}
    original = flap.compress

    def recording_compress(layer, attn_mask, mlp_mask, *rest, **kw):
        entry = recorded.setdefault(id(layer), [None, None])
        if attn_mask is not None:
            entry[0] = attn_mask.clone()
        if mlp_mask is not None:
            entry[1] = mlp_mask.clone()
        return original(layer, attn_mask, mlp_mask, *rest, **kw)

    flap.compress = recording_compress
    args = argparse.Namespace(
        model="smollm2-135m (GGUF, float32)", seed=0, nsamples=len(windows),
        pruning_ratio=ratio, remove_heads=remove_heads, metrics="WIFV", structure=structure,
        prune_method="flap", cache_dir=None, unstr=False, eval=False, save_model=None)
    np.random.seed(0)
    torch.random.manual_seed(0)
    started = time.perf_counter()
    try:
        with torch.no_grad():
            flap.prune_flap(args, model, None, torch.device("cpu"))
    finally:
        flap.compress = original
    seconds = time.perf_counter() - started
    masks = []
    for layer in model.model.layers:
        attn_mask, mlp_mask = recorded[id(layer)]
        masks.append((attn_mask, mlp_mask))
        attn = layer.self_attn
        if attn.q_proj.weight.shape[0] != int(attn_mask.sum()) * attn.head_dim or \
                layer.mlp.up_proj.weight.shape[0] != int(mlp_mask.sum()):
            sys.exit("flap_reference: the pruned shapes disagree with FLAP's masks")
        if attn.q_proj.weight.shape[0] == 0:
            attn.forward = BiasOnlyAttention(attn.o_proj)
    return model, masks, seconds


def evaluate_run(name: str, model, masks: list, seconds: float, ratio: float, config: dict,
                 head_weight: float, tokens: np.ndarray, seq: int, dense: float,
                 structure: str, remove_heads: int) -> dict:
    started = time.perf_counter()
    ppl = torch_perplexity(model, tokens, seq)
    row = {"run": name, "structure": structure, "pruning_ratio_arg": ratio,
           "remove_heads_arg": remove_heads, "perplexity": ppl,
           "perplexity_vs_dense": ppl / dense, "prune_s": round(seconds, 2),
           "eval_s": round(time.perf_counter() - started, 1),
           "compensation_bias_abs_sum": float(sum(
               layer.self_attn.o_proj.bias.abs().sum() + layer.mlp.down_proj.bias.abs().sum()
               for layer in model.model.layers)),
           **count_removed(masks, config, head_weight)}
    print(f"{name}: ratio arg {ratio:.4f}, removed {row['removed_fraction']:.4f} of decoder "
          f"linear params ({row['heads_removed']} heads, {row['kv_heads_removed']} KV heads, "
          f"{row['ffn_units_removed']} FFN units), ppl {ppl:.3f} ({ppl / dense:.2f}x), "
          f"prune {seconds:.1f} s", file=sys.stderr)
    return row


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/onnxprune-lm")
    parser.add_argument("--flap-dir", default="/tmp/FLAP", help="clone of CASIA-IVA-Lab/FLAP")
    parser.add_argument("--patched-dir", default="/tmp/FLAP-onnxprune-patched",
                        help="where the patched copy is made (replaced on each run)")
    parser.add_argument("--out", default="/tmp/flap_ref.json")
    parser.add_argument("--ratio", type=float, default=0.2,
                        help="fraction of decoder linear parameters to remove [0.2]")
    parser.add_argument("--ffn-ratio", type=float, default=0.5,
                        help="fraction of FFN units for the FFN-only run, 0 to skip [0.5]")
    parser.add_argument("--match-tries", type=int, default=3,
                        help="FLAP runs to bring the real removed fraction to --ratio [3]")
    parser.add_argument("--match-tol", type=float, default=0.002,
                        help="accepted shortfall of the real removed fraction [0.002]")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="evaluation tokens from the start of the text, as bench_lm [16384]")
    parser.add_argument("--seq", type=int, default=256, help="evaluation window [256]")
    parser.add_argument("--threads", type=int, default=2, help="torch / onnxruntime threads")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="relative dense perplexity difference torch vs ONNX allowed")
    parser.add_argument("--skip-onnx", action="store_true",
                        help="do not measure the ONNX dense perplexity (no check)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    started_all = time.perf_counter()
    source = patched_copy(Path(args.flap_dir), Path(args.patched_dir))
    flap = import_flap(Path(args.patched_dir))

    config, weights = load_gguf(workdir)
    head_dim = config["hidden"] // config["heads"]
    group = config["heads"] // config["kv_heads"]
    head_weight = (2 * head_dim + 2 * head_dim / group) / 3
    flap.HEAD_DIM, flap.HEAD_WEIGHT = head_dim, head_weight
    calib = np.load(workdir / "calib.npz")["input_ids"][:args.calib_samples].astype(np.int64)
    tokens = np.load(workdir / "eval_tokens.npy")[:args.eval_tokens].astype(np.int64)
    windows = len(tokens) // args.seq

    result = {
        "model": f"{workdir / GGUF_FILE} (float32, as {MODEL_FILE})",
        "eval": f"{windows} x {args.seq} tokens of {workdir / 'eval_tokens.npy'}",
        "calib": f"{calib.shape[0]} x {calib.shape[-1]} tokens of {workdir / 'calib.npz'}",
        "threads": args.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "flap": source,
        "flap_head_dim": head_dim, "flap_head_weight": head_weight,
        "metric": "WIFV", "bias_compensation": True,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }

    dense_model = build_model(config, weights)
    started = time.perf_counter()
    with torch.no_grad():
        result["dense_perplexity_torch"] = torch_perplexity(dense_model, tokens, args.seq)
    result["dense_eval_s_torch"] = round(time.perf_counter() - started, 1)
    del dense_model
    dense = result["dense_perplexity_torch"]
    print(f"dense (torch): {dense:.4f}", file=sys.stderr)
    if not args.skip_onnx:
        from bench_lm import perplexity

        started = time.perf_counter()
        onnx_ppl = perplexity(workdir / MODEL_FILE, tokens, args.seq, args.threads)
        result["dense_perplexity_onnx"] = onnx_ppl
        result["dense_eval_s_onnx"] = round(time.perf_counter() - started, 1)
        result["dense_relative_difference"] = abs(dense - onnx_ppl) / onnx_ppl
        print(f"dense (ONNX): {onnx_ppl:.4f}, relative difference "
              f"{result['dense_relative_difference']:.2e}", file=sys.stderr)
        if result["dense_relative_difference"] > args.tolerance:
            print(json.dumps(result, indent=2))
            sys.exit(f"flap_reference: torch and ONNX dense perplexities differ by more than "
                     f"{args.tolerance}")

    runs = []
    ratio = args.ratio
    for attempt in range(max(1, args.match_tries)):
        model, masks, seconds = run_flap(flap, config, weights, calib, "AL-AM", ratio, -1)
        row = evaluate_run(f"flap_AL-AM_{args.ratio:g}_try{attempt + 1}", model, masks,
                           seconds, ratio, config, head_weight, tokens, args.seq, dense,
                           "AL-AM", -1)
        del model
        runs.append(row)
        shortfall = args.ratio - row["removed_fraction"]
        if shortfall <= args.match_tol:
            break
        ratio += shortfall
    result["params_run_at_ratio"] = runs[0]["run"]
    matched = [r for r in runs if args.ratio - r["removed_fraction"] <= args.match_tol]
    result["params_run_matched"] = matched[0]["run"] if matched else None

    if args.ffn_ratio > 0:
        units = round(args.ffn_ratio * config["ffn"] * config["layers"])
        # AL-MM's cal_remove_neuron: layers * r * (3 d I + 4 d^2) / (3 d) units, no head
        per_ratio = config["layers"] * (3 * config["ffn"] + 4 * config["hidden"]) / 3
        ffn_arg = (units + 0.5) / per_ratio
        model, masks, seconds = run_flap(flap, config, weights, calib, "AL-MM", ffn_arg, 0)
        row = evaluate_run(f"flap_AL-MM_ffn{args.ffn_ratio:g}", model, masks, seconds,
                           ffn_arg, config, head_weight, tokens, args.seq, dense, "AL-MM", 0)
        del model
        if row["ffn_units_removed"] != units or row["heads_removed"]:
            sys.exit(f"flap_reference: FFN-only run removed {row['ffn_units_removed']} units "
                     f"and {row['heads_removed']} heads, expected {units} and 0")
        runs.append(row)
    result["runs"] = runs
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - started_all, 1)
    text = json.dumps(result, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
