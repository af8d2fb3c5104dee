"""Pruning in several passes: gradual one-shot (a sparsity schedule over K steps) and
iterative magnitude pruning (IMP: rounds of prune -> [rewind] -> retrain -> re-apply masks).

Every pass is one run of the pipeline (`api.prune`) on the model in memory, with the masks
of the passes before as an existing mask: a weight pruned once is never kept again, and each
pass meets its own (higher) sparsity on top. Between gradual steps the method scores the
weights again (and SparseGPT reconstructs again, on the model pruned so far).

Sparsity schedules over K passes, from s_i (0) to the target s_f, pass t = 1..K:

- ``cubic``: s_t = s_f + (s_i − s_f)(1 − t/K)³ (Zhu & Gupta, 2017): large steps first;
- ``geometric``: each pass removes the same fraction of the weights still alive,
  1 − s_t = (1 − s_i)((1 − s_f)/(1 − s_i))^(t/K) — the IMP default.

IMP: after each round a retrain hook (a Python callable, or a shell command with ``{in}``
and ``{out}``) trains the pruned model; whatever it revived is zeroed again (the masks are
re-applied), and the next round prunes from the retrained weights. With a rewind model
(lottery ticket) the pruned model is replaced, before retraining, by the rewind model with
the masks applied: surviving weights (and the tensors that are not pruned) take its values.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from .config import PruneConfig
from .errors import ConfigError, OnnxPruneError
from .io import check_output_path, load_model, model_file_bytes, model_from_proto, save_model
from .mask_files import MaskSet
from .report import Report

log = logging.getLogger(__name__)

SCHEDULES = ("cubic", "geometric")
STDERR_TAIL_LINES = 3
STDERR_TAIL_CHARS = 400

# retrain(pruned model, round number starting at 1) -> retrained model
Retrain = Callable[[onnx.ModelProto, int], onnx.ModelProto]
ModelLike = str | os.PathLike | onnx.ModelProto


class RetrainFailed(OnnxPruneError):
    """The retrain command failed; the CLI exits with the command's own exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def sparsities(final: float, passes: int, schedule: str = "cubic",
               initial: float = 0.0) -> list[float]:
    """The sparsity to reach after each of `passes` passes; the last is `final` exactly."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if passes < 1:
        raise ConfigError(f"the number of steps or rounds must be >= 1, got {passes}")
    levels = []
    for step in range(1, passes + 1):
        if schedule == "cubic":
            level = final + (initial - final) * (1.0 - step / passes) ** 3
        else:
            level = 1.0 - (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** (step / passes)
        levels.append(level)
    levels[-1] = final
    return levels


def prune_gradual(model: ModelLike, output: str | os.PathLike | None = None, *,
                  config: PruneConfig, steps: int, schedule: str = "cubic",
                  save_masks: str | os.PathLike | None = None,
                  base_dir: str | os.PathLike | None = None, progress=None,
                  return_masks: bool = False, durable: bool = False
                  ) -> tuple[onnx.ModelProto, Report]:
    """Reach `config`'s sparsity in `steps` passes along `schedule`; masks only grow.

    Each step re-scores the weights as pruned so far (a reconstructing method such as
    SparseGPT also reconstructs again); the last step writes `output` in `config.format`.
    `save_masks`: a path with ``{round}`` gets every step's masks; without it, the final ones.
    """
    _check_pattern(config, "--schedule/--steps")
    proto, base_dir, input_path = _load(model, base_dir, output)
    levels = sparsities(config.target_sparsity, steps, schedule)
    masks = None
    first = None
    for step, level in enumerate(levels, 1):
        last = step == len(levels)
        step_config = config.replace(sparsity=level, format=config.format if last else "dense")
        proto, report = _pass(proto, base_dir, step_config, output if last else None, masks,
                              fixed=False, progress=progress, durable=durable)
        masks = report.masks
        first = first or report
        _save_masks(masks, save_masks, step, last)
        log.info("step %d/%d: sparsity %.4f (%d zeros)", step, len(levels), level,
                 report.summary.zeros)
    if first is None:  # sparsities() gives at least one level
        raise ConfigError(f"the number of steps must be >= 1, got {steps}")
    info = {"kind": schedule, "steps": steps, "sparsities": levels}
    return proto, _final_report(report, first, input_path, config, info, return_masks)


def prune_iterative(model: ModelLike, output: str | os.PathLike | None = None, *,
                    config: PruneConfig, rounds: int, retrain: Retrain | str | None = None,
                    rewind: ModelLike | None = None, schedule: str = "geometric",
                    save_masks: str | os.PathLike | None = None,
                    keep_last_good: bool = False, base_dir: str | os.PathLike | None = None,
                    progress=None, return_masks: bool = False, durable: bool = False
                    ) -> tuple[onnx.ModelProto, Report]:
    """Iterative pruning to `config`'s sparsity in `rounds` rounds.

    Round r prunes to the r-th sparsity of `schedule` (default: equal fractions of the
    remaining weights) on top of the masks so far; then, with `rewind`, the survivors take
    their values in the rewind model; then `retrain` (a callable ``(model, round) ->
    model``, or a shell command with ``{in}`` and ``{out}``) trains the model, and the masks
    are applied again, so a weight pruned once stays zero whatever the retraining did.

    `save_masks`: a path with ``{round}`` gets every round's masks; without it, the final
    masks only. When the retrain command fails, `RetrainFailed` carries its exit code and
    the end of its stderr; with `keep_last_good` the model of the last completed round is
    written to `output` first.
    """
    if config.structure != "none":
        raise ConfigError("--rounds, --retrain-cmd and --rewind cannot be combined with "
                          "--structure yet")
    if config.permute_channels:
        raise ConfigError("--permute-channels cannot be combined with --rounds, --retrain-cmd "
                          "or --rewind: later rounds and the rewind model use the stored "
                          "channel order; prune with it once, then iterate on that output")
    proto, base_dir, input_path = _load(model, base_dir, output)
    levels = ([config.target_sparsity] * rounds if config.pattern.is_nm
              else sparsities(config.target_sparsity, rounds, schedule))
    if retrain is None:
        log.warning("%d rounds without a retrain hook: each round only prunes further",
                    rounds)
    init = _load(rewind, None)[:2] if rewind is not None else None
    apply_config = _mask_only(config)
    folder = Path(output).parent if output is not None else None
    command = retrain if isinstance(retrain, str) else None
    with tempfile.TemporaryDirectory(prefix=".onnxprune-rounds-", dir=folder) as workdir:
        hook = (command_retrainer(retrain, Path(workdir)) if isinstance(retrain, str)
                else retrain)
        masks = last_masks = None
        completed = 0
        history = []
        first = last_round = None
        for round_number, level in enumerate(levels, 1):
            pruned, last_round = _pass(proto, base_dir, config.replace(
                sparsity=level, format="dense"), None, masks, fixed=False, inplace=False,
                progress=progress)
            first = first or last_round
            masks = last_round.masks
            entry = {"round": round_number, "sparsity": level,
                     "zeros": last_round.summary.zeros}
            if init is not None:
                pruned = _rewound(init, apply_config, masks, rewind)
            _save_masks(masks, save_masks, round_number, last=False)
            if hook is not None:
                try:
                    trained = hook(pruned, round_number)
                except RetrainFailed as exc:
                    _keep_last_good(exc, keep_last_good, completed, proto, base_dir,
                                    apply_config.replace(format=config.format), output,
                                    last_masks, durable)
                    raise
                pruned, applied = _pass(trained, base_dir, apply_config, None, masks,
                                        fixed=True)
                entry["revived"] = applied.summary.zeros - (applied.summary.zeros_before or 0)
                if entry["revived"]:
                    log.info("round %d: retraining revived %d pruned weights; zeroed again",
                             round_number, entry["revived"])
            history.append(entry)
            log.info("round %d/%d: sparsity %.4f", round_number, len(levels), level)
            proto, completed, last_masks = pruned, round_number, masks
        proto, report = _pass(proto, base_dir, apply_config.replace(format=config.format),
                              output, masks, fixed=True, progress=None, durable=durable)
    if first is None or last_round is None:  # no round ran
        raise ConfigError(f"the number of rounds must be >= 1, got {rounds}")
    for target, planned in zip(report.targets, last_round.targets, strict=True):
        target.requested_sparsity, target.set_by = planned.requested_sparsity, planned.set_by
    _save_masks(report.masks, save_masks, len(levels), last=True)
    info = {"kind": schedule, "rounds": rounds, "sparsities": levels,
            "retrain": command if command is not None else retrain is not None,
            "rewind": str(rewind) if isinstance(rewind, (str, os.PathLike)) else
            rewind is not None, "history": history}
    return proto, _final_report(report, first, input_path, config, info, return_masks)


def command_retrainer(command: str, workdir: Path) -> Retrain:
    """A retrain hook that runs `command` in a shell with ``{in}`` (the pruned model, written
    by us) and ``{out}`` (where the command writes the retrained model) filled in."""
    missing = [part for part in ("{in}", "{out}") if part not in command]
    if missing:
        raise ConfigError(f"--retrain-cmd must contain {' and '.join(missing)} "
                          f"(the model it reads and the model it writes), got {command!r}")

    def retrain(model: onnx.ModelProto, round_number: int) -> onnx.ModelProto:
        source = workdir / f"round{round_number}-pruned.onnx"
        target = workdir / f"round{round_number}-retrained.onnx"
        save_model(model_from_proto(model, workdir), source)
        line = command.replace("{in}", shlex.quote(str(source))).replace(
            "{out}", shlex.quote(str(target)))
        log.info("round %d: %s", round_number, line)
        done = subprocess.run(line, shell=True, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace")
        for text in (done.stdout, done.stderr):
            if text.strip():
                log.debug("retrain output:\n%s", text.rstrip())
        if done.returncode != 0:
            code = done.returncode if done.returncode > 0 else 128 - done.returncode
            raise RetrainFailed(f"retrain command failed in round {round_number} with exit "
                                f"code {done.returncode}: {_tail(done.stderr)}", code)
        if not target.exists():
            raise RetrainFailed(f"retrain command exited 0 in round {round_number} but wrote "
                                f"no model to {{out}}", 2)
        return _load(target, None)[0]

    return retrain


def _save_masks(masks: MaskSet, path, number: int, last: bool) -> None:
    """Every pass's masks to a path with ``{round}``; the final masks to a plain path."""
    if path is None:
        return
    if "{round}" in str(path):
        masks.save(str(path).replace("{round}", str(number)))
    elif last:
        masks.save(path)


