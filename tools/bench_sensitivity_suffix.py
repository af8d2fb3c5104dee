"""Structured sensitivity sweep time with and without graph suffixes (`graph_suffix`): each
point runs only the part of the model after the group's weights, fed cut values computed
once, against the whole model per point. Prints both times, their ratio and the largest
difference between the two sets of curves.

    python tools/bench_sensitivity_suffix.py MODEL --structure ffn,heads [--calib NPZ]
        [--calib-samples 2] [--levels 0.5] [--groups N]

For SmolLM2-135M: MODEL /tmp/onnxprune-lm/smollm2-135m.onnx, --calib
/tmp/onnxprune-lm/calib.npz (from tools/export_lm.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--structure", default="channels")
    parser.add_argument("--method", default="magnitude")
    parser.add_argument("--calib", default=None)
    parser.add_argument("--calib-samples", type=int, default=2)
    parser.add_argument("--levels", default="0.5")
    parser.add_argument("--groups", type=int, default=None, help="only the first N groups")
    args = parser.parse_args(argv)

    from onnxprune.config import PruneConfig
    from onnxprune.io import load_model
    from onnxprune.structured import sensitivity
    from onnxprune.structured.run import score_groups

    loaded = load_model(Path(args.model))
    config = PruneConfig.from_settings(structure=args.structure, method=args.method,
                                       calib=args.calib, calib_samples=args.calib_samples)
    scored = score_groups(loaded, config)
    if args.groups:
        scored = dataclasses.replace(scored, groups=scored.groups[:args.groups])
    levels = [float(x) for x in args.levels.split(",")]
    found = sensitivity.suffix_plan
    results, seconds = {}, {}
    for label in ("whole", "suffix"):
        sensitivity.suffix_plan = found if label == "suffix" else (lambda proto, names: None)
        started = time.perf_counter()
        result = sensitivity.group_curves(loaded, scored, config, levels=levels)
        seconds[label] = time.perf_counter() - started
        results[label] = {c.name: [p.relative_l2 for p in c.points] for c in result.targets}
    sensitivity.suffix_plan = found
    difference = max((abs(a - b) / max(abs(a), 1e-12) for name, errors in results["whole"].items()
                      for a, b in zip(errors, results["suffix"][name], strict=True)), default=0.0)
    points = sum(len(e) for e in results["whole"].values())
    print(f"{args.model}: {len(scored.groups)} groups, {points} points, "
          f"{args.calib_samples} samples")
    print(f"whole model per point {seconds['whole']:.1f} s; suffix {seconds['suffix']:.1f} s "
          f"({seconds['suffix'] / seconds['whole']:.2f}x); largest relative difference "
          f"between the curves {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
