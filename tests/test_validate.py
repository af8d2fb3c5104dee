"""onnxruntime comparison of a reference and a candidate model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.errors import CalibrationError, ConfigError, ModelLoadError
from onnxprune.inputs import synthetic_inputs
from onnxprune.validate import (
    ValidationResult,
    check_reference_runs,
    compare_models,
    format_result,
    make_session,
    validate_models,
)

RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((8, 5)).astype(np.float32)


def _linear(
    weight: np.ndarray = WEIGHT, output: str = "logits", input_name: str = "x"
) -> onnx.ModelProto:
    """logits [batch, N] = x [batch, K] @ weight [K, N]."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "W"], [output])],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _parse(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def _feeds(count: int = 4, batch: int = 6) -> list[dict[str, np.ndarray]]:
    return synthetic_inputs(_linear(), samples=count, seed=3, dims={"batch": batch})


def test_identical_models_agree_exactly():
    result = compare_models(
        _linear(), _linear(), _feeds(), atol=0.0, rtol_l2=0.0, min_cosine=1.0, min_top1=1.0
    )
    assert result.passed and result.failed == []
    assert result.samples == 4
    assert result.max_abs_diff == 0.0
    assert result.rel_l2 == 0.0
    assert result.cosine == pytest.approx(1.0, abs=1e-12)
    assert result.top1_agreement == 1.0
    data = result.to_dict()
    for key in (
        "max_abs_diff",
        "rel_l2",
        "cosine",
        "top1_agreement",
        "passed",
        "outputs",
        "samples",
        "failed",
    ):
        assert key in data
    assert data["outputs"][0]["name"] == "logits"
    assert data["outputs"][0]["shape"] == [6, 5]
    json.dumps(data, allow_nan=False)


def test_perturbed_candidate_metrics_match_numpy():
    perturbed = WEIGHT + RNG.standard_normal(WEIGHT.shape).astype(np.float32) * 0.3
    feeds = _feeds()
    result = compare_models(_linear(), _linear(perturbed), feeds)
    reference = np.stack([feed["x"] @ WEIGHT for feed in feeds]).astype(np.float64)
    candidate = np.stack([feed["x"] @ perturbed for feed in feeds]).astype(np.float64)
    diff = reference - candidate
    assert result.passed is None  # no tolerance given: not checked
    assert result.max_abs_diff == pytest.approx(np.abs(diff).max(), rel=1e-5)
    assert result.rel_l2 == pytest.approx(
        np.linalg.norm(diff) / np.linalg.norm(reference), rel=1e-5
    )
    cosine = (reference.ravel() @ candidate.ravel()) / (
        np.linalg.norm(reference) * np.linalg.norm(candidate)
    )
    assert result.cosine == pytest.approx(cosine, rel=1e-6)
    top1 = np.mean(reference.argmax(-1) == candidate.argmax(-1))
    assert result.top1_agreement == pytest.approx(top1)
    assert 0 < result.rel_l2 < 1 and result.cosine < 1


@pytest.mark.parametrize(
    "tolerance, check",
    [
        ({"atol": 1e-4}, "atol"),
        ({"rtol_l2": 1e-4}, "rtol_l2"),
        ({"min_cosine": 0.999999}, "min_cosine"),
        ({"min_top1": 1.0}, "min_top1"),
    ],
)
def test_perturbed_candidate_fails_the_named_check(tolerance, check):
    perturbed = WEIGHT.copy()
    perturbed[:, 0] += 3.0  # class 0 now wins most rows
    result = compare_models(_linear(), _linear(perturbed), _feeds(), **tolerance)
    assert not result.passed
    assert len(result.failed) == 1
    assert result.failed[0].startswith(check + ":") and "'logits'" in result.failed[0]
    assert result.to_dict()["passed"] is False
    assert "FAILED" in format_result(result) and check in format_result(result)


