"""Benchmark the hot kernels against plain numpy and against memory bandwidth.

Usage: python tools/bench_kernels.py [--numel 100000000] [--repeat 3]

Measures, on magnitude scores of standard-normal weights:
  (a) the 2:4 N:M keep-mask kernel vs a numpy argpartition per group of 4 (target >= 15x);
  (b) that kernel's effective read bandwidth (score bytes / time) as a fraction of the
      machine's read bandwidth, timed with ``read_bandwidth_probe`` (target >= 30 %);
  (c) the global 90 % threshold by ``kth_smallest`` over ~10 chunks vs an in-place
      ``np.partition`` of a copy, partition time only (target >= 2x).
JIT compilation is warmed up first; every figure is the best of ``--repeat`` rounds, and
each round runs every benchmark once, so load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxprune.kernels import (  # noqa: E402
    kth_smallest,
    magnitude_scores,
    nm_keep_mask,
    read_bandwidth_probe,
)

COLS = 4096
N_CHUNKS = 10
TARGET_NM_SPEEDUP = 15.0
TARGET_NM_BANDWIDTH = 0.30
TARGET_SELECT_SPEEDUP = 2.0


def best_times(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    """Best of ``repeat`` rounds, each round running every benchmark once in turn, so a
    burst of load from elsewhere on the machine hits all of them alike."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeat):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    return best


def timed(run: Callable[[], object]) -> Callable[[], float]:
    def run_and_time() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    return run_and_time


def numpy_2_of_4(scores2d: np.ndarray) -> np.ndarray:
    """The plain numpy way: argpartition each group of 4, mark the two largest."""
    groups = scores2d.reshape(-1, 4)
    largest_two = np.argpartition(groups, 2, axis=1)[:, 2:]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, largest_two, True, axis=1)
    return keep.reshape(scores2d.shape)


def partition_time(scores: np.ndarray, k: int) -> float:
    """In-place np.partition of a copy; only the partition is timed."""
    copy = scores.copy()
    start = time.perf_counter()
    copy.partition(k - 1)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000, help="number of scores")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (best taken)")
    args = parser.parse_args(argv)
    rows = max(1, args.numel // COLS)
    numel = rows * COLS

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((rows, COLS), dtype=np.float32)
    scores = magnitude_scores(weights)
    del weights
    flat = scores.reshape(-1)
    chunks = np.array_split(flat, N_CHUNKS)
    k = int(0.9 * numel)
    score_bytes = scores.nbytes

    # Warm up: load (or compile) every kernel the timings use.
    small = scores[: max(1, min(rows, 64))]
    nm_keep_mask(small, 2, 4)
    read_bandwidth_probe(small)
    kth_smallest(lambda: iter([small.reshape(-1)]), 1)
    kth_smallest(lambda: iter(np.array_split(flat[: 3 << 20], 3)), 1 << 20)

    best = best_times(
        {
            "probe": timed(lambda: read_bandwidth_probe(scores)),
            "nm": timed(lambda: nm_keep_mask(scores, 2, 4)),
            "numpy_nm": timed(lambda: numpy_2_of_4(scores)),
            "select": timed(lambda: kth_smallest(lambda: iter(chunks), k)),
            "partition": lambda: partition_time(flat, k),
        },
        args.repeat,
    )
    probe_s, nm_s, numpy_nm_s = best["probe"], best["nm"], best["numpy_nm"]
    select_s, partition_s = best["select"], best["partition"]

    bandwidth = score_bytes / probe_s
    nm_bandwidth = score_bytes / nm_s
    rows_out = [
        ("read bandwidth (probe)", f"{bandwidth / 1e9:.1f} GB/s in {probe_s * 1e3:.0f} ms", "", ""),
        ("2:4 mask, numba", f"{nm_s * 1e3:.0f} ms", "", ""),
        ("2:4 mask, numpy argpartition", f"{numpy_nm_s * 1e3:.0f} ms", "", ""),
        _judged("(a) 2:4 speedup vs numpy", numpy_nm_s / nm_s, TARGET_NM_SPEEDUP, "x"),
        _judged(
            f"(b) 2:4 bandwidth {nm_bandwidth / 1e9:.1f} GB/s, of read",
            nm_bandwidth / bandwidth,
            TARGET_NM_BANDWIDTH,
            "%",
        ),
        ("global 90% kth_smallest, 10 chunks", f"{select_s * 1e3:.0f} ms", "", ""),
        ("np.partition in place (copy not timed)", f"{partition_s * 1e3:.0f} ms", "", ""),
        _judged(
            "(c) threshold speedup vs partition", partition_s / select_s, TARGET_SELECT_SPEEDUP, "x"
        ),
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{numel:,} float32 scores ({rows} x {COLS}), {numba.get_num_threads()} threads, "
        f"best of {args.repeat}, load average {load:.2f}"
    )
    width = max(len(row[0]) for row in rows_out)
    for name, value, target, verdict in rows_out:
        print(f"  {name:<{width}}  {value:>22}  {target:>8}  {verdict}")
    return 0


def _judged(name: str, value: float, target: float, unit: str) -> tuple[str, str, str, str]:
    if unit == "%":
        shown, wanted = f"{value * 100:.0f} %", f">= {target * 100:.0f} %"
    else:
        shown, wanted = f"{value:.1f}x", f">= {target:g}x"
    return name, shown, wanted, "PASS" if value >= target else "MISS"


if __name__ == "__main__":
    sys.exit(main())
