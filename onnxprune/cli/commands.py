"""One function per subcommand (inspect, prune, densify, validate, sensitivity) and what
they share: settings from the options, progress bars, printed results."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from ..config import DEFAULT_ROUND_TO

log = logging.getLogger("onnxprune")


def _config_from(args: argparse.Namespace, **extra):
    from ..config import PruneConfig

    return PruneConfig(include=tuple(args.include), exclude=tuple(args.exclude),
                       min_size=args.min_size, pattern=args.pattern, **extra)


def _part_options(args: argparse.Namespace) -> dict:
    """The options parts declare that the command line (or a recipe) gave, by dest (none
    when the parser was built without them: then none was given)."""
    return {dest: getattr(args, dest) for dest in getattr(args, "part_option_dests", ())
            if getattr(args, dest, None) is not None}


def _import_numba_without_blas_probe() -> None:
    """Import numba's array maths with its BLAS probe made to fail.

    numba's first kernel call imports numba.np.arraymath, which probes for BLAS by
    importing all of scipy.linalg: ~0.3 s of a run here. No onnxprune kernel uses BLAS, and
    without it numba only computes a few inner products (np.correlate, np.cov) in a plain
    loop; numba's np.dot still finds BLAS when it is compiled. scipy imports normally
    afterwards (sparsegpt calls scipy.linalg directly).
    """
    probe = "scipy.linalg.cython_blas"
    if "numba.np.arraymath" in sys.modules or probe in sys.modules:
        return  # nothing left to save
    # "import scipy.linalg.cython_blas" now fails at once (None in sys.modules is the
    # documented import blocker; typeshed types the values as modules only)
    sys.modules[probe] = None  # type: ignore[assignment]
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass  # numba missing or broken: the kernels report it when they are needed
    finally:
        del sys.modules[probe]


def cmd_inspect(args: argparse.Namespace) -> int:
    if getattr(args, "structured", False):
        return _inspect_structured(args)
    if args.dim or args.input_shapes:
        log.warning("--dim/--input-shapes: ignored without --structured")
    _import_numba_without_blas_probe()
    from ..api import inspect
    from ..report import format_skipped, format_targets

    report = inspect(args.model, config=_config_from(args))
    if args.json:
        print(report.to_json())
        return 0
    s = report.summary
    print(f"{args.model}: {len(report.targets)} targets, {s.params:,} params, "
          f"{s.sparsity:.2%} zeros, file {s.file_bytes:,} bytes")
    _print_provenance(report)
    if report.targets:
        print(format_targets(report))
    print(format_skipped(report))
    return 0


def _inspect_structured(args: argparse.Namespace) -> int:
    """`inspect --structured`: the coupled channel groups, those `--include/--exclude/
    --min-size` leave out (as `prune --structure` selects them), and the declined
    candidates."""
    import dataclasses
    import enum

    from ..inputs import parse_dim_overrides, parse_input_shapes
    from ..io import load_model
    from ..structured import find_groups
    from ..structured.run import select_groups
    from ..structured.shapes import describe_input_shapes, macs_input_shapes

    proto = load_model(args.model, lazy=True).proto
    dims = parse_dim_overrides(args.dim) or None
    shapes = parse_input_shapes(args.input_shapes) or None
    groups, declined = find_groups(proto, allow_norm=args.allow_norm,
                                   allow_hidden=args.allow_hidden, dims=dims,
                                   input_shapes=shapes)
    groups, unselected = select_groups(groups, _config_from(args))
    macs_at = macs_input_shapes(proto, dims, shapes)

    def plain(value):  # enums by their values, for JSON
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    if args.json:
        print(json.dumps({
            "groups": [plain(dataclasses.asdict(group)) for group in groups],
            "not_selected": [plain(dataclasses.asdict(group)) | {"cause": cause.value}
                             for group, cause in unselected],
            "declined": [plain(dataclasses.asdict(d)) | {"reason": d.reason} for d in declined],
            # the input shapes MACs are estimated at, where the model's are dynamic
            "macs_at": {name: list(shape) for name, shape in macs_at.items()},
        }, indent=2))
        return 0
    print(f"{args.model}: {len(groups)} channel groups, {len(unselected)} not selected, "
          f"{len(declined)} declined candidates")
    if groups:
        rows = [("group", "kind", "channels", "members", "params", "MACs")]
        for g in groups:
            names = ", ".join(m.tensor for m in g.members[:3])
            more = f", +{len(g.members) - 3}" if len(g.members) > 3 else ""
            flags = ("" if g.output_preserving else " (not output-preserving)") + (
                f" (multiple of {g.multiple_of})" if g.multiple_of > 1 else "")
            rows.append((g.name, g.kind.value, str(g.channels),
                         f"{len(g.members)}: {names}{more}{flags}", f"{g.params:,}",
                         f"{g.macs:,}" if g.macs else "?"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                  + "  " + row[5])
        if macs_at:
            print(f"MACs estimated at {describe_input_shapes(macs_at)} (the model's input "
                  "sizes are dynamic)")
        if any(not g.macs for g in groups):
            print("MACs ?: not known from the model's shapes")
    if unselected:
        print("not selected:")
        for group, cause in unselected:
            print(f"  {group.name} ({group.kind.value}, {group.channels} channels, "
                  f"{group.params:,} params): {_UNSELECTED_WORDS[cause.value]}")
    if declined:
        print("declined:")
        for d in declined:
            also = f" (also: {', '.join(c.value for c in d.also)})" if d.also else ""
            print(f"  {d.value}: {d.reason}{also}")
    return 0


# how `inspect --structured` says why a group is not selected (by `run.Unselected` value)
_UNSELECTED_WORDS = {"kind": "not of the kinds --structure names",
                     "exclude": "matched by --exclude",
                     "include": "matched by no --include",
                     "min_size": "fewer parameters than --min-size"}


def _print_provenance(report) -> None:
    """How an already pruned model was made, checked against its weights now."""
    from ..provenance import describe_provenance

    line = describe_provenance(report.provenance or {}, report.targets)
    if line:
        print(line)


def _return_large_blocks_to_the_system() -> None:
    """Have glibc map blocks of 1 MiB and more on their own, and unmap them when freed.

    By default its threshold rises to the largest block freed so far (up to 32 MiB): after
    the first large target, the arrays of a few MiB that every target, calibration stage
    and compact payload allocates come from the heap, whose holes are not given back, and a
    calibrated prune of a 16-layer model wandered 100-150 MiB above its steady size
    (measured with tools/bench_e2e.py --case calibrated-stream). No-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (malloc.h), 1 MiB


