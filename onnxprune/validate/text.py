"""A comparison and its timing as text for a terminal: short aligned tables and a verdict."""

from __future__ import annotations

from ..runtime import PROVIDERS
from .policy import ValidationResult
from .timing import SESSION_REPEATS, TIMING_WARMUP, TimingResult

# Inputs named on the `inputs:` line; the JSON result lists them all.
LISTED_INPUTS = 8


def format_result(result: ValidationResult) -> str:
    """A short table: one row per output, an overall row, the inputs fed, then the verdict.

    PASSED only when tolerances were given and all hold; NOT CHECKED without tolerances.
    """
    header = ["output", "shape", "max_abs_diff", "rel_l2", "cosine", "top1"]
    rows = [[o.name, _shape_text(o.shape), _num(o.max_abs_diff), _num(o.rel_l2),
             _cos(o.cosine), _frac(o.top1_agreement)] for o in result.outputs]
    samples = f"{result.samples} sample{'' if result.samples == 1 else 's'}"
    rows.append(["overall", samples, _num(result.max_abs_diff), _num(result.rel_l2),
                 _cos(result.cosine), _frac(result.top1_agreement)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if result.inputs:
        lines.append(format_inputs(result))
    lines.extend(f"NaN/Inf in {o.name!r}: {o.reference_nonfinite} in the reference, "
                 f"{o.candidate_nonfinite} in the candidate"
                 for o in result.outputs if o.reference_nonfinite or o.candidate_nonfinite)
    limits = ", ".join(f"{name}={value:g}" for name, value in result.tolerances.items())
    if result.passed:
        lines.append(f"PASSED ({limits})")
    elif result.passed is None:
        lines.append("NOT CHECKED (no tolerance given: set --atol, --rtol, --min-cosine or "
                     "--min-top1)")
    else:
        lines.append("FAILED" + (f" ({limits})" if limits else ""))
        lines.extend(f"  - {reason}" for reason in result.failed)
    if result.timing is not None:
        lines.append(format_timing(result.timing))
    return "\n".join(lines)


def format_inputs(result: ValidationResult) -> str:
    """`inputs (synthetic): x[1,3,16,16] float32, ids[1,7..40] int64`: each input's shape
    over all samples (a size that varies as its range), at most `LISTED_INPUTS` of them."""
    listed = [fed.text() for fed in result.inputs[:LISTED_INPUTS]]
    if len(result.inputs) > LISTED_INPUTS:
        listed.append(f"and {len(result.inputs) - LISTED_INPUTS} more (--json lists all)")
    origin = " (synthetic)" if result.synthetic else ""
    return f"inputs{origin}: {', '.join(listed)}"


def format_timing(timing: TimingResult) -> str:
    """Session creation and inference latency of both models, and candidate / reference."""
    rows = [["", "session", "latency", "fastest"]]
    for name, model_timing in (("reference", timing.reference),
                               ("candidate", timing.candidate)):
        rows.append([name, _ms(model_timing.session_seconds), _ms(model_timing.latency_seconds),
                     _ms(model_timing.latency_min_seconds)])
    rows.append(["candidate/reference", _times(timing.ratio("session_seconds")),
                 _times(timing.ratio("latency_seconds")), ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"timing ({PROVIDERS[0]}, models interleaved): session median of "
             f"{SESSION_REPEATS} builds, latency median of {timing.runs} runs "
             f"({TIMING_WARMUP} warm-up)"]
    lines += ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
              for row in rows]
    if timing.candidate.latency_seconds is None:
        lines.append("latency not measured: the candidate does not run on these inputs")
    return "\n".join(lines)


def _shape_text(shape: list[int] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _cos(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def _frac(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"
