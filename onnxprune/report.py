"""The pruning / inspection report: dataclasses, their JSON form, and the human tables."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace


@dataclass
class TargetReport:
    name: str
    op_type: str
    shape: list[int]
    dtype: str
    axis: int
    numel: int
    zeros: int
    sparsity: float
    pattern: str
    format: str
    source: str
    bytes: int
    is_2_4: bool
    zeros_before: int | None = None
    consumers: list[str] = field(default_factory=list)
    format_reason: str | None = None  # why a tensor stayed dense under --format sparse/compact
    format_bytes: dict | None = None  # inspect: bytes per format and the entropy bound
    method: str | None = None  # calibrated methods: what was used (magnitude when it fell back)
    reconstruction_error: float | None = None  # ||WX - W'X||^2 / ||WX||^2 on calibration data
    calibration_tokens: int | None = None
    requested_sparsity: float | None = None  # what the plan asked of this target
    set_by: str | None = None  # the allocation, override or mask file that decided it
    meets_plan: bool | None = None  # the pattern check after pruning (PrunePass.ensures)
    note: str | None = None  # why the planned method was not used (calibration impossible)
    seconds: float | None = None  # time spent on this target (reading to storing)


@dataclass
class SkipReport:
    """One skipped tensor: `reason` in words, `cause` the stable name of its
    `targets.SkipCause` (what code should test); `summary`, the reason without its
    particulars, is what the table counts and stays out of the JSON."""

    name: str
    reason: str
    shape: list[int] = field(default_factory=list)
    dtype: str = ""
    source: str = ""
    cause: str = ""
    summary: str = field(default="", repr=False)


@dataclass
class Summary:
    params: int
    zeros: int
    sparsity: float
    file_bytes: int
    dense_bytes: int
    zeros_before: int | None = None
    file_bytes_before: int | None = None


@dataclass
class Report:
    model: str
    targets: list[TargetReport]
    skipped: list[SkipReport]
    summary: Summary
    output: str | None = None
    config: dict | None = None
    validation: dict | None = None
    provenance: dict | None = None  # what prune wrote in the output's metadata_props
    # --permute-channels: the targets whose input channels were permuted (and by how much
    # that raised the score their N:M groups keep)
    channel_permutations: list[dict] | None = None
    # --structure: the groups pruned (channels before -> after, parameters and MACs
    # removed), the totals, and the declined candidates
    structured: dict | None = None
    masks: object | None = field(default=None, repr=False)  # MaskSet, not serialized

    def to_dict(self) -> dict:
        values = asdict(replace(self, masks=None))  # asdict would deep-copy the masks
        values.pop("masks")
        for skipped in values["skipped"]:
            skipped.pop("summary")
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def structured_report(result) -> dict:
    """The JSON form of a `structured.run.StructuredResult` (without the model)."""
    groups = [asdict(g) for g in result.groups]
    selected = result.selected_params
    removed = result.params_before - result.params_after
    macs = sum(g.macs for g in result.groups)
    return {
        "groups": groups,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "selected_params": selected,
        "removed_params": removed,
        "sparsity": removed / selected if selected else 0.0,
        "macs_removed": sum(g.macs_removed for g in result.groups),
        "macs_of_groups": macs,
        "declined": [{"value": d.value, "cause": d.cause.value, "reason": d.reason}
                     for d in result.declined],
        "not_selected": list(result.skipped_groups),
        **({"latency": result.latency} if result.latency is not None else {}),
    }


def format_structured(report: Report, verbose: bool = False, limit: int = 20,
                      totals_only: bool = False) -> str:
    """The groups' table (all with -v, else the `limit` largest; none with `totals_only`),
    then the totals."""
    data = report.structured or {}
    groups = sorted(data.get("groups", []), key=lambda g: -g["params"])
    shown = groups if verbose else groups[:limit]
    rows = [("group", "kind", "channels", "params removed", "MACs removed")]
    rows += [(g["name"], g["kind"], f"{g['channels']} -> {g['kept']}",
              f"{g['params_removed']:,} of {g['params']:,}",
              f"{g['macs_removed']:,}" if g["macs"] else "?")
             for g in shown]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(groups) > len(shown):
        lines.append(f"... {len(groups) - len(shown)} more groups (-v lists them all)")
    if totals_only:
        lines = []
    before, after = data.get("params_before", 0), data.get("params_after", 0)
    lines.append(f"{len(groups)} groups, {data.get('sparsity', 0.0):.2%} of their parameters "
                 f"removed; model parameters {before:,} -> {after:,} "
                 f"({after / before if before else 1.0:.3f}x), file "
                 f"{_human_bytes(report.summary.file_bytes_before)} -> "
                 f"{_human_bytes(report.summary.file_bytes)}; "
                 f"declined candidates: {len(data.get('declined', []))} "
                 "(`onnxprune inspect --structured`)")
    latency = data.get("latency")
    if latency:  # --latency-budget
        measured = latency.get("measured_ratio")
        calibrated = latency.get("calibrated_ratio")
        lines.append(
            f"latency budget {latency['budget']:g} x dense: predicted "
            f"{latency['predicted_ratio']:.3f} x by the tables"
            + (f", {calibrated:.3f} x calibrated" if calibrated is not None else "")
            + ", measured "
            + (f"{measured:.3f} x (medians {latency['measured_dense_ms']:.3g} -> "
               f"{latency['measured_ms']:.3g} ms; fastest runs "
               f"{latency['measured_fastest_ratio']:.3f} x)" if measured is not None else "-")
            + f"; tables {latency['table_seconds']:.1f} s ({latency['regions_timed']} "
            f"regions timed, {latency['tables_reused']} reused, {len(latency['untimed'])} "
            "groups untimed)")
    if data.get("macs_at"):  # set by the caller that knows the model
        shapes = ", ".join(f"{name} {shape}" for name, shape in data["macs_at"].items())
        lines.append(f"MACs estimated at {shapes} (the model's input sizes are dynamic)")
    return "\n".join(lines)


def summarize(targets: list[TargetReport], file_bytes: int,
              file_bytes_before: int | None = None) -> Summary:
    params = sum(t.numel for t in targets)
    zeros = sum(t.zeros for t in targets)
    known_before = [t.zeros_before for t in targets if t.zeros_before is not None]
    before = None
    if targets and len(known_before) == len(targets):  # every target counted them
        before = sum(known_before)
    return Summary(params=params, zeros=zeros, sparsity=zeros / params if params else 0.0,
                   file_bytes=file_bytes, dense_bytes=sum(t.bytes for t in targets),
                   zeros_before=before, file_bytes_before=file_bytes_before)


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for r, row in enumerate(rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_targets(report: Report, max_name: int = 48) -> str:
    """Per-target table: name, op, shape, axis, sparsity, 2:4, bytes, source."""
    rows = [["name", "op", "shape", "dtype", "axis", "sparsity", "2:4", "format", "bytes",
             "dense", "sparse", "compact", "entropy", "source"]]
    for t in report.targets:
        name = t.name if len(t.name) <= max_name else "…" + t.name[-(max_name - 1):]
        sizes = t.format_bytes or {}
        rows.append([name, t.op_type, "x".join(map(str, t.shape)), t.dtype, str(t.axis),
                     f"{t.sparsity:.2%}", "yes" if t.is_2_4 else "no", t.format,
                     _human_bytes(t.bytes)]
                    + [_human_bytes(sizes.get(k)) for k in ("dense", "sparse", "compact",
                                                            "entropy_bound")]
                    + [t.source])
    return _table(rows, right={4, 5, 8, 9, 10, 11, 12})


def format_skipped(report: Report, limit: int = 40) -> str:
    """Skipped tensors with reasons; long lists are cut, with a count per kind of reason."""
    from .targets import SkipCause  # onnx only when a table is made

    counts: dict[str, int] = {}
    for s in report.skipped:
        key = s.summary or s.reason
        counts[key] = counts.get(key, 0) + 1
    lines = [f"skipped {len(report.skipped)} tensors: "
             + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(),
                                                                  key=lambda kv: -kv[1]))]
    interesting = [s for s in report.skipped if s.cause != SkipCause.INTEGER.value]
    for s in interesting[:limit]:
        shape = "x".join(map(str, s.shape)) or "scalar"
        lines.append(f"  {s.name} [{shape} {s.dtype}]: {s.reason}")
    if len(interesting) > limit:
        lines.append(f"  ... {len(interesting) - limit} more (see --json)")
    return "\n".join(lines)


def format_summary(report: Report) -> str:
    """Before/after summary: params, zeros, sparsity, bytes."""
    s = report.summary
    rows = [["", "before", "after"]]
    before_zeros = s.zeros_before
    rows.append(["targets", str(len(report.targets)), str(len(report.targets))])
    rows.append(["params", f"{s.params:,}", f"{s.params:,}"])
    rows.append(["zeros", "-" if before_zeros is None else f"{before_zeros:,}", f"{s.zeros:,}"])
    before_sparsity = "-" if before_zeros is None or not s.params else \
        f"{before_zeros / s.params:.2%}"
    rows.append(["sparsity", before_sparsity, f"{s.sparsity:.2%}"])
    rows.append(["file bytes", _human_bytes(s.file_bytes_before), _human_bytes(s.file_bytes)])
    return _table(rows, right={1, 2})


PRUNE_TABLE_ENDS = 10  # without -v: this many most pruned and least pruned targets


def format_prune_table(report: Report, verbose: bool = False, ends: int = PRUNE_TABLE_ENDS,
                       max_name: int = 48) -> str:
    """Per-target result of a prune, then the totals.

    Columns: name, shape, requested -> achieved sparsity, pattern, format, stored bytes and
    the reconstruction error where it was measured; method and "set by" too when they differ
    between targets (recipes, fallbacks, allocations). `verbose`: every target in model
    order. Otherwise, with more than 2 x `ends` targets, the `ends` most pruned and the
    `ends` least pruned, sorted by achieved sparsity with the middle left out.
    """
    targets = report.targets
    if not targets:
        return "no targets"
    shown: list[TargetReport | None] = list(targets)  # None: the targets left out
    if not verbose and len(targets) > 2 * ends:
        ranked = sorted(targets, key=lambda t: -t.sparsity)  # stable: model order in ties
        shown = [*ranked[:ends], None, *ranked[-ends:]]
    with_error = any(t.reconstruction_error is not None for t in targets)
    with_method = len({t.method or _planned_method(report) for t in targets}) > 1
    with_set_by = len({t.set_by for t in targets}) > 1
    header = ["name", "shape", "requested -> achieved", "pattern", "format", "bytes"]
    header += ["error"] * with_error + ["method"] * with_method + ["set by"] * with_set_by
    rows = [header]
    for t in shown:
        if t is None:
            continue
        name = t.name if len(t.name) <= max_name else "…" + t.name[-(max_name - 1):]
        mark = "" if t.meets_plan is not False else " !"
        row = [name, "x".join(map(str, t.shape)),
               _requested_achieved(t.requested_sparsity, t.sparsity) + mark, t.pattern,
               t.format, _human_bytes(t.bytes)]
        if with_error:
            row.append("-" if t.reconstruction_error is None else f"{t.reconstruction_error:.3g}")
        if with_method:
            row.append(t.method or _planned_method(report))
        if with_set_by:
            row.append(t.set_by or "-")
        rows.append(row)
    rows.append(_totals_row(report, len(header)))
    lines = _table(rows, right={2, 5, 6}).split("\n")
    if None in shown:  # after the header, its rule and the most pruned
        lines.insert(2 + shown.index(None),
                     f"... {len(targets) - 2 * ends} more targets (all of them with -v)")
    table = "\n".join(lines)
    missed = [t.name for t in targets if t.meets_plan is False]
    if missed:
        table += f"\n! {len(missed)} target(s) miss their planned pattern or count"
    notes = [t for t in targets if t.note]
    if notes:
        table += f"\n{len(notes)} target(s) fell back to magnitude (see -v or --report)"
    return table


def _totals_row(report: Report, width: int) -> list[str]:
    targets = report.targets
    params = sum(t.numel for t in targets)
    requested = [t.requested_sparsity for t in targets if t.requested_sparsity is not None]
    asked = (None if not params or len(requested) != len(targets)  # one not planned
             else sum(r * t.numel for r, t in zip(requested, targets, strict=True)) / params)
    row = [f"total ({len(targets)} targets)", "",
           _requested_achieved(asked, report.summary.sparsity), "", "",
           _human_bytes(sum(t.bytes for t in targets))]
    return row + [""] * (width - len(row))


def _planned_method(report: Report) -> str:
    return (report.config or {}).get("method", "-")


def _requested_achieved(requested: float | None, achieved: float) -> str:
    asked = "-" if requested is None else f"{requested:.2%}"
    return f"{asked:>7} -> {achieved:.2%}"
