"""Which channel multiple N should structured pruning's ``--round-to`` default to?

Usage: python tools/bench_round_to.py [--quick] [--threads 2,1] [--budget S] [--csv PATH]
                                      [--widths] [--cases SUBSTR,...] [--seed 0]
                                      [--wait-idle 30] [--idle-cores 0.3]

Measures, in onnxruntime's CPU execution provider (the installed version, default graph
optimizations, ``intra_op_num_threads`` 2 and 1), how the latency of one layer depends on
the channel width a structured prune leaves it, on tiny models built here with onnx.helper:

  mm-out   MatMul [T, K] x [K, w]: the producer side of a pruned group (FFN gate/up,
           attention projections); T in {1, 128} (batch-1 decoding, a 128-token prompt),
           K in {576, 1536}, w swept over every width of 1400..1536 and 520..576
           (SmolLM2-135M: hidden 576, FFN 1536).
  gemm-out Gemm(transB=1, bias) [T, 576] x [w, 576]^T, w in 1400..1536 (torch Linear as
           older exporters write it).
  mm-in    MatMul [T, w] x [w, 576]: the consumer side (FFN down projection, o_proj).
  ffn      the SwiGLU block a prune really shrinks: SiLU(x Wg) * (x Wu) then x Wd,
           x [T, 576], w = FFN units in 1400..1536 (producer and consumer together).
  conv-out Conv 3x3 pad 1 [1, C, 40, 40] -> w (+ bias), C = 64 for w in 48..64 and C = 128
           for w in 112..128 (YOLO-like widths).
  conv-in  Conv 3x3 [1, w, 40, 40] -> C, the consumer side.
  conv2    Conv C -> w, Relu, Conv w -> C: producer and consumer together, so a layout
           change onnxruntime makes (NCHWc blocks) is paid or saved as in a real network.

Timing: for each case every width gets its own session; after a warm-up, ``rounds`` rounds
each run every width once in a fresh random order (``time.perf_counter`` around
``session.run``), so drift and other processes hit all widths alike; the figure per width
is the median over rounds. ``rounds`` comes from a per-case time budget (``--budget``
seconds per case and thread count, clamped to 20..200 rounds; ``--quick`` uses narrower
sweeps, 2 threads only and 6..40 rounds). Noise is the median over widths of
|median(even rounds) - median(odd rounds)| / median. Other processes on the machine skew
everything: before each sweep the script waits (up to ``--wait-idle`` s) until they use
less than ``--idle-cores`` cores (from /proc/stat), and prints for each sweep the cores they
used meanwhile, flagging LOADED sweeps.

Analysis per case, for N in {1, 2, 4, 8, 16, 32, 64}:
  ratio    mean of latency / linear fit (latency against width, least squares over all
           widths) for widths that are multiples of N, divided by the same mean for the
           others: < 1 means multiples of N run faster than their width predicts.
  round-up for every requested width w of the sweep, r = the next multiple of N >= w (every
           sweep ends on a multiple of 64, so r is measured too); the figure is the mean
           over w of latency(r) / latency(w) - 1, in %: the extra channels' cost minus what
           the alignment gains. Negative: rounding up is faster on average than not rounding.
The recommendation is the N with the lowest round-up figure averaged over all cases and
thread counts (each case weighs the same), or the smallest N within the measured noise of
it. Prints the machine's CPU model, onnxruntime's version and the load average.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
OPSET = 17
FFN_HI = (1400, 1536)
HID_HI = (520, 576)
CONV_LO = (48, 64)
CONV_HI = (112, 128)
QUICK_RANGES = {FFN_HI: (1472, 1536), HID_HI: (544, 576), CONV_LO: (56, 64), CONV_HI: (120, 128)}


# ---------------------------------------------------------------------------------- models


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> onnx.TensorProto:
    scale = 1.0 / math.sqrt(max(1, int(np.prod(shape[1:])) if len(shape) > 1 else 1))
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(nodes, inputs, outputs, inits) -> bytes:
    graph = helper.make_graph(nodes, "bench", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def mm_out(t: int, k: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    return _model(nodes, [_vi("x", [t, k])], [_vi("y", [t, w])], [_init("W", (k, w), rng)]), (
        t, k)


def gemm_out(t: int, k: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    inits = [_init("W", (w, k), rng), _init("B", (w,), rng)]
    return _model(nodes, [_vi("x", [t, k])], [_vi("y", [t, w])], inits), (t, k)


def mm_in(t: int, n: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    return _model(nodes, [_vi("x", [t, w])], [_vi("y", [t, n])], [_init("W", (w, n), rng)]), (
        t, w)


def ffn(t: int, h: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["g"]),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["a"]),
        helper.make_node("MatMul", ["x", "Wu"], ["u"]),
        helper.make_node("Mul", ["a", "u"], ["m"]),
        helper.make_node("MatMul", ["m", "Wd"], ["y"]),
    ]
    inits = [_init("Wg", (h, w), rng), _init("Wu", (h, w), rng), _init("Wd", (w, h), rng)]
    return _model(nodes, [_vi("x", [t, h])], [_vi("y", [t, h])], inits), (t, h)


def _conv(name, x, y, cin, cout, rng):
    node = helper.make_node("Conv", [x, f"{name}W", f"{name}B"], [y], pads=[1, 1, 1, 1],
                            kernel_shape=[3, 3])
    return node, [_init(f"{name}W", (cout, cin, 3, 3), rng), _init(f"{name}B", (cout,), rng)]


def conv_out(c: int, hw: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    node, inits = _conv("c", "x", "y", c, w, rng)
    return _model([node], [_vi("x", [1, c, hw, hw])], [_vi("y", [1, w, hw, hw])], inits), (
        1, c, hw, hw)


def conv_in(c: int, hw: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    node, inits = _conv("c", "x", "y", w, c, rng)
    return _model([node], [_vi("x", [1, w, hw, hw])], [_vi("y", [1, c, hw, hw])], inits), (
        1, w, hw, hw)


def conv2(c: int, hw: int, w: int, rng) -> tuple[bytes, tuple[int, ...]]:
    n1, i1 = _conv("a", "x", "h", c, w, rng)
    n2, i2 = _conv("b", "r", "y", w, c, rng)
    nodes = [n1, helper.make_node("Relu", ["h"], ["r"]), n2]
    return _model(nodes, [_vi("x", [1, c, hw, hw])], [_vi("y", [1, c, hw, hw])], i1 + i2), (
        1, c, hw, hw)


# ----------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    family: str  # "mm T=1", "mm T=128", "conv": for the per-family summary
    build: object  # callable(width, rng) -> (model bytes, input shape)
    lo: int
    hi: int


def make_cases(quick: bool) -> list[Case]:
    def rng_(r):
        return QUICK_RANGES[r] if quick else r

    cases: list[Case] = []
    for t in (1, 128):
        fam = f"mm T={t}"
        for k in (576, 1536):
            for r in (FFN_HI, HID_HI):
                lo, hi = rng_(r)
                cases.append(Case(f"mm-out T={t} K={k}", fam,
                                  lambda w, g, t=t, k=k: mm_out(t, k, w, g), lo, hi))
        lo, hi = rng_(FFN_HI)
        cases.append(Case(f"gemm-out T={t} K=576", fam,
                          lambda w, g, t=t: gemm_out(t, 576, w, g), lo, hi))
        for r in (FFN_HI, HID_HI):
            lo, hi = rng_(r)
            cases.append(Case(f"mm-in T={t} N=576", fam,
                              lambda w, g, t=t: mm_in(t, 576, w, g), lo, hi))
        lo, hi = rng_(FFN_HI)
        cases.append(Case(f"ffn T={t} H=576", fam, lambda w, g, t=t: ffn(t, 576, w, g), lo, hi))
    for r, c in ((CONV_LO, 64), (CONV_HI, 128)):
        lo, hi = rng_(r)
        cases.append(Case(f"conv-out C={c}", "conv", lambda w, g, c=c: conv_out(c, 40, w, g),
                          lo, hi))
        cases.append(Case(f"conv-in C={c}", "conv", lambda w, g, c=c: conv_in(c, 40, w, g),
                          lo, hi))
        cases.append(Case(f"conv2 C={c}", "conv", lambda w, g, c=c: conv2(c, 40, w, g), lo, hi))
    return cases


# ---------------------------------------------------------------------------------- timing


@dataclass
class Result:
    case: Case
    threads: int
    widths: np.ndarray
    med: np.ndarray  # seconds, per width
    noise: float
    rounds: int
    seconds: float
    extra: dict = field(default_factory=dict)


def session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    # one pool per session: with spinning on, the idle workers of the width just run keep
    # spinning while the next width runs, so the sweep would time its own contention
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _cpu_busy() -> tuple[float, float]:
    """(seconds of CPU busy on the machine, seconds of CPU used by this process) so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return (sum(v[:8]) - idle) / hz, t.user + t.system