def test_loose_tolerances_pass():
    perturbed = WEIGHT * 1.001
    result = compare_models(
        _linear(),
        _linear(perturbed),
        _feeds(),
        atol=0.1,
        rtol_l2=0.01,
        min_cosine=0.999,
        min_top1=0.9,
    )
    assert result.passed, result.failed
    assert 0 < result.max_abs_diff < 0.1
    assert result.rel_l2 == pytest.approx(0.001, rel=1e-2)


def test_nan_in_candidate_fails_without_tolerance():
    broken = WEIGHT.copy()
    broken[0, 0] = np.nan
    result = compare_models(_linear(), _linear(broken), _feeds(count=2, batch=3))
    assert not result.passed
    assert result.outputs[0].new_nonfinite == 2 * 3 * 1  # column 0 of every row
    assert any(reason.startswith("nan:") for reason in result.failed)
    json.dumps(result.to_dict(), allow_nan=False)


def test_nan_in_both_models_fails_any_tolerance():
    with_nan = WEIGHT.copy()
    with_nan[0, 0] = np.nan  # column 0 of every output row is NaN in both models
    result = compare_models(_linear(with_nan), _linear(with_nan), _feeds(), atol=0.0)
    assert result.passed is False
    (output,) = result.outputs
    assert output.reference_nonfinite == output.candidate_nonfinite == 4 * 6
    assert output.new_nonfinite == 0
    # both-NaN is no agreement: no figure may look perfect
    for value in (result.max_abs_diff, result.rel_l2, result.cosine, result.top1_agreement):
        assert np.isnan(value)
    assert len(result.failed) == 1 and result.failed[0].startswith("nan:")
    assert "24 NaN/Inf values in the reference and 24 in the candidate" in result.failed[0]
    data = result.to_dict()
    assert data["passed"] is False and data["cosine"] is None and data["max_abs_diff"] is None
    assert data["reference_nonfinite"] == data["candidate_nonfinite"] == 24
    json.dumps(data, allow_nan=False)
    text = format_result(result)
    assert "1.000000" not in text and "0.000e+00" not in text
    assert "NaN/Inf in 'logits': 24 in the reference, 24 in the candidate" in text
    assert text.splitlines()[-2] == "FAILED (atol=0)"


@pytest.mark.parametrize("tolerance", [{"rtol_l2": 10.0}, {"min_cosine": -1.0},
                                       {"min_top1": 0.0}])
def test_inf_in_the_reference_fails_even_loose_tolerances(tolerance):
    with_inf = WEIGHT.copy()
    with_inf[0, 0] = np.inf
    result = compare_models(_linear(with_inf), _linear(), _feeds(), **tolerance)
    assert result.passed is False and result.failed[0].startswith("nan:")
    assert result.outputs[0].reference_nonfinite > 0 == result.outputs[0].candidate_nonfinite


def test_nan_without_tolerance_is_not_checked_and_warns(caplog):
    with_nan = WEIGHT.copy()
    with_nan[0, 0] = np.nan
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = compare_models(_linear(with_nan), _linear(with_nan), _feeds(count=1, batch=2))
    assert result.passed is None and result.failed == []
    assert result.to_dict()["passed"] is None and result.to_dict()["verdict"] == "not checked"
    assert any("2 NaN/Inf values in the reference, 2 in the candidate" in record.message
               for record in caplog.records)
    assert "NOT CHECKED" in format_result(result) and "PASSED" not in format_result(result)


def test_without_tolerance_the_verdict_is_not_checked(caplog):
    with caplog.at_level("WARNING", logger="onnxprune"):
        same = compare_models(_linear(), _linear(), _feeds())
    assert same.passed is None and same.verdict == "not checked" and same.failed == []
    assert same.outputs[0].passed is None
    assert caplog.records == []  # cosine 1, top-1 1: nothing to warn about
    text = format_result(same)
    assert "PASSED" not in text
    assert text.splitlines()[-1].startswith("NOT CHECKED (no tolerance given")
    assert json.loads(json.dumps(same.to_dict()))["passed"] is None


