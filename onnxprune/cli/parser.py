"""The argument parser of every subcommand and the options they share."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import CALIB_MODES, SCOPES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of a usage dump."""

    # the `prune` subcommand's parser, set on the top-level parser by `build_parser`
    prune_parser: argparse.ArgumentParser

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_selection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target selection")
    group.add_argument("--include", action="append", default=[], metavar="REGEX",
                       help="only tensors whose name matches (repeatable); also admits "
                            "embeddings")
    group.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                       help="skip tensors whose name matches (repeatable)")
    group.add_argument("--min-size", type=_at_least(0), default=_default("min_size"),
                       metavar="N", help="skip tensors with fewer than N elements "
                                         f"[{_default('min_size')}]")
    group.add_argument("--pattern", default=str(_default("pattern")), metavar="P",
                       help=f"'unstructured' or N:M such as 2:4 [{_default('pattern')}]")


def _add_shape_options(group) -> None:
    group.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE",
                       help="value for a named dynamic dimension of synthetic inputs "
                            "(repeatable)")
    group.add_argument("--input-shapes", action="append", default=[],
                       metavar="NAME:[d0,d1,...]",
                       help="full shape of a synthetic input, named or unnamed dynamic dims "
                            "alike (repeatable; several separated by spaces in one argument)")


def _add_check_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation inputs and tolerances")
    group.add_argument("--data", metavar="NPZ",
                       help="inputs: an .npz keyed by graph input names, or a folder of .npz")
    group.add_argument("--samples", type=_at_least(1), default=None, metavar="N",
                       help="number of samples (synthetic inputs: default 4)")
    _add_shape_options(group)
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


