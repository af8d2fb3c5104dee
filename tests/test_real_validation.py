"""Real exports validate from the command line: -1 batch dims, scalar inputs, states."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REAL_MODELS, real_model

from onnxprune.cli import main


def _feeds(name: str, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [REAL_MODELS[name].make_feeds(rng) for _ in range(count)]


def _save_stacked(path, feeds) -> None:
    np.savez(path, **{key: np.stack([feed[key] for feed in feeds]) for key in feeds[0]})


def _run_json(capfd, *args: str) -> tuple[int, dict, str]:
    status = main([*args, "--json"])
    stdout, stderr = capfd.readouterr()
    return status, json.loads(stdout) if stdout else {}, stderr


@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_rec"])
def test_paddle_minus_one_batch_validates_on_synthetic_inputs(name, capfd):
    """PaddlePaddle writes -1 for the batch: synthetic inputs used to crash (exit 3)."""
    path = str(real_model(name))
    status, result, stderr = _run_json(capfd, "validate", path, path, "--atol", "0")
    assert status == 0, stderr
    assert result["passed"] is True and result["max_abs_diff"] == 0.0
    assert result["outputs"][0]["shape"][0] == 1  # the batch axis defaults to 1


@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_rec"])
def test_paddle_npz_fitting_the_dynamic_dims_is_accepted(name, tmp_path, capfd):
    """A correct [1, 3, 48, W] sample used to be refused against [-1, 3, ?, ?]."""
    path = str(real_model(name))
    data = tmp_path / "images.npz"
    _save_stacked(data, _feeds(name, 2))
    status, result, stderr = _run_json(capfd, "validate", path, path, "--data", str(data),
                                       "--atol", "0")
    assert status == 0, stderr
    assert result["samples"] == 2 and result["passed"] is True


def test_paddle_input_shapes_sets_unnamed_dims(capfd):
    path = str(real_model("ppocr_rec"))
    status, result, stderr = _run_json(capfd, "validate", path, path,
                                       "--input-shapes", "x:[1,3,48,320]", "--samples", "1")
    assert status == 0, stderr
    assert result["passed"] is None  # no tolerance: not checked
    assert result["outputs"][0]["shape"] == [1, 40, 6625]  # 320 / 8 time steps
    assert result["top1_agreement"] == 1.0  # [batch, steps, classes]: class scores


def test_silero_synthetic_failure_names_inputs_and_suggests_options(capfd):
    path = str(real_model("silero_vad"))
    status = main(["validate", path, path])
    stdout, stderr = capfd.readouterr()
    assert status == 2 and stdout == ""
    # first the dimensions left at 16 (the cause), then the one-line error
    warning, error = stderr.splitlines()
    assert "[E:onnxruntime" not in stderr
    assert warning.startswith("WARNING: synthetic inputs: dynamic dimensions input axis 1 "
                              "(unnamed), state axis 1 (unnamed) set to the default size 16")
    assert error.startswith("onnxprune: error: ")
    assert "(input: float32[1, 16], state: float32[2, 16, 128], sr: int64[])" in error
    assert "--input-shapes" in error and "--data" in error


def test_silero_scalar_sr_in_npz_and_state_has_no_top1(tmp_path, capfd):
    """sr is an int64 scalar: it used to fail with 'Unable to handle object of type
    numpy.int64'. stateN is the state passed back: no top-1 for it."""
    path = str(real_model("silero_vad"))
    data = tmp_path / "audio.npz"
    _save_stacked(data, _feeds("silero_vad", 3))
    status, result, stderr = _run_json(capfd, "validate", path, path, "--data", str(data),
                                       "--atol", "0")
    assert status == 0, stderr
    assert result["samples"] == 3 and result["passed"] is True
    by_name = {output["name"]: output for output in result["outputs"]}
    assert by_name["stateN"]["shape"] == [2, 1, 128]
    assert by_name["stateN"]["top1_agreement"] is None
    assert result["top1_agreement"] is None


def test_silero_folder_of_single_samples_with_scalar_sr(tmp_path, capfd):
    path = str(real_model("silero_vad"))
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, feed in enumerate(_feeds("silero_vad", 2)):
        np.savez(folder / f"{index}.npz", **feed)  # sr saved as a 0-d array
    status, result, stderr = _run_json(capfd, "validate", path, path, "--data", str(folder),
                                       "--atol", "0")
    assert status == 0, stderr
    assert result["samples"] == 2 and result["passed"] is True


def test_silero_prune_validate_with_data(tmp_path, capfd):
    path = str(real_model("silero_vad"))
    data = tmp_path / "audio.npz"
    _save_stacked(data, _feeds("silero_vad", 2))
    out = tmp_path / "silero-50.onnx"
    status = main(["prune", path, "-o", str(out), "--validate", "--data", str(data),
                   "--min-cosine", "-1"])
    stdout, stderr = capfd.readouterr()
    assert status == 0, stderr
    assert out.is_file() and stdout.strip().splitlines()[-1] == "PASSED (min_cosine=-1)"