def test_poor_agreement_without_tolerance_warns(caplog):
    perturbed = WEIGHT.copy()
    perturbed[:, 0] += 3.0  # class 0 now wins most rows
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = compare_models(_linear(), _linear(perturbed), _feeds())
    assert result.passed is None
    assert result.cosine < 0.99 and result.top1_agreement < 0.9
    messages = [record.message for record in caplog.records]
    assert any(m.startswith(f"cosine similarity {result.cosine:.4f} is below 0.99")
               for m in messages)
    assert any(m.startswith(f"top-1 agreement {result.top1_agreement:.4f} is below 0.9")
               for m in messages)


def test_poor_agreement_with_a_tolerance_that_holds_does_not_warn(caplog):
    perturbed = WEIGHT.copy()
    perturbed[:, 0] += 3.0
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = compare_models(_linear(), _linear(perturbed), _feeds(), atol=100.0)
    assert result.passed is True and caplog.records == []
    assert format_result(result).splitlines()[-1] == "PASSED (atol=100)"


def test_state_passed_back_as_input_gets_no_top1():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8] x, float[2, 1, 16] state) => (float[1, 4] scores, float[2, 1, 16] stateN,
                                                     float[1, 1, 8, 8] image) {
            scores = Slice(x, starts, ends, axes)
            starts = Constant<value = int64[1] {0}>()
            ends = Constant<value = int64[1] {4}>()
            axes = Constant<value = int64[1] {1}>()
            stateN = Neg(state)
            image = Reshape(flat, shape)
            flat = Concat<axis = 1>(x, x, x, x, x, x, x, x)
            shape = Constant<value = int64[4] {1, 1, 8, 8}>()
        }
    """)
    feeds = synthetic_inputs(model, samples=2)
    result = compare_models(model, model, feeds, min_top1=1.0)
    by_name = {output.name: output for output in result.outputs}
    assert by_name["scores"].top1_agreement == 1.0  # rank 2, last axis 4: class scores
    assert by_name["stateN"].top1_agreement is None  # shaped like the input "state"
    assert by_name["image"].top1_agreement is None  # rank 4: a map, not scores
    assert result.passed is True


def test_output_name_mismatch_is_a_failure_not_a_crash():
    result = compare_models(_linear(), _linear(output="scores"), _feeds())
    assert not result.passed
    assert "outputs: candidate lacks output 'logits'" in result.failed
    assert "outputs: candidate has extra output 'scores'" in result.failed
    assert result.outputs == []


def test_output_shape_mismatch_is_a_failure():
    wider = RNG.standard_normal((8, 6)).astype(np.float32)
    result = compare_models(_linear(), _linear(wider), _feeds())
    assert not result.passed
    assert result.failed[0].startswith("shape:") and "[6, 6]" in result.failed[0]


def test_candidate_that_cannot_run_fails():
    result = compare_models(_linear(), _linear(input_name="other"), _feeds())
    assert not result.passed
    assert result.samples == 0
    assert result.failed[0].startswith("run:")


def test_reference_that_cannot_run_is_a_calibration_error():
    bad_feeds = [{"x": np.zeros((2, 3), np.float32)}]  # needs [batch, 8]
    with pytest.raises(CalibrationError) as excinfo:
        compare_models(_linear(), _linear(), bad_feeds)
    assert "\n" not in str(excinfo.value) and "sample 0" in str(excinfo.value)


def test_zero_outputs_and_non_class_outputs():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] zero, float[N] total, int64[N] count) {
            zero = Sub(x, x)
            total = ReduceSum<keepdims = 0>(x, axes)
            axes = Constant<value = int64[1] {1}>()
            shape = Shape(x)
            count = Slice(shape, start, end)
            start = Constant<value = int64[1] {0}>()
            end = Constant<value = int64[1] {1}>()
        }
    """)
    feeds = synthetic_inputs(model, samples=2, dims={"N": 3})
    result = compare_models(model, model, feeds, min_top1=1.0)
    by_name = {output.name: output for output in result.outputs}
    assert by_name["zero"].rel_l2 == 0.0 and by_name["zero"].cosine == 1.0
    assert by_name["zero"].top1_agreement == 1.0  # float, rank 2, last dim 3
    assert by_name["total"].top1_agreement is None  # rank 1: not class scores
    assert by_name["count"].top1_agreement is None and by_name["count"].max_abs_diff == 0.0
    assert result.passed


