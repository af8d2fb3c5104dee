"""What a search leaves beside its output: every trial as CSV and JSON, and a Pareto plot
of the constraint's metric against the objective."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import write_file_atomically
from .trials import TrialResult

log = logging.getLogger(__name__)

OBJECTIVE_AXES = {"sparsity": ("achieved", "sparsity reached"),
                  "size": ("file_bytes", "file bytes"),
                  "latency": ("latency_ms", "median latency (ms)")}
COLUMNS = ("number", "candidate", "settings", "sparsity", "achieved", "passed", "error",
           "file_bytes", "latency_ms", "seconds")


def side_paths(output: Path) -> dict[str, Path]:
    """Where the trial table (CSV, JSON) and the plot go: beside OUT, named after it."""
    stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
    return {kind: output.with_name(f"{stem}.search.{kind}") for kind in ("csv", "json", "png")}


def write_tables(results: Sequence[TrialResult], summary: dict[str, Any], output: Path,
                 metric: str) -> dict[str, Path]:
    """The CSV and JSON trial tables (atomically); their paths."""
    paths = side_paths(output)
    rows = [result.row() for result in sorted(results, key=lambda r: r.number)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*COLUMNS, metric])
    for row in rows:
        writer.writerow([json.dumps(row["settings"], sort_keys=True) if key == "settings"
                         else row[key] for key in COLUMNS] + [row["metrics"].get(metric)])
    text = buffer.getvalue()
    write_file_atomically(paths["csv"], lambda fh: fh.write(text), binary=False)
    document = json.dumps({**summary, "trials": rows}, indent=2, default=str)
    write_file_atomically(paths["json"], lambda fh: fh.write(document), binary=False)
    return {"csv": paths["csv"], "json": paths["json"]}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (both larger is better), sorted
    by the first."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return sorted(front)


def plot(results: Sequence[TrialResult], output: Path, metric: str, objective: str,
         higher_is_better: bool) -> Path | None:
    """The metric of every trial that ran against the objective, passing and failing
    trials apart, the Pareto front of all of them drawn; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no Pareto plot: matplotlib is not installed (pip install "
                    "'onnxprune[plot]')")
        return None
    key, label = OBJECTIVE_AXES[objective]
    points = [(float(getattr(r, key)), float(value), r.passed) for r in results
              if r.error is None and getattr(r, key) is not None
              for value in [r.metrics.get(metric)] if value is not None]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for passed, marker, name in ((True, "o", "meets the constraint"),
                                 (False, "x", "fails it")):
        chosen = [(x, y) for x, y, ok in points if ok == passed]
        axes.scatter([x for x, _ in chosen], [y for _, y in chosen], marker=marker,
                     label=name)
    sign = 1.0 if objective == "sparsity" else -1.0  # sparsity up, bytes and ms down
    flip = 1.0 if higher_is_better else -1.0
    front = pareto_front([(sign * x, flip * y) for x, y, _ in points])
    if front:
        axes.plot([sign * x for x, _ in front], [flip * y for _, y in front], "--",
                  color="grey", label="Pareto front")
    axes.set_xlabel(label)
    axes.set_ylabel(metric)
    axes.set_title(f"{output.name}: {len(results)} trials")
    axes.legend()
    path = side_paths(output)["png"]
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    data = buffer.getvalue()
    write_file_atomically(path, lambda fh: fh.write(data))
    return path
