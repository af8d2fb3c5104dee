"""The `onnxprune` command line: argparse subcommands mapped onto the Python API.

Heavy modules (onnx, onnxruntime, numba) are imported inside the commands so that
`onnxprune --help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("onnxprune")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target selection")
    group.add_argument("--include", action="append", default=[], metavar="REGEX",
                       help="only tensors whose name matches (repeatable); also admits "
                            "embeddings")
    group.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                       help="skip tensors whose name matches (repeatable)")
    group.add_argument("--min-size", type=int, default=4096, metavar="N",
                       help="skip tensors with fewer than N elements [4096]")
    group.add_argument("--pattern", default="unstructured", metavar="P",
                       help="'unstructured' or N:M such as 2:4 [unstructured]")


def _add_check_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation inputs and tolerances")
    group.add_argument("--data", metavar="NPZ",
                       help="inputs: an .npz keyed by graph input names, or a folder of .npz")
    group.add_argument("--samples", type=int, default=None, metavar="N",
                       help="number of samples (synthetic inputs: default 4)")
    group.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                       help="value for a named dynamic dimension of synthetic inputs "
                            "(repeatable)")
    group.add_argument("--input-shapes", action="append", default=[],
                       metavar="NAME:[d0,d1,...]",
                       help="full shape of a synthetic input, named or unnamed dynamic dims "
                            "alike (repeatable; several separated by spaces in one argument)")
    group.add_argument("--atol", type=float, default=None,
                       help="fail if the max abs diff exceeds this")
    group.add_argument("--rtol", type=float, default=None,
                       help="fail if the relative L2 error exceeds this")
    group.add_argument("--min-cosine", type=float, default=None,
                       help="fail if the cosine similarity is below this")
    group.add_argument("--min-top1", type=float, default=None,
                       help="fail if the top-1 agreement is below this")
    _add_timing_options(parser)


def _add_timing_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timing")
    group.add_argument("--timing", action="store_true",
                       help="also time session creation and inference of both models in "
                            "onnxruntime (CPU), interleaved; pruning alone does not make a "
                            "model faster there")
    group.add_argument("--timing-runs", type=int, default=20, metavar="N",
                       help="timed inference runs per model, after 3 warm-up runs [20]")


def _add_fsync_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fsync", action="store_true",
                        help="flush OUT to disk before it is renamed into place, so that it "
                             "survives a power loss (slower; the rename alone already keeps "
                             "a failed run from leaving a partial file)")


def _choices_help(registry, default: str, first: str | None = None) -> str:
    """`a | b | c [default]` from a registry's names (no part is imported)."""
    names = ([first] if first else []) + registry.names()
    return f"{' | '.join(names)} [{default}]"