def others_cores(seconds: float) -> float:
    """Cores used by other processes over the next ``seconds`` (we sleep meanwhile)."""
    b0, _ = _cpu_busy()
    time.sleep(seconds)
    b1, _ = _cpu_busy()
    return max(0.0, (b1 - b0) / seconds)


def wait_idle(max_wait: float, limit: float) -> float:
    """Wait up to ``max_wait`` s until other processes use < ``limit`` cores; return last."""
    end = time.monotonic() + max_wait
    use = others_cores(1.0)
    while use >= limit and time.monotonic() < end:
        use = others_cores(2.0)
    return use


def measure(case: Case, threads: int, budget: float, rmin: int, rmax: int,
            rng: np.random.Generator) -> Result:
    t0 = time.perf_counter()
    b0, o0 = _cpu_busy()
    widths = np.arange(case.lo, case.hi + 1)
    runs = []
    for w in widths:
        model, shape = case.build(int(w), rng)
        sess = session(model, threads)
        feed = {"x": rng.standard_normal(shape).astype(np.float32)}
        runs.append((sess.run, feed))
    # warm-up: 3 runs each, then one timed round to size the budget
    for run, feed in runs:
        for _ in range(3):
            run(None, feed)
    tr = time.perf_counter()
    for run, feed in runs:
        run(None, feed)
    round_s = time.perf_counter() - tr
    rounds = int(min(rmax, max(rmin, budget / max(round_s, 1e-9))))
    rounds += rounds % 2  # even: two halves for the noise figure
    samples = np.empty((rounds, len(widths)))
    order = np.arange(len(widths))
    pc = time.perf_counter
    for i in range(rounds):
        rng.shuffle(order)
        for j in order:
            run, feed = runs[j]
            s = pc()
            run(None, feed)
            samples[i, j] = pc() - s
    med = np.median(samples, axis=0)
    halves = np.stack([np.median(samples[0::2], axis=0), np.median(samples[1::2], axis=0)])
    noise = float(np.median(np.abs(halves[0] - halves[1]) / med))
    del runs
    b1, o1 = _cpu_busy()
    dt = time.perf_counter() - t0
    others = max(0.0, ((b1 - b0) - (o1 - o0)) / dt)
    return Result(case, threads, widths, med, noise, rounds, dt,
                  {"others": others, "halves": halves})