def cmd_prune(args: argparse.Namespace) -> int:
    _import_numba_without_blas_probe()
    _return_large_blocks_to_the_system()
    from ..api import prune
    from ..inputs import parse_dim_overrides, parse_input_shapes
    from ..mask_files import MaskSet

    config = _config_from(args, sparsity=args.sparsity, method=args.method, scope=args.scope,
                          allocation=args.allocation, format=args.format, seed=args.seed,
                          calib=args.calib, calib_samples=args.calib_samples,
                          calib_mode=args.calib_mode, measure_error=args.measure_error,
                          update=args.update, refine=args.refine,
                          structure=args.structure, round_to=args.round_to,
                          latency_budget=args.latency_budget,
                          latency_table=args.latency_table,
                          latency_threads=args.latency_threads,
                          latency_calibrate=args.latency_calibrate,
                          ray_address=args.ray_address,
                          float_reference=args.float_reference,
                          allow_norm=args.allow_norm, allow_hidden=args.allow_hidden,
                          permute_channels=args.permute_channels,
                          min_target_sparsity=args.min_target_sparsity,
                          max_target_sparsity=args.max_target_sparsity,
                          options=_part_options(args),
                          synthetic_dims=parse_dim_overrides(args.dim) or None,
                          synthetic_shapes=parse_input_shapes(args.input_shapes) or None,
                          overrides=getattr(args, "overrides", ()))
    # with --structure, --sparsity is the structured share and the pattern the second stage's
    if config.pattern.is_nm and args.sparsity is not None and config.structure == "none" \
            and abs(args.sparsity - config.pattern.sparsity) > 1e-9:
        log.warning("--sparsity %s is ignored: pattern %s gives %.4g", args.sparsity,
                    config.pattern, config.pattern.sparsity)
    if config.pattern.is_nm and config.scope == "global":
        log.warning("--scope global has no effect with an N:M pattern")
    _warn_about_ignored_options(args)
    _warn_about_unused_part_options(config)
    for option in ("report", "save_masks"):
        if getattr(args, option):
            _check_side_output(getattr(args, option), "--" + option.replace("_", "-"), args)
    masks = MaskSet.load(args.apply_masks) if args.apply_masks else None
    feeds_source = _feeds_source(args, args.model, probe=True) if args.validate else None
    scheduled = bool(args.schedule or args.steps is not None or args.rounds != 1
                     or args.retrain_cmd or args.rewind)
    with _progress_bar(args, "prune") as progress:
        if scheduled:
            report = _prune_scheduled(args, config, masks, progress)
        else:
            _, report = prune(args.model, args.output, config=config, progress=progress,
                              durable=args.fsync, masks=masks,
                              return_masks=bool(args.save_masks))
    if args.save_masks and not scheduled:
        report.masks.save(args.save_masks)
    _print_prune_result(report, args)
    status = 0
    if feeds_source is not None:  # --validate
        result = _compare(args.model, args.output, args, feeds_source)
        report.validation = result.to_dict()
        from ..validate import format_result

        print(format_result(result))
        if result.passed is False:
            status = 1
            print(f"onnxprune: validation failed; the pruned model is kept at {args.output}",
                  file=sys.stderr)
    if args.report:
        _write_text_atomically(Path(args.report), report.to_json() + "\n")
    return status


