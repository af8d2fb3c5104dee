"""Calibration feeds: the synthetic fallback says what it made up."""

from __future__ import annotations

from conftest import MODELS_DIR

from onnxprune.calib import load_calibration
from onnxprune.io import load_model


def test_synthetic_calibration_warning_gives_the_shapes(caplog):
    model = load_model(MODELS_DIR / "transformer.onnx", lazy=True).proto
    with caplog.at_level("WARNING", logger="onnxprune"):
        feeds = load_calibration(None, model, samples=2, dims={"seq": 8})
    assert [feed["input_ids"].shape for feed in feeds] == [(1, 8), (1, 8)]
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith("no calibration data given (--calib): calibrating on 2 "
                              "synthetic random samples (input_ids[1,8] int64); ")