def _default(name: str):
    """A `PruneConfig` field's default: the one place it is written."""
    from ..config import PruneConfig

    field = next(f for f in dataclasses.fields(PruneConfig) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _choices_help(registry, default: str, first: str | None = None) -> str:
    """`a | b | c [default]` from a registry's names (no part is imported)."""
    names = ([first] if first else []) + registry.names()
    return f"{' | '.join(names)} [{default}]"


def fraction(text: str) -> float:
    """argparse type of a sparsity: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


fraction.value_type = float  # type: ignore[attr-defined]  # what recipes check values as


def budget_fraction(text: str) -> float:
    """argparse type of a latency budget: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


budget_fraction.value_type = float  # type: ignore[attr-defined]  # what recipes check


def _at_least(minimum: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    check.__name__ = "int"  # argparse names the type in its messages
    check.value_type = int  # type: ignore[attr-defined]  # what recipes check values as
    return check


def _add_round_to(group) -> None:
    group.add_argument("--round-to", type=_at_least(1), default=_default("round_to"),
                       metavar="N", help="kept channel counts are multiples of N "
                                         f"[{_default('round_to')}]")


def _add_structure_permissions(group) -> None:
    group.add_argument("--allow-norm", action="store_true",
                       help="let groups run through a normalization over their channels "
                            "(its scale and bias are cut too); the outputs then differ from "
                            "the dense model's with those channels zeroed")
    group.add_argument("--allow-hidden", action="store_true",
                       help="let a transformer's residual stream (its hidden size) be a group")


def add_part_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per part that declares options (`parts.option`), plug-ins
    included: its options with their help, bounds and defaults."""
    from ..registry import all_option_specs

    groups: dict[tuple[str, str], argparse._ArgumentGroup] = {}
    specs = all_option_specs()
    # the commands read the values by these dests without importing the parts again
    parser.set_defaults(part_option_dests=tuple(spec.dest for spec in specs))
    for spec in specs:
        key = (spec.kind, spec.part)
        if key not in groups:
            groups[key] = parser.add_argument_group(f"options of {spec.kind} {spec.part}")
        group = groups[key]
        # default None: the part's declared default applies (one default, on the part)
        if spec.type is bool:
            action = "store_true" if spec.default is False else argparse.BooleanOptionalAction
            group.add_argument(spec.option_string, action=action, default=None,
                               help=spec.help_text())
            continue

        def convert(text: str, spec=spec):
            value, problem = spec.convert(text)
            if problem:
                raise argparse.ArgumentTypeError(problem)
            return value

        convert.__name__ = spec.type.__name__
        group.add_argument(spec.option_string, type=convert, default=None,
                           metavar=spec.metavar or spec.field.upper(), help=spec.help_text())


EXAMPLES = """\
examples:
  onnxprune inspect model.onnx
  onnxprune prune model.onnx -o pruned.onnx --sparsity 0.7 --validate \\
      --data inputs.npz --min-top1 0.95
  onnxprune prune model.onnx -o pruned.onnx --pattern 2:4 --method sparsegpt --calib calib.npz
  onnxprune validate model.onnx pruned.onnx --data inputs.npz --min-cosine 0.99

exit status: 0 success, 1 validation failed, 2 user error (one line on stderr),
3 internal error, 130 interrupted
"""


def build_parser(with_parts: bool = True) -> _Parser:
    """The whole command line; `with_parts=False` leaves out the options parts declare,
    which needs every part class imported (fast checks of the other arguments)."""
    from ..registry import ALLOCATIONS, FORMATS, METHODS, REFINES, UPDATES

    parser = _Parser(prog="onnxprune",
                     description="Prune the weights of ONNX models and check them in onnxruntime.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="onnxprune 0.1.0")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    inspect = commands.add_parser("inspect", help="list prunable targets and skipped tensors",
                                  description="List every prunable target (op, shape, reduction "
                                              "axis, sparsity, 2:4, bytes) and every skipped "
                                              "tensor with the reason.")
    inspect.add_argument("model", help="the .onnx file (external data beside it is read)")
    inspect.add_argument("--json", action="store_true", help="print the JSON report only")
    _add_structure_permissions(inspect)
    inspect.add_argument("--structured", action="store_true",
                         help="list coupled channel groups (what structured pruning removes "
                              "whole: tensors, channels, params, MACs), those --include/"
                              "--exclude (on a group's or member's name) and --min-size (its "
                              "params) leave out, as prune --structure does, and every "
                              "declined candidate with its reason")
    _add_shape_options(inspect.add_argument_group(
        "input sizes (--structured: where the MACs are estimated)"))
    _add_selection_options(inspect)
    _add_logging_options(inspect)

    prune = commands.add_parser("prune", help="prune a model and write the result",
                                description="Prune MODEL and write OUT atomically.",
                                epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    prune.add_argument("model", help="the .onnx file to prune (never modified)")
    prune.add_argument("-o", "--output", required=True, metavar="OUT",
                       help="where the pruned model is written (atomically: a failed run "
                            "leaves no file)")
    prune.add_argument("--sparsity", type=fraction, default=None, metavar="F",
                       help="fraction of weights set to zero, 0 <= F < 1 [0.5]; N:M patterns "
                            "set their own. With --structure: the structured share (an N:M "
                            "--pattern then sets the second stage's own)")
    prune.add_argument("--method", default=_default("method"), metavar="M",
                       help=_choices_help(METHODS, _default("method")))
    prune.add_argument("--scope", default=_default("scope"), choices=SCOPES,
                       help=f"layer, or global: short for --allocation global "
                            f"[{_default('scope')}]")
    prune.add_argument("--allocation", default=None, metavar="A",
                       help=_choices_help(ALLOCATIONS, "uniform"))
    prune.add_argument("--format", default=_default("format"), metavar="F",
                       help=_choices_help(FORMATS, _default("format")))
    prune.add_argument("--update", default=_default("update"), metavar="U",
                       help="reconstruct the kept weights after the mask is chosen: "
                            + _choices_help(UPDATES, _default("update"), first="none"))
    prune.add_argument("--refine", default=_default("refine"), metavar="R",
                       help="improve the mask before it is applied: "
                            + _choices_help(REFINES, _default("refine"), first="none"))
    structured = prune.add_argument_group("structured pruning (whole channels removed: a "
                                          "smaller dense model)")
    structured.add_argument("--structure", default=_default("structure"), metavar="S",
                            help="what is removed whole: channels (every coupled channel "
                                 "group the analysis proves safe, feed-forward units "
                                 "included, attention heads not), ffn (hidden units of "
                                 "feed-forward blocks), heads; comma-separated to combine; "
                                 "none = unstructured [none]. --sparsity is then the "
                                 "fraction of every group's channels removed (uniform) or of "
                                 "the groups' parameters (global); --method magnitude (group "
                                 "norm), random, or calibrated: wanda, flap (with bias "
                                 "compensation), obs (structured OBS, chooses and refits); "
                                 "--update least-squares refits the consumers. An N:M "
                                 "--pattern and --format then apply to the shrunk model (its "
                                 "N:M method: --method's unstructured namesake, else wanda)")
    _add_round_to(structured)
    structured.add_argument("--latency-budget", type=budget_fraction, default=None,
                            metavar="R",
                            help="instead of --sparsity: keep the channels so that the "
                                 "output's onnxruntime CPU latency is at most R x the dense "
                                 "model's (0 < R <= 1), removing the least score per latency "
                                 "saved, by per-group latency tables measured here at the "
                                 "shapes of --dim/--input-shapes (cached per model and "
                                 "machine); the report gives predicted and measured latency")
    structured.add_argument("--latency-table", default=None, metavar="FILE",
                            help="read and write the latency tables in FILE (JSON) instead "
                                 "of the cache folder")
    structured.add_argument("--no-latency-calibration", dest="latency_calibrate",
                            action="store_false",
                            help="trust the tables' prediction: do not time the model at "
                                 "the counts they chose and allocate once more when it "
                                 "misses the budget")
    structured.add_argument("--latency-threads", type=_at_least(1), default=None,
                            metavar="N", help="intra-op threads of the timed onnxruntime "
                                              "sessions [onnxruntime's default]")
    _add_structure_permissions(structured)
    prune.add_argument("--permute-channels", action="store_true",
                       help="N:M: permute input channels where the graph allows it (MLP "
                            "layers fed through element-wise ops) so groups keep more")
    bounds = prune.add_argument_group("non-uniform allocations")
    bounds.add_argument("--min-target-sparsity", type=fraction, default=None, metavar="F",
                        help="no target below F")
    bounds.add_argument("--max-target-sparsity", type=fraction, default=None, metavar="F",
                        help="no target above F")
    if with_parts:
        add_part_options(prune)
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
    calib.add_argument("--calib-samples", type=_at_least(1), metavar="N",
                       help="use at most N calibration samples")
    calib.add_argument("--calib-mode", choices=CALIB_MODES,
                       help="sequential (default for sparsegpt and admm): each layer calibrated "
                            "on the already pruned model; one-pass: all on the dense model "
                            "(faster)")
    calib.add_argument("--float-reference", metavar="FLOAT.onnx",
                       help="for a quantized MODEL: the float model it was quantized from; "
                            "methods that rebuild weights (sparsegpt, admm, --update) start "
                            "from its float weights, found by value, and round them onto "
                            "MODEL's grid (joint sparsification and quantization)")
    calib.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="run each calibration stage's reconstructions (sparsegpt, admm) "
                            "as tasks on this Ray cluster, 'local' to start one here; the "
                            "output is the serial run's (pip install 'onnxprune[ray]')")
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
    densify.add_argument("model", help="a model with sparse or compact tensors")
    densify.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="where the dense model is written (atomically)")
    _add_fsync_option(densify)
    _add_logging_options(densify)

    validate = commands.add_parser("validate", help="compare two models in onnxruntime",
                                   epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   description="Run REFERENCE and CANDIDATE on the same inputs "
                                               "and report max abs diff, relative L2, cosine "
                                               "and top-1 agreement; exit 1 if a tolerance "
                                               "fails.")
    validate.add_argument("reference", help="the model whose outputs are taken as right "
                                            "(usually the dense one)")
    validate.add_argument("candidate", help="the model compared with it (usually the pruned "
                                            "one)")
    validate.add_argument("--json", action="store_true", help="print the JSON result only")
    validate.add_argument("--seed", type=int, default=0, help="seed of synthetic inputs [0]")
    _add_check_options(validate)
    _add_logging_options(validate)
    _add_sensitivity_parser(commands)
    _add_search_parser(commands)
    return parser


def _add_search_parser(commands) -> None:
    search = commands.add_parser(
        "search", help="the most compression that still meets a check",
        description="Find the highest sparsity (or smallest file, or lowest latency) whose "
                    "pruned model still meets a constraint: a validate tolerance against the "
                    "dense model on --data, or the number --eval-cmd prints. Each "
                    "combination of the listed methods, patterns and allocations gets a "
                    "bisection over the sparsity levels; trials run in parallel. Writes OUT "
                    "and, beside it, OUT.search.csv, OUT.search.json (every trial) and "
                    "OUT.search.png (the Pareto plot; needs matplotlib).")
    search.add_argument("model", help="the .onnx file to prune (never modified)")
    search.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="where the best pruned model is written")
    check = search.add_argument_group("constraint (one kind)")
    check.add_argument("--data", metavar="NPZ",
                       help="inputs the pruned model is checked on: .npz keyed by graph input "
                            "name, or a folder of .npz; without it synthetic inputs")
    check.add_argument("--samples", type=_at_least(1), default=None, metavar="N",
                       help="use at most N samples of --data (synthetic: default 4)")
    check.add_argument("--atol", type=float, help="max abs diff at most this")
    check.add_argument("--rtol", type=float, help="relative L2 error at most this")
    check.add_argument("--min-cosine", type=float, help="cosine similarity at least this")
    check.add_argument("--min-top1", type=float, help="top-1 agreement at least this")
    check.add_argument("--eval-cmd", metavar="CMD",
                       help="shell command run on each pruned model, {model} replaced by its "
                            "path; its last output line is the number --min/--max bound")
    check.add_argument("--min", dest="minimum", type=float, metavar="X",
                       help="--eval-cmd's number must be at least X")
    check.add_argument("--max", dest="maximum", type=float, metavar="X",
                       help="--eval-cmd's number must be at most X")
    space = search.add_argument_group("search space")
    space.add_argument("--method", default=None, metavar="M1,M2,...",
                       help="methods to try, comma-separated [magnitude]")
    space.add_argument("--allocation", default=None, metavar="A1,A2,...",
                       help="allocations to try, comma-separated [uniform]")
    space.add_argument("--sparsity-range", type=_sparsity_range, default=None,
                       metavar="LOW,HIGH", help="sparsity levels searched [0.05,0.95]")
    space.add_argument("--resolution", type=float, default=None, metavar="STEP",
                       help="grid step of the sparsity levels [0.01]")
    space.add_argument("--space", metavar="FILE.toml",
                       help="choices as lists ([space]) and options of every trial ([base]); "
                            "the command line wins")
    space.add_argument("--structure", default="none", metavar="S",
                       help="remove whole channels (as prune --structure); the sparsity "
                            "searched is then the structured share [none]")
    space.add_argument("--format", default="dense", metavar="F",
                       help="storage of every trial (dense, sparse, compact) [dense]")
    space.add_argument("--objective", choices=("sparsity", "size", "latency"),
                       default="sparsity",
                       help="what the best candidate has: the highest sparsity, the smallest "
                            "file (with --format), or the lowest onnxruntime latency [sparsity]")
    space.add_argument("--trials", type=_at_least(1), default=None, metavar="N",
                       help="stop after N trials (the best so far is written) [bisect: "
                            "until every bisection ends; optuna: 40]")
    space.add_argument("--searcher", choices=("bisect", "optuna"), default="bisect",
                       help="bisect: a bisection over the sparsity levels per candidate "
                            "(deterministic, the same answer for any --workers); optuna: "
                            "TPE over candidates and levels together, for large spaces "
                            "(pip install 'onnxprune[search]') [bisect]")
    run = search.add_argument_group("where trials run")
    _add_worker_options(run, "run the trials", "the CPUs of this machine")
    calib = search.add_argument_group("calibration (of the calibrated methods)")
    calib.add_argument("--calib", metavar="PATH", help="as prune --calib")
    calib.add_argument("--calib-samples", type=_at_least(1), metavar="N",
                       help="use at most N calibration samples")
    calib.add_argument("--calib-mode", choices=CALIB_MODES,
                       help="as prune --calib-mode (one-pass statistics are captured once "
                            "for every trial)")
    search.add_argument("--seed", type=int, default=0, help="randomness [0]")
    search.add_argument("--json", action="store_true",
                        help="print the search summary as JSON on stdout")
    _add_shape_options(search.add_argument_group("input sizes"))
    _add_selection_options(search)
    _add_logging_options(search)


def _add_worker_options(group, work: str, default: str, note: str = "") -> None:
    """--workers and --ray-address: where `work` runs."""
    group.add_argument("--workers", type=_at_least(1), default=None, metavar="N",
                       help=f"{work} in N local processes{note} [{default}]")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help=f"{work} on this Ray cluster ('local': start one here; pip "
                            "install 'onnxprune[ray]')")


def _sparsity_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def _add_sensitivity_parser(commands) -> None:
    sensitivity = commands.add_parser(
        "sensitivity", help="per-target sensitivity curves (JSON + PNG)",
        description="Prune each target alone at each sparsity level and measure how the "
                    "model's outputs degrade in onnxruntime (relative L2, cosine, top-1); "
                    "write the curves as DIR/MODEL.sensitivity.json and a plot as "
                    "DIR/MODEL.sensitivity.png (needs matplotlib: the `plot` extra).")
    sensitivity.add_argument("model", help="the .onnx file to analyse")
    sensitivity.add_argument("-o", "--output", default=".", metavar="DIR",
                             help="folder for the JSON and PNG (made if missing) [.]")
    sensitivity.add_argument("--method", default="magnitude", metavar="M",
                             help="how each target is pruned [magnitude]")
    sensitivity.add_argument("--levels", default=None, metavar="S1,S2,...",
                             help="sparsity levels to sweep [0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95; "
                                  "with --structure, the shares of channels removed: eighths "
                                  "from 0.125 to 0.875]")
    sensitivity.add_argument("--calib", metavar="PATH",
                             help="inputs: .npz keyed by graph input name, or a folder of "
                                  ".npz; without it synthetic inputs, with a warning")
    sensitivity.add_argument("--calib-samples", type=int, metavar="N",
                             help="use at most N samples")
    sensitivity.add_argument("--seed", type=int, default=0, help="synthetic inputs [0]")
    _add_worker_options(sensitivity, "sweep the targets", "1",
                        " (the curves are the serial ones)")
    _add_shape_options(sensitivity)
    _add_selection_options(sensitivity)
    structured = sensitivity.add_argument_group("structured curves (for --structure S "
                                                "--allocation sensitivity)")
    structured.add_argument("--structure", default="none", metavar="S",
                            help="sweep coupled channel groups instead of targets: channels, "
                                 "ffn, heads, comma-separated; each group alone loses the "
                                 "--levels share of its channels, the lowest-scored by "
                                 "--method (magnitude, random, wanda, flap, obs) [none]")
    _add_round_to(structured)
    _add_structure_permissions(structured)
    _add_logging_options(sensitivity)


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="less logging")