# options that only `prune --validate` uses; those that shape synthetic inputs (validation,
# calibration without --calib); those of calibration. Each with its value when not given.
_VALIDATION_OPTIONS = {"data": None, "samples": None, "atol": None, "rtol": None,
                       "min_cosine": None, "min_top1": None}
_SHAPE_OPTIONS: dict[str, list[str]] = {"dim": [], "input_shapes": []}
_CALIBRATION_OPTIONS = {"calib_samples": None, "calib_mode": None}
_STRUCTURED_OPTIONS = {"round_to": DEFAULT_ROUND_TO, "allow_norm": False,
                       "allow_hidden": False}


def _warn_about_ignored_options(args: argparse.Namespace) -> None:
    """One warning line for each group of given options that the run will not use."""
    from ..methods.base import Needs
    from ..registry import METHODS

    def given(options: dict) -> str | None:
        names = ["--" + name.replace("_", "-") for name, unset in options.items()
                 if getattr(args, name) != unset]
        return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'}" if names else None

    # whether anything may calibrate: the method, an update or refinement, an allocation
    # other than the two that only read the weights, a recipe's per-target overrides
    calibrates = (args.measure_error or args.method not in METHODS
                  or METHODS.get(args.method).needs > Needs.NOTHING
                  or getattr(args, "update", "none") != "none"
                  or getattr(args, "refine", "none") != "none"
                  or args.allocation not in (None, "uniform", "global")
                  or bool(getattr(args, "overrides", ())))
    unused = given(_VALIDATION_OPTIONS)
    if unused and not args.validate:
        log.warning("%s ignored without --validate", unused)
    unused = given(_SHAPE_OPTIONS)
    # --latency-budget times the model on synthetic inputs of these shapes
    if unused and not args.validate and not (calibrates and args.calib is None) \
            and getattr(args, "latency_budget", None) is None:
        log.warning("%s ignored: no --validate and no synthetic calibration inputs", unused)
    unused = given(_CALIBRATION_OPTIONS)
    if unused and not calibrates:
        log.warning("%s ignored: method %s uses no calibration data", unused, args.method)
    unused = given(_STRUCTURED_OPTIONS)
    if unused and args.structure == "none":
        log.warning("%s ignored without --structure", unused)


def _warn_about_unused_part_options(config) -> None:
    """One warning for the part options given for parts this run does not use."""
    used = config.effective_options()
    unused = ["--" + dest.replace("_", "-") for dest in config.options if dest not in used]
    if unused:
        log.warning("%s ignored: the run uses method %s, allocation %s, format %s%s",
                    ", ".join(unused), config.method, config.allocation_name, config.format,
                    "".join(f", {kind} {name}" for kind, name in
                            (("update", config.update), ("refine", config.refine))
                            if name != "none"))