def build_parser() -> argparse.ArgumentParser:
    from .registry import ALLOCATIONS, FORMATS, METHODS, REFINES, UPDATES

    parser = _Parser(prog="onnxprune",
                     description="Prune the weights of ONNX models and check them in onnxruntime.")
    parser.add_argument("--version", action="version", version="onnxprune 0.1.0")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="list prunable targets and skipped tensors",
                                  description="List every prunable target (op, shape, reduction "
                                              "axis, sparsity, 2:4, bytes) and every skipped "
                                              "tensor with the reason.")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true", help="print the JSON report only")
    _add_selection_options(inspect)
    _add_logging_options(inspect)

    prune = commands.add_parser("prune", help="prune a model and write the result",
                                description="Prune MODEL and write OUT atomically.")
    prune.add_argument("model")
    prune.add_argument("-o", "--output", required=True, metavar="OUT")
    prune.add_argument("--sparsity", type=float, default=None, metavar="F",
                       help="fraction of weights set to zero, 0 <= F < 1 [0.5]; N:M patterns "
                            "set their own")
    prune.add_argument("--method", default="magnitude", metavar="M",
                       help=_choices_help(METHODS, "magnitude"))
    prune.add_argument("--scope", default="layer", choices=("layer", "global"),
                       help="layer, or global: short for --allocation global [layer]")
    prune.add_argument("--allocation", default=None, metavar="A",
                       help=_choices_help(ALLOCATIONS, "uniform"))
    prune.add_argument("--format", default="dense", metavar="F",
                       help=_choices_help(FORMATS, "dense"))
    prune.add_argument("--update", default="none", metavar="U",
                       help="reconstruct the kept weights after the mask is chosen: "
                            + _choices_help(UPDATES, "none", first="none"))
    prune.add_argument("--refine", default="none", metavar="R",
                       help="improve the mask before it is applied: "
                            + _choices_help(REFINES, "none", first="none"))
    prune.add_argument("--permute-channels", action="store_true",
                       help="N:M: permute input channels where the graph allows it (MLP "
                            "layers fed through element-wise ops) so groups keep more")
    settings = prune.add_argument_group("method and allocation settings")
    settings.add_argument("--ria-alpha", type=float, default=0.5, metavar="A",
                          help="ria: exponent of the input norm [0.5]")
    settings.add_argument("--admm-iters", type=int, default=20, metavar="N",
                          help="admm: iterations [20]")
    settings.add_argument("--admm-rho", type=float, default=1.0, metavar="RHO",
                          help="admm: penalty relative to mean diag(X^T X) [1.0]")
    settings.add_argument("--admm-fixed-mask", action="store_true",
                          help="admm: keep the first mask instead of choosing it gradually")
    settings.add_argument("--dsnot-iters", type=int, default=50, metavar="N",
                          help="dsnot: prune-and-grow cycles per row [50]")
    settings.add_argument("--owl-threshold", type=float, default=5.0, metavar="M",
                          help="owl: outliers are scores above M x the layer mean [5]")
    settings.add_argument("--owl-lambda", type=float, default=0.08, metavar="L",
                          help="owl: largest departure from the target sparsity [0.08]")
    settings.add_argument("--min-target-sparsity", type=float, default=None, metavar="F",
                          help="non-uniform allocations: no target below F")
    settings.add_argument("--max-target-sparsity", type=float, default=None, metavar="F",
                          help="non-uniform allocations: no target above F")
    settings.add_argument("--max-error", type=float, default=None, metavar="E",
                          help="sensitivity allocation: the highest overall sparsity whose "
                               "predicted output error stays under E")
    settings.add_argument("--sensitivity", default=None, metavar="JSON",
                          help="sensitivity allocation: curves from `onnxprune sensitivity`")
    prune.add_argument("--seed", type=int, default=0, help="randomness (random method, "
                                                           "synthetic inputs) [0]")
    prune.add_argument("--report", metavar="PATH", help="write the JSON report there")
    masks = prune.add_argument_group("masks")
    masks.add_argument("--save-masks", metavar="NPZ",
                       help="write the keep-masks of the result (bit-packed, by target name); "
                            "with --steps/--rounds a path with {round} gets every pass's")
    masks.add_argument("--apply-masks", metavar="NPZ",
                       help="prune exactly the positions these saved masks remove (the method "
                            "only reconstructs, if it does; targets not in the file are "
                            "pruned as planned)")
    _add_fsync_option(prune)
    steps = prune.add_argument_group("gradual and iterative pruning")
    steps.add_argument("--schedule", choices=("cubic", "geometric"),
                       help="sparsity per step or round: cubic (large steps first), geometric "
                            "(equal fractions of the remaining weights) [steps: cubic, "
                            "rounds: geometric]")
    steps.add_argument("--steps", type=int, metavar="K",
                       help="gradual one-shot: reach the sparsity in K steps, re-scoring "
                            "between them; masks only grow")
    steps.add_argument("--rounds", type=int, default=1, metavar="R",
                       help="iterative pruning: R rounds of prune, retrain, re-apply masks [1]")
    steps.add_argument("--retrain-cmd", metavar="CMD",
                       help="shell command run after each round: reads {in}, writes the "
                            "retrained model to {out}")
    steps.add_argument("--rewind", metavar="INIT.onnx",
                       help="lottery ticket: after each round the survivors take their "
                            "values in INIT.onnx (so do the tensors not pruned)")
    steps.add_argument("--keep-last-good", action="store_true",
                       help="when the retrain command fails, write the last completed "
                            "round's model to OUT")
    prune.add_argument("--recipe", metavar="FILE.toml",
                       help="options (and per-target [[override]] tables) from a TOML file; "
                            "command-line options win")
    parser.prune_parser = prune  # recipes check their keys against its options
    calib = prune.add_argument_group("calibration (methods that use it: "
                                     "wanda, obd, sparsegpt, ria, admm, any --update "
                                     "or --refine, and plug-ins)")
    calib.add_argument("--calib", metavar="PATH",
                       help=".npz keyed by graph input name, or a folder of .npz (one sample "
                            "each); without it synthetic inputs are used, with a warning")
    calib.add_argument("--calib-samples", type=int, metavar="N",
                       help="use at most N calibration samples")
    calib.add_argument("--calib-mode", choices=("sequential", "one-pass"),
                       help="sequential (default for sparsegpt and admm): each layer calibrated "
                            "on the already pruned model; one-pass: all on the dense model "
                            "(faster)")
    calib.add_argument("--measure-error", action="store_true",
                       help="calibrate every target to report its reconstruction error, "
                            "also for methods that need no calibration and where one-pass "
                            "calibration would skip it to save memory")
    prune.add_argument("--validate", action="store_true",
                       help="run input and output in onnxruntime and compare; exit 1 if a "
                            "tolerance fails")
    _add_selection_options(prune)
    _add_check_options(prune)
    _add_logging_options(prune)

    densify = commands.add_parser("densify", help="turn sparse and compact tensors dense",
                                  description="Write MODEL with every sparse tensor and every "
                                              "onnxprune compact tensor turned back into a "
                                              "plain dense tensor, bit-exact.")
    densify.add_argument("model")
    densify.add_argument("-o", "--output", required=True, metavar="OUT")
    _add_fsync_option(densify)
    _add_logging_options(densify)

    validate = commands.add_parser("validate", help="compare two models in onnxruntime",
                                   description="Run REFERENCE and CANDIDATE on the same inputs "
                                               "and report max abs diff, relative L2, cosine "
                                               "and top-1 agreement; exit 1 if a tolerance "
                                               "fails.")
    validate.add_argument("reference")
    validate.add_argument("candidate")
    validate.add_argument("--json", action="store_true", help="print the JSON result only")
    validate.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs [0]")
    _add_check_options(validate)
    _add_logging_options(validate)
    _add_sensitivity_parser(commands)
    return parser


