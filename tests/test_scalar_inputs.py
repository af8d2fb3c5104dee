"""Scalar (rank-0) graph inputs on every path that makes synthetic feeds: calibration of
`prune` without --calib, `prune --validate`, `validate` and `sensitivity`.

A synthetic value must be a 0-d numpy array, never a numpy scalar: onnxruntime refuses
`numpy.bool` ("Unable to handle object of type <class 'numpy.bool'>").
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.inputs import synthetic_inputs
from onnxprune.runtime import make_session, run_session

# Every element type a synthetic value can be made for, as a scalar input cast to float.
SCALAR_TYPES = {
    "bool": TensorProto.BOOL, "int8": TensorProto.INT8, "int16": TensorProto.INT16,
    "int32": TensorProto.INT32, "int64": TensorProto.INT64, "uint8": TensorProto.UINT8,
    "uint16": TensorProto.UINT16, "uint32": TensorProto.UINT32, "uint64": TensorProto.UINT64,
    "float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT,
    "float64": TensorProto.DOUBLE, "bfloat16": TensorProto.BFLOAT16,
}
WIDTH = 64  # W is WIDTH x WIDTH = 4096 weights, the default --min-size


def _scalar_model(types: dict[str, int] = SCALAR_TYPES) -> onnx.ModelProto:
    """y = If(cond, Relu(h), Neg(h)) with h = (x @ W) * (1 + sum of the scalars cast to
    float); `cond` is a scalar bool, and each of `types` has its own scalar input `s_<name>`."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"])]
    total = "one"
    for name in types:
        nodes.append(helper.make_node("Cast", [f"s_{name}"], [f"f_{name}"],
                                      to=TensorProto.FLOAT))
        nodes.append(helper.make_node("Add", [total, f"f_{name}"], [f"sum_{name}"]))
        total = f"sum_{name}"
    nodes.append(helper.make_node("Mul", ["xw", total], ["h"]))

    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["h"], ["out"])], op.lower(), [],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, WIDTH])])

    nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=branch("Relu"),
                                  else_branch=branch("Neg")))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    inputs += [helper.make_tensor_value_info(f"s_{name}", elem_type, [])
               for name, elem_type in types.items()]
    graph = helper.make_graph(
        nodes, "scalars", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])],
        [numpy_helper.from_array(weight, "W"),
         numpy_helper.from_array(np.ones((), np.float32), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(params=["cond", "every-type"])
def scalar_model(request, tmp_path):
    """The model with only the scalar bool `cond` (the reported case), or with a scalar
    input of every type besides."""
    path = tmp_path / "scalars.onnx"
    onnx.save(_scalar_model({} if request.param == "cond" else SCALAR_TYPES), str(path))
    return path


@pytest.mark.parametrize("name", sorted(SCALAR_TYPES))
def test_synthetic_scalar_is_a_0d_array_that_onnxruntime_runs(name):
    model = _scalar_model({name: SCALAR_TYPES[name]})
    feeds = synthetic_inputs(model, samples=3, seed=1)
    for feed in feeds:
        for input_name, value in feed.items():
            assert type(value) is np.ndarray, (input_name, type(value))
        assert feed["cond"].shape == () and feed["cond"].dtype == np.bool_
        expected = ml_dtypes.bfloat16 if name == "bfloat16" else name
        assert feed[f"s_{name}"].shape == () and feed[f"s_{name}"].dtype == np.dtype(expected)
    session = make_session(model)
    for feed in feeds:
        (output,) = run_session(session, feed).values()
        assert output.shape == (1, WIDTH)


def test_run_session_accepts_numpy_scalars_given_by_a_caller():
    model = _scalar_model({"bool": TensorProto.BOOL, "float32": TensorProto.FLOAT})
    feed = {"x": np.ones((1, WIDTH), np.float32), "cond": np.bool_(True),
            "s_bool": np.bool_(False), "s_float32": np.float32(0.5)}
    (output,) = run_session(make_session(model), feed).values()
    assert output.shape == (1, WIDTH)


def test_prune_calibrates_on_synthetic_scalars(scalar_model, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    code = main(["prune", str(scalar_model), "-o", str(out), "--method", "wanda",
                 "--calib-samples", "2"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_prune_validates_on_synthetic_scalars(scalar_model, tmp_path, capsys):
    code = main(["prune", str(scalar_model), "-o", str(tmp_path / "pruned.onnx"),
                 "--validate", "--min-cosine", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "PASSED" in captured.out


def test_validate_runs_on_synthetic_scalars(scalar_model, capsys):
    code = main(["validate", str(scalar_model), str(scalar_model), "--json", "--atol", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["passed"] is True


def test_sensitivity_runs_on_synthetic_scalars(scalar_model, tmp_path, capsys):
    code = main(["sensitivity", str(scalar_model), "-o", str(tmp_path / "sweep"),
                 "--levels", "0.5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "internal error" not in captured.err
