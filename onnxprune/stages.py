"""A structured run followed by a second stage on what is left: an N:M (or, by recipe
overrides, unstructured) prune of the shrunk model's targets and its storage `--format`.

`--structure S --sparsity F --pattern 2:4 --format compact` removes F of the selected
groups' channels (F is the structured share; the pattern sets the second stage's own
sparsity), then prunes the shrunk model's targets to 2:4, the targets an unstructured run
would pick with the same `--include/--exclude/--min-size`, and stores it compact. With
`--structure` alone (dense, no pattern, no overrides) there is no second stage.

The second stage's method follows from the channel score `--method` names
(`unstructured_method`): the unstructured method of the same name where one is registered
(magnitude, random, wanda), else wanda for a calibrated score (flap: its activation
statistics come from the same `--calib`), else magnitude.
"""

from __future__ import annotations

import logging

from .config import Pattern, PruneConfig

log = logging.getLogger(__name__)


def has_second_stage(config: PruneConfig) -> bool:
    """Whether a `--structure` run also prunes by pattern or stores in a format: an N:M
    `--pattern`, a `--format` other than dense, or recipe overrides (which apply to the
    second stage's targets)."""
    return config.structure != "none" and (
        config.pattern.is_nm or config.format != "dense" or bool(config.overrides))


def structured_stage(config: PruneConfig) -> PruneConfig:
    """The first stage's settings: the run's, without what belongs to the second stage."""
    return config.replace(pattern=Pattern(), format="dense", overrides=())


def unstructured_method(channel_score: str) -> tuple[str, str]:
    """(the second stage's method, why) for the channel score `channel_score`."""
    from .registry import CHANNEL_SCORES, METHODS

    if channel_score in METHODS:
        return channel_score, "the unstructured method of the same name"
    if CHANNEL_SCORES.part_class(channel_score).needs:  # a `Needs` above NOTHING (0)
        return "wanda", (f"channel score {channel_score} is calibrated; wanda keeps the "
                         "second stage calibrated on the same inputs")
    return "magnitude", f"channel score {channel_score} has no unstructured namesake"


def second_stage(config: PruneConfig) -> PruneConfig:
    """The second stage's settings: the N:M pattern (its own sparsity), or none (sparsity
    0: only the format, and the recipe overrides' per-target settings), on the targets the
    selection options pick, with the method `unstructured_method` chooses."""
    if config.pattern.is_nm or config.overrides:
        method, why = unstructured_method(config.method)
        log.info("after --structure: pattern %s by method %s (%s)", config.pattern, method,
                 why)
    else:  # nothing is pruned: no method needs to score (or calibrate)
        method = "magnitude"
        log.info("after --structure: --format %s on what is left; a shrunk model has no "
                 "zeros of its own, so the format gains only where the model had zeros",
                 config.format)
    from .registry import METHODS

    # the calibration inputs only where this stage uses them (the first stage may have:
    # no "--calib is ignored" warning then)
    calibrated = bool(METHODS.part_class(method).needs) or any(o.method
                                                               for o in config.overrides)
    return PruneConfig(
        sparsity=None if config.pattern.is_nm else 0.0, pattern=config.pattern,
        method=method, format=config.format, include=config.include,
        exclude=config.exclude, min_size=config.min_size, seed=config.seed,
        calib=config.calib if calibrated else None, calib_samples=config.calib_samples,
        calib_mode=config.calib_mode,
        synthetic_dims=config.synthetic_dims, synthetic_shapes=config.synthetic_shapes,
        overrides=config.overrides, options=config.options)

