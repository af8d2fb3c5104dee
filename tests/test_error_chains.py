"""User errors keep what failed underneath: `raise ... from exc`, never `from None`.

The CLI prints the same one line as ever; with -v it prints the traceback after it, the
onnx / onnxruntime / OS error it was chained from included.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import MODELS_DIR
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from onnxprune.calib.capture import _run
from onnxprune.cli import main
from onnxprune.cli.parser import build_parser
from onnxprune.config import PruneConfig
from onnxprune.errors import CalibrationError, ConfigError, ModelLoadError
from onnxprune.io import load_model
from onnxprune.io.tensors import element_dtype, external_range
from onnxprune.io.wire import WireError
from onnxprune.mask_files import MaskSet
from onnxprune.recipe import load_recipe

GARBAGE = b"this is not an onnx model, just text\n"


@pytest.fixture
def garbage(tmp_path) -> Path:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(GARBAGE)
    return path


def test_unparsable_model_keeps_the_protobuf_error(garbage) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(garbage)
    assert isinstance(info.value.__cause__, (DecodeError, WireError))
    assert "not a valid ONNX model" in str(info.value)


def test_missing_external_data_keeps_the_os_error(tmp_path) -> None:
    tensor = numpy_helper.from_array(np.zeros((4,), np.float32), "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    with pytest.raises(ModelLoadError, match="is missing") as info:
        external_range(tensor, tmp_path)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_unknown_data_type_keeps_the_lookup_error() -> None:
    tensor = TensorProto(name="W", data_type=999)
    with pytest.raises(ModelLoadError, match="unknown data type") as info:
        element_dtype(tensor)
    assert isinstance(info.value.__cause__, (KeyError, ValueError, TypeError))


def test_mask_files_keep_the_underlying_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such mask file") as info:
        MaskSet.load(tmp_path / "none.npz")
    assert isinstance(info.value.__cause__, FileNotFoundError)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(GARBAGE)
    with pytest.raises(ConfigError, match="not a mask .npz file") as info:
        MaskSet.load(bad)
    assert info.value.__cause__ is not None


def test_recipe_keeps_the_toml_error(tmp_path) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text("sparsity = = 0.5\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_recipe(recipe, build_parser().prune_parser)
    assert type(info.value.__cause__).__name__ == "TOMLDecodeError"
    with pytest.raises(ConfigError, match="no such recipe file") as info:
        load_recipe(tmp_path / "none.toml", build_parser().prune_parser)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_config_keeps_the_conversion_error() -> None:
    with pytest.raises(ConfigError, match="sparsity must be a number") as info:
        PruneConfig(sparsity="half")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ConfigError, match="bad regular expression") as info:
        PruneConfig(include=("(",))
    assert isinstance(info.value.__cause__, re.error)


def test_calibration_sample_keeps_the_onnxruntime_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(CalibrationError, match="fails in onnxruntime") as info:
        _run(session, {"x": np.ones((2, 5), np.float32)})
    assert info.value.__cause__ is not None
    assert not isinstance(info.value.__cause__, CalibrationError)


# --- what the CLI prints ------------------------------------------------------------------------

def _error_line(path: Path) -> str:
    return (f"onnxprune: error: {path}: not a valid ONNX model (protobuf could not be parsed; "
            "truncated or not ONNX)")


def test_user_error_is_one_line_without_verbose(garbage, capsys) -> None:
    assert main(["inspect", str(garbage)]) == 2
    captured = capsys.readouterr()
    assert captured.err == _error_line(garbage) + "\n"
    assert captured.out == ""


def test_verbose_user_error_shows_the_chained_cause(garbage, capsys) -> None:
    assert main(["inspect", str(garbage), "-v"]) == 2
    err = capsys.readouterr().err
    first, rest = err.split("\n", 1)
    assert first == _error_line(garbage)  # the same line first
    assert rest.startswith("Traceback (most recent call last):")
    assert "The above exception was the direct cause of the following exception:" in rest
    assert re.search(r"^google\.protobuf\.message\.DecodeError: |^\S*WireError: ", rest,
                     re.MULTILINE)
    assert rest.rstrip().endswith("onnxprune.errors.ModelLoadError: " + first.split(": ", 2)[2])


def test_verbose_bad_levels_show_the_value_error(tmp_path, capsys) -> None:
    model = tmp_path / "mlp.onnx"
    shutil.copy(MODELS_DIR / "mlp.onnx", model)
    assert main(["sensitivity", str(model), "--levels", "0.5,half", "-v"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxprune: error: --levels must be numbers separated by commas, "
                          "got '0.5,half'\n")
    assert re.search(r"^ValueError: ", err, re.MULTILINE)


def test_verbose_errors_without_a_cause_still_show_where(tmp_path, capsys) -> None:
    model = tmp_path / "mlp.onnx"
    shutil.copy(MODELS_DIR / "mlp.onnx", model)
    out = tmp_path / "out.onnx"
    assert main(["prune", str(model), "-o", str(out), "--min-size", "100000000", "-v"]) == 2
    err = capsys.readouterr().err
    line = next(text for text in err.splitlines() if text.startswith("onnxprune: error: "))
    assert "nothing to prune" in line
    assert "NothingToPruneError: nothing to prune" in err
    assert "direct cause" not in err