def _add_sensitivity_parser(commands) -> None:
    sensitivity = commands.add_parser(
        "sensitivity", help="per-target sensitivity curves (JSON + PNG)",
        description="Prune each target alone at each sparsity level and measure how the "
                    "model's outputs degrade in onnxruntime (relative L2, cosine, top-1); "
                    "write the curves as DIR/MODEL.sensitivity.json and a plot as "
                    "DIR/MODEL.sensitivity.png (needs matplotlib: the `plot` extra).")
    sensitivity.add_argument("model")
    sensitivity.add_argument("-o", "--output", default=".", metavar="DIR",
                             help="folder for the JSON and PNG (made if missing) [.]")
    sensitivity.add_argument("--method", default="magnitude", metavar="M",
                             help="how each target is pruned [magnitude]")
    sensitivity.add_argument("--levels", default=None, metavar="S1,S2,...",
                             help="sparsity levels to sweep [0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95]")
    sensitivity.add_argument("--calib", metavar="PATH",
                             help="inputs: .npz keyed by graph input name, or a folder of "
                                  ".npz; without it synthetic inputs, with a warning")
    sensitivity.add_argument("--calib-samples", type=int, metavar="N",
                             help="use at most N samples")
    sensitivity.add_argument("--seed", type=int, default=0, help="synthetic inputs [0]")
    _add_selection_options(sensitivity)
    _add_logging_options(sensitivity)


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="less logging")


