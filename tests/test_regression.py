"""Regression: the matrix of prune runs recorded by `tools/record_regression.py` must give the
same bytes today.

Each case (model x method x sparsity setting x format, see `regression_cases`) is run again
and its output file hashed; a refused run must be refused with the same message. Two changes
are declared acceptable and then checked by what they may not change instead:

(a) the float64 mlp with wanda or obd: the kept values must be bit-identical to the input's
    and the zeros must sit exactly where the recorded mask has them;
(b) calibrated sequential runs (sparsegpt): their bytes depend on floating-point details
    (the BLAS thread count, for one); every target's zero mask must agree with the recorded
    one on >= 99.9 % of its positions.

Every calibrated run also keeps each target's reconstruction error within 1 % of the
recorded one. The full matrix runs by default; ONNXPRUNE_FULL_REGRESSION=0 runs a subset
that still covers every model, method, setting and format. An intended change of output is recorded
again with `python tools/record_regression.py` (and the change said in the commit).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import regression_cases as rc
from conftest import MODELS_DIR, example_feeds

# the full matrix takes about a minute on two cores; ONNXPRUNE_FULL_REGRESSION=0 runs a subset
FULL = os.environ.get("ONNXPRUNE_FULL_REGRESSION", "1") != "0"
# the cases beyond the default subset are marked slow (`pytest -m "not slow"` leaves them out)
_DEFAULT = set(rc.default_cases())
CASES = [case if case in _DEFAULT else pytest.param(case, marks=pytest.mark.slow)
         for case in (rc.all_cases() if FULL else rc.default_cases())]
RECORDED: dict[str, dict] = json.loads(rc.HASHES_FILE.read_text())
MASK_AGREEMENT = 0.999
ERROR_TOLERANCE = 0.01  # relative


@functools.cache
def _recorded_masks() -> dict[str, np.ndarray]:
    with np.load(rc.MASKS_FILE) as archive:
        return {key: archive[key] for key in archive.files}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    """Where the float64 mlp is built, once for the module."""
    return tmp_path_factory.mktemp("regression_models")


def test_fixture_covers_the_full_matrix():
    assert set(RECORDED) == {case.key for case in rc.all_cases()}
    masks = _recorded_masks()
    for case in rc.all_cases():
        record = RECORDED[case.key]
        if case.calibrated and "refused" not in record:
            names = set(record["reconstruction_error"])
            assert names, case.key
            assert all(case.mask_key(name) in masks for name in names), case.key


def test_default_subset_covers_every_axis():
    chosen = rc.default_cases()
    for axis, values in enumerate((rc.MODELS, rc.METHODS, rc.SETTINGS, rc.FORMATS)):
        assert {case[axis] for case in chosen} == set(values)
    assert len(set(chosen)) == len(chosen)


def test_float64_model_runs_like_the_float32_one(build_dir):
    path = rc.model_path(rc.FLOAT64_MODEL, build_dir)
    feeds = example_feeds(path)
    assert all(array.dtype == np.float64 for array in feeds.values())
    double = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    single = ort.InferenceSession(str(MODELS_DIR / "mlp.onnx"),
                                  providers=["CPUExecutionProvider"])
    reference = single.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})
    for got, want in zip(double, reference, strict=True):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _test_id(case: rc.Case) -> str:
    """The case key in a form `pytest -k` takes: mlp-wanda-50pct-dense, cnn-obd-2of4-sparse."""
    setting = case.setting.replace("%", "pct").replace(":", "of")
    return "-".join((case.model, case.method, setting, case.format))


@pytest.mark.parametrize("case", CASES, ids=_test_id)
def test_output_unchanged(case: rc.Case, build_dir, tmp_path):
    source = rc.model_path(case.model, build_dir)
    expected = RECORDED[case.key]
    result = rc.run_case(case, source, tmp_path)
    if "refused" in expected or "refused" in result.record:
        assert result.record == expected
        return
    if case.calibrated:
        _check_reconstruction_errors(case, result.record, expected)
    if all(result.record.get(key) == expected.get(key) for key in ("sha256", "external")):
        return
    if case.model == rc.FLOAT64_MODEL and case.method in ("wanda", "obd"):
        _check_kept_values_and_zeros(case, result, source)
    elif case.method in rc.SEQUENTIAL:
        _check_masks_agree(case, result)
    else:
        pytest.fail(f"{case.key}: output bytes changed ({expected['sha256'][:12]} -> "
                    f"{result.record['sha256'][:12]}); if intended, record again: "
                    "python tools/record_regression.py")


def _check_reconstruction_errors(case: rc.Case, record: dict, expected: dict) -> None:
    got, want = record["reconstruction_error"], expected["reconstruction_error"]
    assert got.keys() == want.keys(), case.key
    for name, value in want.items():
        if value is None or got[name] is None:
            assert got[name] == value, f"{case.key} {name}"
        else:
            assert math.isclose(got[name], value, rel_tol=ERROR_TOLERANCE, abs_tol=1e-12), \
                f"{case.key} {name}: reconstruction error {got[name]} vs recorded {value}"


def _dense_weights(case: rc.Case, result: rc.RunResult, names: list[str],
                   work_dir: Path) -> dict[str, np.ndarray]:
    """The targets' weights in the output, turned dense first (by the CLI) if stored otherwise."""
    path = result.output
    if case.format != "dense":
        path = work_dir / f"densified_{rc.OUTPUT_NAME}"
        run = subprocess.run([sys.executable, "-m", "onnxprune", "densify", str(result.output),
                              "-o", str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    return rc.target_weights(path, names)


def _recorded_zeros(case: rc.Case, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return rc.unpack_mask(_recorded_masks()[case.mask_key(name)], shape)


def _check_kept_values_and_zeros(case: rc.Case, result: rc.RunResult, source: Path) -> None:
    names = [target.name for target in result.report.targets]
    before = rc.target_weights(source, names)
    after = _dense_weights(case, result, names, result.output.parent)
    for name in names:
        zeros = _recorded_zeros(case, name, after[name].shape)
        assert after[name].dtype == before[name].dtype == np.float64, name
        assert np.array_equal(after[name] == 0, zeros), f"{case.key} {name}: zeros moved"
        kept = ~zeros
        assert np.array_equal(after[name][kept].view(np.uint64),
                              before[name][kept].view(np.uint64)), \
            f"{case.key} {name}: kept values are not the input's"


def _check_masks_agree(case: rc.Case, result: rc.RunResult) -> None:
    names = [target.name for target in result.report.targets]
    after = _dense_weights(case, result, names, result.output.parent)
    for name in names:
        zeros = _recorded_zeros(case, name, after[name].shape)
        agreement = float(np.mean((after[name] == 0) == zeros))
        assert agreement >= MASK_AGREEMENT, \
            f"{case.key} {name}: zero mask agrees on {agreement:.4%} of positions"
