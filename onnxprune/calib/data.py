"""Calibration data: the feeds calibrated methods run on, from `.npz` files or synthetic."""

from __future__ import annotations

import logging
import os

import onnx

from ..inputs import Feed, fed_inputs, load_npz_inputs, synthetic_inputs

log = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_SAMPLES = 16
LISTED_INPUTS = 4  # inputs whose shapes the synthetic-data warning names


def load_calibration(path: str | os.PathLike | None, model: onnx.ModelProto,
                     samples: int | None = None, seed: int = 0,
                     dims: dict[str, int] | None = None,
                     input_shapes: dict | None = None) -> list[Feed]:
    """Calibration feeds from an `.npz` or a folder of them; synthetic ones when `path` is None.

    The synthetic fallback (random values, `samples` of them, 16 by default) makes every
    calibrated method run, but its statistics describe noise, not data: a warning says so,
    with the shapes made up. `dims` / `input_shapes` shape the synthetic inputs (`--dim`,
    `--input-shapes`).
    """
    if path is not None:
        return load_npz_inputs(path, model, samples)
    count = DEFAULT_SYNTHETIC_SAMPLES if samples is None else samples
    feeds = synthetic_inputs(model, count, seed, dims, input_shapes)
    described = fed_inputs(feeds)
    shapes = ", ".join(fed.text() for fed in described[:LISTED_INPUTS])
    if len(described) > LISTED_INPUTS:
        shapes += f" and {len(described) - LISTED_INPUTS} more"
    log.warning("no calibration data given (--calib): calibrating on %d synthetic random "
                "samples (%s); pruning quality will reflect noise, not your data", count,
                shapes or "no inputs")
    return feeds


def calibration_feeds(config, model: onnx.ModelProto) -> list[Feed]:
    """The calibration feeds a `PruneConfig` asks for (its calib, samples, seed, shapes)."""
    return load_calibration(config.calib, model, config.calib_samples, config.seed,
                            dict(config.synthetic_dims or {}),
                            dict(config.synthetic_shapes or {}))