def test_bfloat16_outputs_compare():
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (bfloat16[2, 4] y) { y = Cast<to = 16>(x) }
    """)
    feeds = synthetic_inputs(model, samples=2)
    result = compare_models(model, model, feeds, atol=0.0)
    assert result.passed and result.outputs[0].dtype == "bfloat16"
    assert result.cosine == pytest.approx(1.0)


def test_make_session_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as excinfo:
        make_session(tmp_path / "absent.onnx")
    assert "absent.onnx" in str(excinfo.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx\xff" * 20)
    with pytest.raises(ModelLoadError) as excinfo:
        make_session(garbage)
    assert "\n" not in str(excinfo.value) and "garbage.onnx" in str(excinfo.value)
    with pytest.raises(ModelLoadError):
        make_session(
            _parse("""
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[2] x) => (float[2] y) { y = NoSuchOp(x) }
        """)
        )


def test_make_session_loads_external_data(tmp_path):
    model = _linear(np.ones((256, 4), np.float32))
    path = tmp_path / "ext.onnx"
    onnx.save(
        model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    assert (tmp_path / "ext.onnx.data").exists()
    session = make_session(path)
    (out,) = session.run(None, {"x": np.ones((1, 256), np.float32)})
    np.testing.assert_array_equal(out, np.full((1, 4), 256.0, np.float32))


def test_bad_tolerances_and_no_feeds():
    with pytest.raises(ConfigError):
        compare_models(_linear(), _linear(), _feeds(), atol=-1.0)
    with pytest.raises(ConfigError):
        compare_models(_linear(), _linear(), _feeds(), min_cosine=2.0)
    with pytest.raises(CalibrationError):
        compare_models(_linear(), _linear(), [])


def test_validate_models_with_paths_and_npz(tmp_path):
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(_linear(), str(reference))
    onnx.save(_linear(WEIGHT * 2), str(candidate))
    data = tmp_path / "calib.npz"
    x = RNG.standard_normal((3, 2, 8)).astype(np.float32)  # 3 samples of [2, 8]
    np.savez(data, x=x)
    result = validate_models(reference, candidate, data=data, rtol_l2=0.5)
    assert isinstance(result, ValidationResult)
    assert result.samples == 3 and result.outputs[0].shape == [2, 5]
    assert result.rel_l2 == pytest.approx(1.0, rel=1e-5)  # 2W: ||a - 2a|| / ||a||
    assert result.cosine == pytest.approx(1.0, abs=1e-6)
    assert not result.passed and result.failed[0].startswith("rtol_l2:")
    synthetic = validate_models(reference, reference, samples=2, dims={"batch": 7})
    assert synthetic.samples == 2 and synthetic.outputs[0].shape == [7, 5]
    assert synthetic.passed is None


def test_format_result_lists_outputs_and_verdict():
    text = format_result(compare_models(_linear(), _linear(), _feeds(), atol=0.0))
    lines = text.splitlines()
    assert lines[0].split() == ["output", "shape", "max_abs_diff", "rel_l2", "cosine", "top1"]
    assert lines[2].startswith("logits") and "[6, 5]" in lines[2]
    assert lines[3].startswith("overall") and "4 samples" in lines[3]
    assert lines[-1] == "PASSED (atol=0)"


def test_format_result_names_the_inputs_fed():
    synthetic = format_result(compare_models(_linear(), _linear(), _feeds(), synthetic=True))
    assert "inputs (synthetic): x[6,8] float32" in synthetic.splitlines()
    varying = [{"x": np.ones((batch, 8), np.float32)} for batch in (2, 5, 3)]
    result = compare_models(_linear(), _linear(), varying)
    assert "inputs: x[2..5,8] float32" in format_result(result).splitlines()
    assert result.to_dict()["inputs"] == [{"name": "x", "dtype": "float32",
                                           "shape": [[2, 5], 8]}]
    assert result.to_dict()["synthetic_inputs"] is False


def test_reference_session_checked_once_is_reused(monkeypatch):
    """`check_reference_runs` returns the session it ran; `compare_models` takes it as the
    reference and builds only the candidate's."""
    import onnxprune.validate as validate

    built = []
    real_make_session = validate.make_session

    def counting(model):
        built.append(model)
        return real_make_session(model)

    monkeypatch.setattr(validate, "make_session", counting)
    reference, feeds = _linear(), _feeds()
    session = check_reference_runs(reference, feeds)
    assert built == [reference]
    result = compare_models(session, _linear(), feeds, atol=0.0)
    assert result.passed and len(built) == 2 and built[-1] is not reference
    assert check_reference_runs(session, feeds) is session and len(built) == 2