# -------------------------------------------------------------------------------- analysis


def ratio(res: Result, n: int) -> float:
    """Mean latency / linear fit of the multiples of n over that of the other widths."""
    if n == 1:
        return float("nan")
    fit = np.polyval(np.polyfit(res.widths, res.med, 1), res.widths)
    rel = res.med / fit
    mult = res.widths % n == 0
    if not mult.any() or mult.all():
        return float("nan")
    return float(rel[mult].mean() / rel[~mult].mean())


def round_up(res: Result, n: int, med: np.ndarray | None = None) -> tuple[float, float]:
    """(mean, worst) over requested widths of latency(round up to n) / latency(w) - 1, in %."""
    med = res.med if med is None else med
    lat = dict(zip(res.widths.tolist(), med.tolist(), strict=True))
    d = np.array([lat[-(-w // n) * n] / lat[w] - 1.0 for w in res.widths.tolist()])
    return float(d.mean() * 100), float(d.max() * 100)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(x: float, spec: str) -> str:
    return "  -  " if math.isnan(x) else format(x, spec)


def report(results: list[Result], show_widths: bool) -> int:
    cand = CANDIDATES
    head = "".join(f"{'N=' + str(n):>8}" for n in cand[1:])
    print("\n1) ratio: mean latency/fit of widths that are multiples of N over the others "
          "(<1: multiples faster)")
    print(f"{'case':<22}{'range':>10}{'thr':>4}{'rnds':>5}{'noise':>7}{'ms@max':>8}"
          f"{'us/ch':>7}" + head)
    for r in results:
        cells = "".join(f"{fmt(ratio(r, n), '8.3f')}" for n in cand[1:])
        print(f"{r.case.name:<22}{f'{r.case.lo}..{r.case.hi}':>10}{r.threads:>4}{r.rounds:>5}"
              f"{r.noise * 100:6.1f}%{r.med[-1] * 1e3:8.3f}{r.med[-1] / r.widths[-1] * 1e6:7.3f}"
              + cells)
    print("\n2) round-up: mean (worst) % latency change from rounding every requested width "
          "up to a multiple of N (<0: faster despite the extra channels)")
    print(f"{'case':<22}{'range':>10}{'thr':>4}" + "".join(f"{'N=' + str(n):>13}"
                                                          for n in cand[1:]))
    table: dict[int, list[float]] = {n: [] for n in cand}
    fam: dict[tuple[str, int], dict[int, list[float]]] = {}
    for r in results:
        cells = ""
        for n in cand:
            mean, worst = round_up(r, n)
            table[n].append(mean)
            fam.setdefault((r.case.family, r.threads), {m: [] for m in cand})[n].append(mean)
            if n > 1:
                cells += f"{mean:+6.1f}({worst:+5.1f})"
        print(f"{r.case.name:<22}{f'{r.case.lo}..{r.case.hi}':>10}{r.threads:>4}" + cells)
    print("\n3) mean round-up % per family and thread count (each case weighs the same)")
    print(f"{'family':<22}{'thr':>4}" + "".join(f"{'N=' + str(n):>8}" for n in cand[1:]))
    for (f_, thr), d in sorted(fam.items()):
        print(f"{f_:<22}{thr:>4}" + "".join(f"{np.mean(d[n]):+8.2f}" for n in cand[1:]))
    overall = {n: float(np.mean(v)) for n, v in table.items()}
    print(f"{'all':<22}{'':>4}" + "".join(f"{overall[n]:+8.2f}" for n in cand[1:]))
    # the overall figure's own noise: the same figure from even rounds and from odd rounds
    half = {n: [float(np.mean([round_up(r, n, r.extra["halves"][h])[0] for r in results]))
                for h in (0, 1)] for n in cand}
    spread = {n: abs(half[n][0] - half[n][1]) for n in cand}
    print("all, from even / odd rounds only: " + ", ".join(
        f"N={n} {half[n][0]:+.2f}/{half[n][1]:+.2f}" for n in cand[1:]))
    noise = float(np.median([r.noise for r in results])) * 100
    best = min(cand, key=lambda n: overall[n])
    tol = {n: max(spread[n], spread[best]) for n in cand}
    pick = min(n for n in cand if overall[n] <= overall[best] + tol[n])
    if show_widths:
        for r in results:
            print(f"\n{r.case.name} {r.case.lo}..{r.case.hi} threads={r.threads}: "
                  "width ms us/ch (latency/fit)")
            fit = np.polyval(np.polyfit(r.widths, r.med, 1), r.widths)
            for w, m, f_ in zip(r.widths, r.med, fit, strict=True):
                print(f"  {w:5d} {m * 1e3:8.4f} {m / w * 1e6:7.4f} {m / f_:6.3f}")
    best_fams = {k: min(cand, key=lambda n, d=d: np.mean(d[n])) for k, d in fam.items()}
    fams = ", ".join(f"{f_} {t}t: N={n}" for (f_, t), n in sorted(best_fams.items()))
    print(f"\nmedian per-width noise {noise:.1f}%; best N per family: {fams}")
    print(f"--round-to {pick}: rounding requested widths up to multiples of {pick} changes "
          f"latency by {overall[pick]:+.2f}% on average over {len(results)} case/thread "
          f"sweeps (N=1: 0, N=8: {overall[8]:+.2f}%, N=16: {overall[16]:+.2f}%, "
          f"N=64: {overall[64]:+.2f}%; lowest: N={best}; picked the smallest N within "
          f"{tol[pick]:.2f} points of it, the even/odd-round spread)")
    return pick


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="narrow sweeps, 2 threads, ~1 minute")
    p.add_argument("--threads", default=None, help="comma list of intra-op thread counts "
                   "(default 2,1; 2 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="timing seconds per case and thread count (default 6; 1 with --quick)")
    p.add_argument("--cases", default="", help="only cases whose name contains one of these")
    p.add_argument("--csv", default=None, help="write width, median latency per case here")
    p.add_argument("--widths", action="store_true", help="print every width's latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=30.0,
                   help="before each sweep wait up to this many seconds until other processes "
                   "use < --idle-cores (default 30; 0: do not wait)")
    p.add_argument("--idle-cores", type=float, default=0.3)
    a = p.parse_args(argv)
    threads = [int(x) for x in (a.threads or ("2" if a.quick else "2,1")).split(",")]
    budget = a.budget if a.budget is not None else (1.0 if a.quick else 6.0)
    rmin, rmax = (6, 40) if a.quick else (20, 200)
    cases = make_cases(a.quick)
    if a.cases:
        keys = [k.strip() for k in a.cases.split(",") if k.strip()]
        cases = [c for c in cases if any(k in c.name for k in keys)]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); onnxruntime {ort.__version__}, "
          f"onnx {onnx.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"threads {threads}; {budget:g} s per sweep, {rmin}..{rmax} rounds")
    rng = np.random.default_rng(a.seed)
    results: list[Result] = []
    t0 = time.perf_counter()
    for thr in threads:
        for c in cases:
            if a.wait_idle > 0:
                wait_idle(a.wait_idle, a.idle_cores)
            r = measure(c, thr, budget, rmin, rmax, rng)
            results.append(r)
            flag = "  LOADED" if r.extra["others"] >= a.idle_cores else ""
            print(f"  {c.name:<22} {c.lo}..{c.hi} threads={thr}: {r.rounds} rounds, "
                  f"{r.med[0] * 1e3:.3f}..{r.med[-1] * 1e3:.3f} ms, noise {r.noise * 100:.1f}%,"
                  f" other processes {r.extra['others']:.2f} cores, {r.seconds:.1f} s{flag}",
                  flush=True)
    loaded = sum(r.extra["others"] >= a.idle_cores for r in results)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"timing took {time.perf_counter() - t0:.0f} s; {loaded} of {len(results)} sweeps "
          f"ran while other processes used >= {a.idle_cores:g} cores")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["case", "threads", "width", "median_ms", "us_per_channel", "rounds"])
            for r in results:
                for w, m in zip(r.widths, r.med, strict=True):
                    wr.writerow([r.case.name, r.threads, int(w), f"{m * 1e3:.5f}",
                                 f"{m / w * 1e6:.5f}", r.rounds])
    report(results, a.widths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