@contextlib.contextmanager
def _logging_to_stderr(args: argparse.Namespace):
    """Log to stderr for one command; put the logger back after (main() may run in-process)."""
    root = logging.getLogger("onnxprune")
    saved = (root.handlers[:], root.level, root.propagate)
    _setup_logging(args)
    try:
        yield
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", 0):
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if getattr(args, "quiet", False):
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("onnxprune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _config_from(args: argparse.Namespace, **extra):
    from .config import PruneConfig

    return PruneConfig(include=tuple(args.include), exclude=tuple(args.exclude),
                       min_size=args.min_size, pattern=args.pattern, **extra)


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
    sys.modules[probe] = None  # "import scipy.linalg.cython_blas" now fails at once
    try:
        import numba.np.arraymath  # noqa: F401
    except ImportError:
        pass  # numba missing or broken: the kernels report it when they are needed
    finally:
        del sys.modules[probe]


def cmd_inspect(args: argparse.Namespace) -> int:
    _import_numba_without_blas_probe()
    from .api import inspect
    from .report import format_skipped, format_targets

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


def _print_provenance(report) -> None:
    """How an already pruned model was made, checked against its weights now."""
    from .provenance import describe_provenance

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
    from .api import prune
    from .inputs import parse_dim_overrides, parse_input_shapes
    from .masks import MaskSet

    config = _config_from(args, sparsity=args.sparsity, method=args.method, scope=args.scope,
                          allocation=args.allocation, format=args.format, seed=args.seed,
                          calib=args.calib, calib_samples=args.calib_samples,
                          calib_mode=args.calib_mode, measure_error=args.measure_error,
                          update=args.update, refine=args.refine, ria_alpha=args.ria_alpha,
                          permute_channels=args.permute_channels,
                          admm_iters=args.admm_iters, admm_rho=args.admm_rho,
                          admm_gradual=not args.admm_fixed_mask,
                          dsnot_iters=args.dsnot_iters, owl_threshold=args.owl_threshold,
                          owl_lambda=args.owl_lambda,
                          min_target_sparsity=args.min_target_sparsity,
                          max_target_sparsity=args.max_target_sparsity,
                          max_error=args.max_error, sensitivity=args.sensitivity,
                          synthetic_dims=parse_dim_overrides(args.dim) or None,
                          synthetic_shapes=parse_input_shapes(args.input_shapes) or None,
                          overrides=getattr(args, "overrides", ()))
    if config.pattern.is_nm and args.sparsity is not None \
            and abs(args.sparsity - config.pattern.sparsity) > 1e-9:
        log.warning("--sparsity %s is ignored: pattern %s gives %.4g", args.sparsity,
                    config.pattern, config.pattern.sparsity)
    if config.pattern.is_nm and config.scope == "global":
        log.warning("--scope global has no effect with an N:M pattern")
    _warn_about_ignored_options(args)
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
    if args.validate:
        result = _compare(args.model, args.output, args, feeds_source)
        report.validation = result.to_dict()
        from .validate import format_result

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
_SHAPE_OPTIONS = {"dim": [], "input_shapes": []}
_CALIBRATION_OPTIONS = {"calib_samples": None, "calib_mode": None}


def _warn_about_ignored_options(args: argparse.Namespace) -> None:
    """One warning line for each group of given options that the run will not use."""
    from .methods.base import Needs
    from .registry import METHODS

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
    if unused and not args.validate and not (calibrates and args.calib is None):
        log.warning("%s ignored: no --validate and no synthetic calibration inputs", unused)
    unused = given(_CALIBRATION_OPTIONS)
    if unused and not calibrates:
        log.warning("%s ignored: method %s uses no calibration data", unused, args.method)


def _prune_scheduled(args: argparse.Namespace, config, masks, progress):
    """Gradual one-shot (--steps) or iterative pruning (--rounds, --retrain-cmd, --rewind)."""
    from .errors import ConfigError
    from .schedule import prune_gradual, prune_iterative

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
    """The per-target table (all targets with -v, the extremes otherwise), then the totals."""
    from .report import format_prune_table, format_summary

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
    from .errors import OutputPathError
    from .io import check_output_path

    check_output_path(path, args.model)
    if Path(path).resolve() == Path(args.output).resolve():
        raise OutputPathError(f"{option} {path} is the output model's path")


def cmd_densify(args: argparse.Namespace) -> int:
    from .formats import densify_model
    from .io import check_output_path, load_model, model_file_bytes, save_model

    output = check_output_path(args.output, args.model)
    loaded = load_model(args.model)
    count = densify_model(loaded.proto, loaded.base_dir)
    save_model(loaded, output, durable=args.fsync)
    print(f"{args.model}: {count} sparse/compact tensor(s) made dense; wrote {output} "
          f"({model_file_bytes(output):,} bytes)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import format_result

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
    from .errors import ConfigError
    from .inputs import parse_dim_overrides, parse_input_shapes
    from .validate import check_reference_runs, validation_feeds

    if args.samples is not None and args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    feeds, synthetic = validation_feeds(
        model, data=args.data, samples=args.samples, seed=getattr(args, "seed", 0),
        dims=parse_dim_overrides(args.dim), input_shapes=parse_input_shapes(args.input_shapes))
    if probe:
        check_reference_runs(model, feeds, synthetic)
    return {"feeds": feeds, "synthetic": synthetic}


def _compare(reference: str, candidate: str, args: argparse.Namespace, source: dict):
    from .validate import compare_models

    return compare_models(reference, candidate, source["feeds"], synthetic=source["synthetic"],
                          atol=args.atol, rtol_l2=args.rtol, min_cosine=args.min_cosine,
                          min_top1=args.min_top1,
                          timing_runs=args.timing_runs if args.timing else None)


@contextlib.contextmanager
def _progress_bar(args: argparse.Namespace, label: str):
    """A per-target progress callback: a bar on an interactive stderr, else None."""
    from .progress import progress_bar

    with progress_bar(label, unit="target", quiet=args.quiet) as bar:
        yield bar.callback() if bar.shown else None


def _write_text_atomically(path: Path, text: str) -> None:
    from .io import write_file_atomically

    write_file_atomically(path, lambda fh: fh.write(text), binary=False)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    _import_numba_without_blas_probe()
    from .errors import ConfigError
    from .io import load_model
    from .sensitivity import DEFAULT_LEVELS, PlotUnavailable, analyze, check_levels, plot

    if args.levels is None:
        levels = list(DEFAULT_LEVELS)
    else:
        try:
            levels = check_levels(float(v) for v in args.levels.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--levels must be numbers separated by commas, got "
                              f"{args.levels!r}") from None
    config = _config_from(args, method=args.method, calib=args.calib,
                          calib_samples=args.calib_samples, seed=args.seed)
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"-o {folder}: not a folder")
    loaded = load_model(args.model)
    from .formats import densify_model

    densify_model(loaded.proto, loaded.base_dir)
    with _sweep_progress(args, levels) as progress:
        result = analyze(loaded, config, levels=levels, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(args.model).name.removesuffix(".onnx")
    json_path = folder / f"{stem}.sensitivity.json"
    _write_text_atomically(json_path, result.to_json() + "\n")
    print(f"{args.model}: {len(result.targets)} targets x {len(result.levels)} levels, "
          f"{result.method} {result.pattern}, {result.samples} samples; wrote {json_path}")
    for curve in result.most_sensitive(5):
        print(f"  {curve.name}: relative L2 {curve.worst:.4g} at sparsity "
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


@contextlib.contextmanager
def _sweep_progress(args: argparse.Namespace, levels: list[float]):
    """A per-sweep-point progress callback: a tqdm bar on an interactive stderr, else None."""
    if args.quiet or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc="sensitivity", unit="point", file=sys.stderr, leave=False) as bar:
        def advance(target, level, points):
            bar.total = points  # targets x levels, known once the targets are found
            bar.set_postfix_str(f"{target.name[-32:]} @ {level:g}")
            bar.update()

        yield advance


COMMANDS = {"inspect": cmd_inspect, "prune": cmd_prune, "densify": cmd_densify,
            "validate": cmd_validate, "sensitivity": cmd_sensitivity}


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status: 0 success, 1 validation failed, 2 user
    error, 3 internal error (a bug), 130 interrupted, 141 stdout closed by its reader."""
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return 2
        with _logging_to_stderr(args):
            if getattr(args, "recipe", None):  # its values become defaults: options win
                from .recipe import parse_with_recipe

                args = parse_with_recipe(parser, parser.prune_parser, argv, args.recipe)
            return COMMANDS[args.command](args)
    except SystemExit:
        raise
    except BaseException as exc:  # every way a command can end gets its exit status here
        return _exit_status(exc, verbose=getattr(args, "verbose", 0))


def _exit_status(exc: BaseException, verbose: int) -> int:
    """Say in one line on stderr how the command ended, and return its exit status."""
    from .errors import OnnxPruneError, ValidationFailed

    if _interrupted(exc):
        _say("onnxprune: interrupted")
        return 130
    if isinstance(exc, BrokenPipeError) and _stdout_reader_gone():
        _discard_stdout()  # what is still buffered cannot be delivered
        return 141  # 128 + SIGPIPE, as a tool killed by the closed pipe reports
    if isinstance(exc, (OnnxPruneError, ValidationFailed)):
        _say(f"onnxprune: error: {exc}")
        return exc.exit_code
    if isinstance(exc, MemoryError):
        _say("onnxprune: error: out of memory")
        return 2
    if verbose or not isinstance(exc, Exception):
        raise exc
    _say(f"onnxprune: internal error: {type(exc).__name__}: {exc} "
         "(run with -v for the traceback)")
    return 3


def _interrupted(exc: BaseException) -> bool:
    """Whether Ctrl-C caused `exc`: a KeyboardInterrupt anywhere in its chain.

    A SIGINT that lands inside compiled code (a numba kernel, onnxruntime) can surface as
    "SystemError: ... returned a result with an exception set", with the KeyboardInterrupt
    as its context.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        stack += [current.__cause__, current.__context__]
    return False


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (`onnxprune inspect M | head -1`).

    The write end of such a pipe polls as an error; a BrokenPipeError from another pipe
    (a child process) leaves stdout healthy.
    """
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no real file behind stdout
        return False


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that no later flush raises again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def _say(line: str) -> None:
    """One line on stderr; a closed stderr leaves nothing to say it on."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def run() -> None:
    """The console script: `main`, then exit without the interpreter's teardown.

    The output is committed (renamed into place) and the report written before `main`
    returns; what remains is finalising numba and llvmlite, which costs ~0.3 s a run here.
    """
    status = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)


if __name__ == "__main__":
    run()