def _prune_scheduled(args: argparse.Namespace, config, masks, progress):
    """Gradual one-shot (--steps) or iterative pruning (--rounds, --retrain-cmd, --rewind)."""
    from ..errors import ConfigError
    from ..schedule import prune_gradual, prune_iterative

    if masks is not None:
        raise ConfigError("--apply-masks cannot be combined with --schedule, --steps, "
                          "--rounds, --retrain-cmd or --rewind")
    common = dict(config=config, progress=progress, durable=args.fsync,
                  save_masks=args.save_masks)
    if args.rounds == 1 and not (args.retrain_cmd or args.rewind):
        if args.steps is None:
            raise ConfigError("--schedule needs --steps K (gradual one-shot) or --rounds R "
                              "(iterative pruning)")
        return prune_gradual(args.model, args.output, steps=args.steps,
                             schedule=args.schedule or "cubic", **common)[1]
    if args.steps is not None:
        raise ConfigError("--steps is for gradual one-shot pruning; with --rounds each round "
                          "is one step")
    return prune_iterative(args.model, args.output, rounds=args.rounds,
                           retrain=args.retrain_cmd, rewind=args.rewind,
                           schedule=args.schedule or "geometric",
                           keep_last_good=args.keep_last_good, **common)[1]


def _print_prune_result(report, args: argparse.Namespace) -> None:
    """The per-target table (all targets with -v, the extremes otherwise, none with -q), then
    the totals."""
    from ..report import format_prune_table, format_structured, format_summary

    if report.structured is not None:
        print(format_structured(report, verbose=args.verbose > 0, totals_only=args.quiet))
    if report.structured is None or "then" in report.structured:  # the N:M / format stage
        if not args.quiet:
            print(format_prune_table(report, verbose=args.verbose > 0))
        print(format_summary(report))
    if report.channel_permutations is not None:
        moved = report.channel_permutations
        gains = ", ".join(f"{e['target']} +{100 * e['kept_score_gain']:.2f}%" for e in moved)
        print(f"channels permuted before pruning: {len(moved)} target(s)"
              + (f" (kept N:M score: {gains})" if moved else ""))
    if args.verbose and report.provenance:
        print(f"metadata_props of {args.output}:")
        for key, value in report.provenance.items():
            print(f"  {key} = {value}")


def _check_side_output(path: str, option: str, args: argparse.Namespace) -> None:
    """A report or mask file must not overwrite the model or the pruned output."""
    from ..errors import OutputPathError
    from ..io import check_output_path

    check_output_path(path, args.model)
    if Path(path).resolve() == Path(args.output).resolve():
        raise OutputPathError(f"{option} {path} is the output model's path")


def cmd_densify(args: argparse.Namespace) -> int:
    from ..formats import densify_model
    from ..io import check_output_path, load_model, model_file_bytes, save_model

    output = check_output_path(args.output, args.model)
    loaded = load_model(args.model)
    count = densify_model(loaded.proto, loaded.base_dir)
    save_model(loaded, output, durable=args.fsync)
    print(f"{args.model}: {count} sparse/compact tensor(s) made dense; wrote {output} "
          f"({model_file_bytes(output):,} bytes)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ..validate import format_result

    result = _compare(args.reference, args.candidate, args, _feeds_source(args, args.reference))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_result(result))
    return 1 if result.passed is False else 0  # None: no tolerance given, not checked


def _feeds_source(args: argparse.Namespace, model: str, probe: bool = False) -> dict:
    """Parse the input options and build the feeds for `model` up front, so bad values, data
    files that do not fit the model (names, dtypes, shapes) and, with `probe`, inputs the
    model cannot run on fail before any work."""
    from ..errors import ConfigError
    from ..inputs import parse_dim_overrides, parse_input_shapes
    from ..io import model_file_bytes
    from ..validate import check_reference_runs, validation_feeds

    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    feeds, synthetic = validation_feeds(
        model, data=args.data, samples=args.samples, seed=getattr(args, "seed", 0),
        dims=parse_dim_overrides(args.dim), input_shapes=parse_input_shapes(args.input_shapes))
    session = None
    if probe:
        session = check_reference_runs(model, feeds, synthetic)
        if args.timing or model_file_bytes(model) > KEEP_PROBE_SESSION_BYTES:
            session = None  # timed sessions are built fresh; a large one would sit in memory
    return {"feeds": feeds, "synthetic": synthetic, "session": session}


# `prune --validate` runs the reference once before pruning, to refuse inputs it cannot run
# on, and keeps that session for the comparison unless the model is larger than this: the
# session would otherwise stay in memory beside the whole prune
KEEP_PROBE_SESSION_BYTES = 512 << 20