def test_errors_keep_the_underlying_error_as_their_cause(tmp_path):
    """One line for the user, onnxruntime's (or Python's) error chained below for -v."""
    with pytest.raises(CalibrationError) as excinfo:
        compare_models(_linear(), _linear(), [{"x": np.zeros((2, 3), np.float32)}])
    assert excinfo.value.__cause__ is not None  # onnxruntime's own exception
    assert str(excinfo.value).startswith("the reference model cannot run on sample 0 of the "
                                         "inputs (x: float32[2, 3]): ")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx\xff" * 20)
    with pytest.raises(ModelLoadError) as excinfo:
        make_session(garbage)
    assert excinfo.value.__cause__ is not None
    assert str(excinfo.value).startswith(f"{garbage}: onnxruntime cannot load it (")
    with pytest.raises(ConfigError) as excinfo:
        compare_models(_linear(), _linear(), _feeds(), atol="loose")
    assert str(excinfo.value) == "atol must be a number, got 'loose'"
    assert isinstance(excinfo.value.__cause__, ValueError)


# --- the command line: verdicts, exit codes, checks before pruning ----------------------------

TRANSFORMER = MODELS_DIR / "transformer.onnx"
MLP = MODELS_DIR / "mlp.onnx"


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_readme_first_command_is_not_checked_and_warns(tmp_path, capfd):
    out = tmp_path / "transformer-2of4.onnx"
    status = main(["prune", str(TRANSFORMER), "-o", str(out), "--pattern", "2:4", "--validate"])
    stdout, stderr = capfd.readouterr()
    assert status == 0 and out.is_file()
    assert "PASSED" not in stdout
    assert _last_line(stdout).startswith("NOT CHECKED (no tolerance given")
    assert "WARNING: top-1 agreement" in stderr and "WARNING: cosine similarity" in stderr


def test_validate_json_without_tolerance_prints_passed_null(tmp_path, capsys):
    assert main(["validate", str(MLP), str(MLP), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is None and result["verdict"] == "not checked"


def test_prune_validate_failure_says_where_the_output_is_kept(tmp_path, capsys):
    out = tmp_path / "kept.onnx"
    status = main(["prune", str(TRANSFORMER), "-o", str(out), "--validate",
                   "--min-cosine", "0.99"])
    stdout, stderr = capsys.readouterr()
    assert status == 1 and out.is_file()
    assert _last_line(stdout).startswith("  - min_cosine:")
    assert f"onnxprune: validation failed; the pruned model is kept at {out}" in stderr


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"input_ids": np.zeros((1, 16), np.float32)}, "dtype float32"),
        ({"ids": np.zeros((1, 16), np.int64)}, "missing input(s) 'input_ids'"),
        ({"input_ids": np.zeros((1, 16, 2, 2), np.int64)}, "rank"),
    ],
)
def test_prune_validate_checks_the_data_before_pruning(tmp_path, capfd, arrays, expected):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    out = tmp_path / "out.onnx"
    status = main(["prune", str(TRANSFORMER), "-o", str(out), "--validate", "--data", str(bad)])
    stdout, stderr = capfd.readouterr()
    assert status == 2 and not out.exists() and list(tmp_path.iterdir()) == [bad]
    assert stdout == ""  # no summary: pruning never started
    assert stderr.count("\n") == 1 and expected in stderr


