"""Calibrated structured pruning on SmolLM2-135M: perplexity, prune time and peak memory of
each structured method, beside the official FLAP code's perplexity and sparsegpt's time.

    python tools/export_lm.py --workdir /tmp/onnxprune-lm          # the model and texts
    python tools/flap_reference.py --workdir /tmp/onnxprune-lm \\
        --flap-dir /tmp/FLAP --out /tmp/flap_ref.json              # optional: official FLAP
    python tools/bench_structured_calibrated.py [--flap-ref /tmp/flap_ref.json]
        [--levels decoder20,ffn50] [--variants wanda,flap,flap+ls,wanda+ls]
        [--eval-tokens 16384] [--samples 32]

Levels (issue #19's done-means):
- `decoder20`: 20 % of the decoder's parameters removed (`--structure ffn,heads
  --allocation global --sparsity 0.2`: the selected groups are every attention block and
  feed-forward block, whose parameters are the decoder's linear layers);
- `ffn50`: 50 % of the feed-forward units (`--structure ffn --sparsity 0.5`, uniform).

Variants: a channel score (`obs` chooses and refits by itself), optionally `+ls` for
`--update least-squares`, and `@sens` to allocate by structured sensitivity (`onnxprune
sensitivity --structure` on `--sweep-samples` windows, run once per level and score, its
time printed apart); `flap` keeps its
bias compensation (on by default), `flap-nobc` turns it off. Every prune runs as the
command line does, in a child process (wall time and peak RSS), on `--samples` calibration
windows of 256 tokens. Perplexity: tools/bench_lm.py's (non-overlapping windows of 256 over
the first `--eval-tokens` of the evaluation text). The table gives each variant's
perplexity as a ratio to structured wanda's (no reconstruction) and to the official FLAP
code's at the same level (from `--flap-ref`, the JSON of tools/flap_reference.py), and its
prune time as a ratio to unstructured sparsegpt's at 50 % on the same model (timed here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm import MODEL_FILE, perplexity, run_prune  # noqa: E402

LEVELS = {
    "decoder20": ["--structure", "ffn,heads", "--allocation", "global", "--sparsity", "0.2"],
    "ffn50": ["--structure", "ffn", "--sparsity", "0.5"],
}
# which run of tools/flap_reference.py's JSON is the official code at each level: at 20 %
# the run whose real count of removed decoder parameters matched (its `params_run_matched`)
FLAP_RUNS = {"decoder20": None, "ffn50": "flap_AL-MM_ffn0.5"}
DEFAULT_VARIANTS = "wanda,flap,flap-nobc,wanda+ls,flap+ls,obs"


def variant_args(variant: str) -> list[str]:
    method, _, update = variant.split("@")[0].partition("+")
    args = ["--method", "flap" if method == "flap-nobc" else method]
    if method == "flap-nobc":
        args.append("--no-bias-compensation")
    if update == "ls":
        args += ["--update", "least-squares"]
    elif update:
        raise SystemExit(f"bench_structured_calibrated: unknown update {update!r} in {variant}")
    return args


def sweep_args(level: str, variant: str) -> list[str] | None:
    """The `onnxprune sensitivity` options of a variant that allocates by structured
    sensitivity (`...@sens`), else None: the level's structure, the variant's score."""
    base, _, allocation = variant.partition("@")
    if not allocation:
        return None
    if allocation != "sens":
        raise SystemExit(f"bench_structured_calibrated: unknown allocation {allocation!r} in "
                         f"{variant} (only @sens)")
    words = LEVELS[level]
    method = variant_args(base)[1]
    return ["--structure", words[words.index("--structure") + 1], "--method", method]


def sweep_note(row: dict) -> str:
    """What the prune time leaves out: the sensitivity sweep of an @sens variant."""
    if "sweep_s" not in row:
        return ""
    return f" (+{row['sweep_s']} sweep)" if row["sweep_s"] else " (sweep reused)"


def reference_perplexity(path: str | None, level: str) -> float | None:
    """The official FLAP code's perplexity at `level`, from tools/flap_reference.py's JSON."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())
    wanted = FLAP_RUNS[level] or data.get("params_run_matched")
    run = next((r for r in data.get("runs", []) if r.get("run") == wanted), None)
    return float(run["perplexity"]) if run and "perplexity" in run else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/onnxprune-lm")
    parser.add_argument("--levels", default="decoder20,ffn50")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--flap-ref", default=None, help="tools/flap_reference.py's JSON")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows [32]")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep-samples", type=int, default=8,
                        help="calibration windows of the sensitivity sweep of @sens variants "
                             "[8]")
    parser.add_argument("--no-sparsegpt", action="store_true",
                        help="skip timing unstructured sparsegpt (the time baseline)")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir)
    model = workdir / MODEL_FILE
    if not model.exists():
        sys.exit(f"bench_structured_calibrated: {model} not found; run tools/export_lm.py")
    tokens = np.load(workdir / "eval_tokens.npy")[:args.eval_tokens]
    out_dir, log_dir = workdir / "pruned", workdir / "logs"
    out_dir.mkdir(exist_ok=True)
    log_dir.mkdir(exist_ok=True)
    calib = ["--calib", str(workdir / "calib.npz"), "--calib-samples", str(args.samples)]

    def prune(stem: str, options: list[str]) -> dict:
        output = out_dir / f"{stem}.onnx"
        command = [sys.executable, "-m", "onnxprune", "prune", str(model), "-o", str(output),
                   "-q", *options, *calib]
        code, seconds, peak = run_prune(command, log_dir / f"{stem}.log")
        row: dict = {"prune_s": round(seconds, 1), "peak_mb": round(peak)}
        if code != 0:
            row["status"] = f"failed (exit {code}, see {log_dir / (stem + '.log')})"
            return row
        started = time.perf_counter()
        row["perplexity"] = perplexity(output, tokens, args.seq, args.threads)
        row["eval_s"] = round(time.perf_counter() - started, 1)
        output.unlink()
        return row

    dense = perplexity(model, tokens, args.seq, args.threads)
    print(f"dense perplexity {dense:.2f} ({len(tokens) // args.seq} x {args.seq} tokens)",
          file=sys.stderr)
    baseline = None
    if not args.no_sparsegpt:
        baseline = prune("sparsegpt_50", ["--method", "sparsegpt", "--sparsity", "0.5",
                                          "--exclude", "lm_head"])
        print(f"sparsegpt 50 %: {baseline}", file=sys.stderr)
    rows = []
    def sweep(level: str, options: list[str]) -> tuple[list[str], float]:
        """`--allocation sensitivity --sensitivity JSON` from a structured sweep (made once
        per level and score, in workdir/sweeps), and the sweep's seconds (0 if reused)."""
        folder = workdir / "sweeps" / f"{level}_{options[-1]}"
        curves = folder / f"{Path(MODEL_FILE).stem}.sensitivity.json"
        seconds = 0.0
        if not curves.exists():
            command = [sys.executable, "-m", "onnxprune", "sensitivity", str(model), "-o",
                       str(folder), "-q", *options, "--calib", str(workdir / "calib.npz"),
                       "--calib-samples", str(args.sweep_samples)]
            code, seconds, _ = run_prune(command, log_dir / f"sweep_{level}_{options[-1]}.log")
            if code != 0:
                raise SystemExit(f"bench_structured_calibrated: the sweep failed (exit {code})")
        return ["--allocation", "sensitivity", "--sensitivity", str(curves)], seconds

    for level in (x.strip() for x in args.levels.split(",") if x.strip()):
        for variant in (v.strip() for v in args.variants.split(",") if v.strip()):
            allocation, sweep_s = [], 0.0
            options = sweep_args(level, variant)
            if options is not None:
                allocation, sweep_s = sweep(level, options)
            row = {"level": level, "variant": variant,
                   **prune(f"{level}_{variant.replace('+', '_').replace('@', '_')}",
                           [*LEVELS[level], *variant_args(variant), *allocation])}
            if options is not None:
                row["sweep_s"] = round(sweep_s, 1)
            rows.append(row)
            print(f"{level} {variant}: {row}", file=sys.stderr)
    lines = [f"dense perplexity {dense:.2f}; sparsegpt 50 % (unstructured) prune "
             f"{baseline['prune_s'] if baseline else '-'} s, peak "
             f"{baseline['peak_mb'] if baseline else '-'} MB",
             "", "| level | variant | perplexity | ÷ wanda | ÷ official FLAP | prune s "
             "| ÷ sparsegpt time | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ppl = row.get("perplexity")
        wanda = next((r.get("perplexity") for r in rows
                      if r["level"] == row["level"] and r["variant"] == "wanda"), None)
        flap = reference_perplexity(args.flap_ref, row["level"])

        def ratio(base, value=ppl):
            return f"{value / base:.2f}" if base and value else "-"

        time_ratio = ratio(baseline.get("prune_s") if baseline else None, row["prune_s"])
        lines.append(f"| {row['level']} | {row['variant']} | "
                     f"{f'{ppl:.2f}' if ppl else row.get('status', '-')} | {ratio(wanda)} | "
                     f"{ratio(flap)} | {row['prune_s']}{sweep_note(row)} | {time_ratio} | "
                     f"{row['peak_mb']} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"dense": dense, "sparsegpt": baseline,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