def _compare(reference: str, candidate: str, args: argparse.Namespace, source: dict):
    from ..validate import compare_models

    if source.get("session") is not None:
        reference = source["session"]
    return compare_models(reference, candidate, source["feeds"], synthetic=source["synthetic"],
                          atol=args.atol, rtol_l2=args.rtol, min_cosine=args.min_cosine,
                          min_top1=args.min_top1,
                          timing_runs=args.timing_runs if args.timing else None)


@contextlib.contextmanager
def _progress_bar(args: argparse.Namespace, label: str):
    """A per-target progress callback: a bar on an interactive stderr, else None."""
    from ..progress import progress_bar

    with progress_bar(label, unit="target", quiet=args.quiet) as bar:
        yield bar.callback() if bar.shown else None


def _write_text_atomically(path: Path, text: str) -> None:
    from ..io import write_file_atomically

    write_file_atomically(path, lambda fh: fh.write(text), binary=False)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    _import_numba_without_blas_probe()
    from ..errors import ConfigError
    from ..inputs import parse_dim_overrides, parse_input_shapes
    from ..io import load_model
    from ..sensitivity_sweep import DEFAULT_LEVELS, PlotUnavailable, check_levels, plot

    structured = args.structure != "none"
    if args.levels is None:
        from ..structured.sensitivity import LEVELS

        levels = list(LEVELS if structured else DEFAULT_LEVELS)
    else:
        try:
            levels = check_levels([float(v) for v in args.levels.split(",") if v.strip()])
        except ValueError as exc:
            raise ConfigError(f"--levels must be numbers separated by commas, got "
                              f"{args.levels!r}") from exc
    extra: dict = dict(structure=args.structure, round_to=args.round_to,
                       allow_norm=args.allow_norm, allow_hidden=args.allow_hidden)
    if not structured:
        ignored = [f"--{name.replace('_', '-')}" for name, unset in _STRUCTURED_OPTIONS.items()
                   if getattr(args, name) != unset]
        if ignored:
            log.warning("%s: ignored without --structure", ", ".join(ignored))
        extra = {}
    config = _config_from(args, method=args.method, calib=args.calib,
                          calib_samples=args.calib_samples, seed=args.seed,
                          synthetic_dims=parse_dim_overrides(args.dim) or None,
                          synthetic_shapes=parse_input_shapes(args.input_shapes) or None,
                          **extra)
    if structured and config.pattern.is_nm:
        raise ConfigError("sensitivity --structure sweeps channel groups; --pattern does not "
                          "apply")
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"-o {folder}: not a folder")
    if (args.workers or 1) > 1 or args.ray_address:
        if structured:
            raise ConfigError("sensitivity --structure runs in one process: --workers and "
                              "--ray-address apply to per-target curves")
        from ..search.distributed import sweep_in_workers

        result = sweep_in_workers(args.model, config, levels, args.workers, args.ray_address)
    else:
        loaded = load_model(args.model)
        with _sweep_progress(args, levels) as progress:
            result = _sensitivity_curves(loaded, config, levels, progress)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(args.model).name.removesuffix(".onnx")
    json_path = folder / f"{stem}.sensitivity.json"
    _write_text_atomically(json_path, result.to_json() + "\n")
    what = (f"{len(result.targets)} groups of --structure {result.structure}" if structured
            else f"{len(result.targets)} targets")
    how = result.method if structured else f"{result.method} {result.pattern}"
    print(f"{args.model}: {what} x {len(result.levels)} levels, {how}, {result.samples} "
          f"samples; wrote {json_path}")
    for curve in result.most_sensitive(5):
        if curve.points:
            print(f"  {curve.name}: relative L2 {curve.worst:.4g} at "
                  f"{'channels removed' if structured else 'sparsity'} "
                  f"{curve.points[-1].sparsity:g}")
    png_path = folder / f"{stem}.sensitivity.png"
    try:
        temporary = folder / f".{png_path.name}.tmp.png"
        plot(result, temporary)
        os.replace(temporary, png_path)
        print(f"wrote {png_path}")
    except PlotUnavailable as exc:
        print(f"onnxprune: warning: {exc}", file=sys.stderr)
    return 0


def _sensitivity_curves(loaded, config, levels: list[float], progress):
    """The curves of every target (densified first) or, with --structure, of every group."""
    if config.structure == "none":
        from ..formats import densify_model
        from ..sensitivity_sweep import analyze

        densify_model(loaded.proto, loaded.base_dir)
        return analyze(loaded, config, levels=levels, progress=progress)
    from ..structured.run import score_groups
    from ..structured.sensitivity import group_curves

    return group_curves(loaded, score_groups(loaded, config), config, levels=levels,
                        progress=progress)