@pytest.mark.parametrize("options, expected", [
    (["--input-shapes", "input_ids:[1,16,1]"], "rank 3"),
    (["--input-shapes", "tokens:[1,16]"], "unknown input"),
    (["--input-shapes", "input_ids:1x16"], "--input-shapes expects NAME:[d0,d1,...]"),
    (["--dim", "seq=5000"], "input_ids: int64[1, 5000]"),  # onnxruntime refuses to run it
])
def test_prune_validate_checks_synthetic_shapes_before_pruning(tmp_path, capfd, options,
                                                               expected):
    out = tmp_path / "out.onnx"
    status = main(["prune", str(TRANSFORMER), "-o", str(out), "--validate", *options])
    stdout, stderr = capfd.readouterr()
    assert status == 2 and not out.exists() and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("onnxprune: error: ")
    assert expected in stderr


def test_reference_failing_on_synthetic_inputs_is_one_line_with_a_hint(capfd):
    status = main(["validate", str(TRANSFORMER), str(TRANSFORMER), "--dim", "seq=5000"])
    stdout, stderr = capfd.readouterr()
    assert status == 2 and stdout == ""
    assert stderr.count("\n") == 1  # onnxruntime's own [E:onnxruntime ...] lines are silenced
    assert "[E:onnxruntime" not in stderr and "\x1b[" not in stderr
    assert "sample 0 of the synthetic inputs (input_ids: int64[1, 5000])" in stderr
    assert "--input-shapes NAME:[d0,d1,...]" in stderr and "--data" in stderr
    assert "Attempting to broadcast" in stderr  # onnxruntime's reason, folded into our line


def test_input_shapes_option_sets_the_synthetic_shape(capsys):
    assert main(["validate", str(TRANSFORMER), str(TRANSFORMER), "--json", "--atol", "0",
                 "--input-shapes", "input_ids:[2,8]"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is True and result["outputs"][0]["shape"] == [2, 8, 512]


def test_synthetic_shapes_are_shown_and_defaulted_dims_named(capsys):
    """The transformer's `seq` is dynamic: left at 16, a warning says so and how to set it;
    the summary and the JSON give the shape fed."""
    assert main(["validate", str(TRANSFORMER), str(TRANSFORMER)]) == 0
    captured = capsys.readouterr()
    assert "inputs (synthetic): input_ids[1,16] int64" in captured.out.splitlines()
    (warning,) = [line for line in captured.err.splitlines() if "default size" in line]
    assert warning == ("WARNING: synthetic inputs: dynamic dimension 'seq' (input_ids axis 1) "
                       "set to the default size 16; set it with --dim NAME=VALUE or "
                       "--input-shapes NAME:[d0,d1,...], or give real inputs with --data")
    assert "'batch'" not in warning  # a batch of 1 changes no sample: not worth a warning
    assert main(["validate", str(TRANSFORMER), str(TRANSFORMER), "--json",
                 "--dim", "seq=8"]) == 0
    captured = capsys.readouterr()
    assert "default size" not in captured.err
    result = json.loads(captured.out)
    assert result["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 8]}]
    assert result["synthetic_inputs"] is True


def test_unnamed_defaulted_dims_point_to_input_shapes(caplog):
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[?, ?] x) => (float[?, ?] y) { y = Identity(x) }
    """)
    with caplog.at_level("WARNING", logger="onnxprune"):
        result = validate_models(model, model, atol=0.0)
    assert result.passed and result.outputs[0].shape == [1, 16]
    (message,) = [r.getMessage() for r in caplog.records if "default size" in r.getMessage()]
    assert "dimension x axis 1 (unnamed) set to the default size 16" in message
    assert "--input-shapes NAME:[d0,d1,...]" in message and "--dim" not in message


def test_validate_with_data_shows_the_shapes_read(tmp_path, capsys):
    data = tmp_path / "ids.npz"
    np.savez(data, input_ids=np.zeros((3, 2, 5), np.int64))
    assert main(["validate", str(TRANSFORMER), str(TRANSFORMER), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert "inputs: input_ids[2,5] int64" in captured.out.splitlines()
    assert "default size" not in captured.err