def _tail(text: str) -> str:
    """The last lines of a command's stderr on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    tail = " | ".join(lines[-STDERR_TAIL_LINES:]) or "(no stderr)"
    return tail if len(tail) <= STDERR_TAIL_CHARS else "..." + tail[-STDERR_TAIL_CHARS:]


def _keep_last_good(error: RetrainFailed, keep: bool, completed: int, proto, base_dir,
                    config: PruneConfig, output, masks, durable: bool) -> None:
    """Write the last completed round's model when asked, and say so in the error."""
    if not keep:
        error.args = (error.args[0] + "; nothing written (--keep-last-good keeps the last "
                      "completed round)",)
    elif not completed or output is None:
        error.args = (error.args[0] + "; no round completed, nothing written",)
    else:
        _pass(proto, base_dir, config, output, masks, fixed=True, durable=durable)
        error.args = (error.args[0] + f"; the model of round {completed} is kept at {output}",)


def _rewound(init: tuple[onnx.ModelProto, Path], config: PruneConfig, masks: MaskSet,
             source) -> onnx.ModelProto:
    """The rewind model with the masks applied: survivors keep its values exactly."""
    try:
        rewound, _ = _pass(init[0], init[1], config, None, masks, fixed=True, inplace=False)
    except ConfigError as exc:
        name = "model" if isinstance(source, onnx.ModelProto) else str(source)
        raise ConfigError(f"--rewind {name}: does not fit the pruned model ({exc})") from exc
    return rewound