@contextlib.contextmanager
def _sweep_progress(args: argparse.Namespace, levels: list[float]):
    """A per-sweep-point progress callback: a tqdm bar on an interactive stderr, else None."""
    if args.quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc="sensitivity", unit="point", file=sys.stderr, leave=False) as bar:
        def advance(swept, level, points):
            bar.total = points  # targets x levels, known once the targets are found
            bar.set_postfix_str(f"{swept.name[-32:]} @ {level:g}")
            bar.update()

        yield advance


def cmd_search(args: argparse.Namespace) -> int:
    _import_numba_without_blas_probe()
    from ..inputs import parse_dim_overrides, parse_input_shapes
    from ..search import Constraint, search
    from ..search.space import load_space, merged, space_from_lists

    constraint = Constraint(atol=args.atol, rtol=args.rtol, min_cosine=args.min_cosine,
                            min_top1=args.min_top1, eval_cmd=args.eval_cmd,
                            minimum=args.minimum, maximum=args.maximum)
    lists = space_from_lists({"method": args.method, "pattern": args.pattern
                              if "," in args.pattern else None,
                              "allocation": args.allocation},
                             args.sparsity_range, args.resolution)
    space = merged(load_space(args.space), lists) if args.space else lists
    if args.space and args.sparsity_range is None:  # the file's range unless one is given
        space.sparsity_range = load_space(args.space).sparsity_range
    if args.space and args.resolution is None:
        space.resolution = load_space(args.space).resolution
    if "," in args.pattern:  # a list of patterns to try: each candidate sets its own
        args.pattern = "unstructured"
    base = _config_from(args, seed=args.seed, calib=args.calib, calib_samples=args.calib_samples,
                        calib_mode=args.calib_mode, structure=args.structure,
                        format=args.format,
                        synthetic_dims=parse_dim_overrides(args.dim) or None,
                        synthetic_shapes=parse_input_shapes(args.input_shapes) or None)
    log.info("search: constraint %s, objective %s", constraint.describe(), args.objective)
    if args.objective == "latency" and (args.workers or 2) > 1:
        log.warning("--objective latency times trials while others run: use --workers 1 "
                    "for latencies you can compare")

    def on_trial(trial, candidate) -> None:
        verdict = ("error: " + trial.error) if trial.error else (
            "meets" if trial.passed else "fails")
        metric = trial.metrics.get(constraint.metric)
        shown = f" {constraint.metric} {metric:.4g}" if metric is not None else ""
        print(f"trial {trial.number:3d}  {candidate.label:40s}  sparsity {trial.sparsity:.3f}"
              f"  {verdict}{shown}  ({trial.seconds:.1f} s)", file=sys.stderr)

    result = search(args.model, args.output, space=space, base=base, constraint=constraint,
                    objective=args.objective, data=args.data, samples=args.samples,
                    workers=args.workers, ray_address=args.ray_address,
                    max_trials=args.trials, searcher=args.searcher,
                    on_trial=None if args.quiet else on_trial)
    summary = json.loads(result.files["json"].read_text()) if "json" in result.files else {}
    summary.pop("trials", None)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for candidate in result.candidates:
            answer = result.answers.get(candidate.number)
            print(f"{candidate.label}: " + (f"highest passing sparsity {answer:.3f}"
                                            if answer is not None else "no level passes"))
        best = result.best
        if best is None:
            print(f"no trial meets the constraint ({constraint.describe()}); nothing written")
        else:
            print(f"best: {', '.join(f'{k}={v}' for k, v in best.settings.items()) or 'default'}"
                  f" at sparsity {best.sparsity:.3f} (reached {best.achieved:.4f}, "
                  f"{best.file_bytes:,} bytes) -> {args.output}")
        print(f"{len(result.trials)} trials in {result.seconds:.1f} s; table: "
              f"{result.files.get('csv')}, plot: {result.files.get('png', 'not drawn')}")
    if result.interrupted:
        return 130
    return 0 if result.best is not None else 1


COMMANDS = {"inspect": cmd_inspect, "prune": cmd_prune, "densify": cmd_densify,
            "validate": cmd_validate, "sensitivity": cmd_sensitivity, "search": cmd_search}