def _mask_only(config: PruneConfig) -> PruneConfig:
    """Settings that apply given masks and nothing else (no scoring, reconstruction, or
    calibration); per-target overrides keep only their `skip`, which selects targets."""
    overrides = tuple(o.skip_only() for o in getattr(config, "overrides", ()) if o.skip)
    changes = {"overrides": overrides} if hasattr(config, "overrides") else {}
    return config.replace(method="magnitude", scope="layer", allocation="uniform",
                          update="none", refine="none", measure_error=False, calib=None,
                          format="dense", permute_channels=False, **changes)


def _pass(model: onnx.ModelProto, base_dir, config: PruneConfig, output, masks, *,
          fixed: bool, inplace: bool = True, progress=None, durable: bool = False):
    from .api import prune

    pruned, report = prune(model, output, config=config, base_dir=base_dir, inplace=inplace,
                           masks=masks, fixed_masks=fixed, return_masks=True,
                           progress=progress, durable=durable)
    return pruned, report


def _load(model: ModelLike, base_dir, output=None) -> tuple[onnx.ModelProto, Path, Path | None]:
    """A private in-memory copy of the model, its external-data folder, and its path; an
    output path that cannot be written is refused before any work."""
    if output is not None:
        check_output_path(output, None if isinstance(model, onnx.ModelProto) else model)
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, Path(base_dir or "."), None
    loaded = load_model(model)  # checks the file; then every tensor is read into memory
    onnx.load_external_data_for_model(loaded.proto, str(loaded.base_dir))
    return loaded.proto, loaded.base_dir, Path(model)


def _check_pattern(config: PruneConfig, option: str) -> None:
    if config.structure != "none":
        raise ConfigError(f"{option} cannot be combined with --structure yet")
    if config.pattern.is_nm:
        raise ConfigError(f"{option} needs an unstructured pattern: N:M pattern "
                          f"{config.pattern} has one sparsity, there is nothing to schedule")


def _final_report(report: Report, first: Report, input_path: Path | None,
                  config: PruneConfig, info: dict, return_masks: bool) -> Report:
    """The last pass's report, told about the whole run: the input's zeros and bytes
    before the first pass, the user's settings, and the schedule."""
    report.model = str(input_path) if input_path else "<ModelProto>"
    before = {t.name: t.zeros_before for t in first.targets}
    for target in report.targets:
        target.zeros_before = before.get(target.name, target.zeros_before)
    report.summary.zeros_before = first.summary.zeros_before
    if input_path is not None:
        report.summary.file_bytes_before = model_file_bytes(input_path)
    report.config = dict(config.describe(), schedule=info)
    if not return_masks:
        report.masks = None
    return report

