"""MACs of channel groups on models with dynamic input sizes: estimated at one concrete
shape (`shapes.macs_input_shapes`: the synthetic calibration inputs' shape, scaled where
the model cannot take it), and `inspect --structured` and the prune report say which."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import real_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main
from onnxprune.inputs import DEFAULT_DIM
from onnxprune.structured import find_groups
from onnxprune.structured.shapes import macs_input_shapes


def _conv(name: str, source: str, out: int, into: int, stride: int, rng) -> tuple:
    weight = numpy_helper.from_array(rng.standard_normal((out, into, 3, 3)).astype(np.float32),
                                     f"{name}.w")
    node = helper.make_node("Conv", [source, weight.name], [f"{name}.y"], pads=[1, 1, 1, 1],
                            strides=[stride, stride], name=name)
    relu = helper.make_node("Relu", [f"{name}.y"], [f"{name}.r"])
    return [node, relu], [weight], f"{name}.r"


def _pyramid(spatial) -> onnx.ModelProto:
    """Five stride-2 Convs, the last map upsampled x2 and concatenated with the fourth, as
    YOLO's neck does: at 16 x 16 the two differ (1 vs 2), at multiples of 32 they meet."""
    rng = np.random.default_rng(0)
    nodes, inits, previous, outputs = [], [], "x", []
    channels = 3
    for level in range(5):
        more, weights, previous = _conv(f"down{level}", previous, 8, channels, 2, rng)
        nodes += more
        inits += weights
        outputs.append(previous)
        channels = 8
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes.append(helper.make_node("Resize", [previous, "", "scales"], ["up"], mode="nearest"))
    nodes.append(helper.make_node("Concat", ["up", outputs[3]], ["cat"], axis=1))
    more, weights, last = _conv("head", "cat", 4, 16, 1, rng)
    graph = helper.make_graph(
        nodes + more, "pyramid", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              ["N", 3, *spatial])],
        [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["N", 4, "h", "w"])],
        [*inits, *weights, scales])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _macs(model: onnx.ModelProto) -> dict[str, int]:
    return {g.name: g.macs for g in find_groups(model)[0]}


def test_where_the_synthetic_shape_does_not_fit_a_scaled_one_is_used():
    model = _pyramid(["H", "W"])
    assert macs_input_shapes(model) == {"x": (1, 3, 32, 32)}
    dynamic = _macs(model)
    static = _macs(_pyramid([32, 32]))
    assert dynamic == static and all(macs > 0 for macs in dynamic.values())
    assert macs_input_shapes(_pyramid([32, 32])) == {}  # static but for the batch


def test_macs_of_a_dynamic_model_are_those_of_the_synthetic_input_shape():
    model = _pyramid(["H", "W"])
    del model.graph.node[-4:]  # no Resize/Concat/head: 16 x 16 goes through
    model.graph.output[0].name = "down4.r"
    del model.graph.initializer[-2:]  # the head's weight and the scales
    assert macs_input_shapes(model) == {"x": (1, 3, DEFAULT_DIM, DEFAULT_DIM)}
    assert all(macs > 0 for macs in _macs(model).values())


def test_inspect_and_prune_report_say_at_which_shape(tmp_path, capsys):
    path = tmp_path / "pyramid.onnx"
    onnx.save(_pyramid(["H", "W"]), str(path))
    assert main(["inspect", str(path), "--structured", "--json", "--min-size", "0"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["macs_at"] == {"x": [1, 3, 32, 32]}
    assert found["groups"] and all(g["macs"] > 0 for g in found["groups"])
    assert main(["inspect", str(path), "--structured", "--min-size", "0"]) == 0
    out = capsys.readouterr().out
    assert "MACs estimated at x [1, 3, 32, 32]" in out and " ?\n" not in out
    report = tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--structure",
                 "channels", "--min-size", "0", "--round-to", "1", "--sparsity", "0.5",
                 "--report", str(report)]) == 0
    assert "MACs estimated at x [1, 3, 32, 32]" in capsys.readouterr().out
    structured = json.loads(report.read_text())["structured"]
    assert structured["macs_at"] == {"x": [1, 3, 32, 32]}
    assert structured["macs_removed"] > 0


def test_yolov8n_macs_are_all_known():
    model = onnx.load(str(real_model("nudenet_320n")), load_external_data=False)
    assert macs_input_shapes(model) == {"images": (1, 3, 32, 32)}
    groups, _ = find_groups(model)
    assert groups and all(g.macs > 0 for g in groups)


@pytest.mark.parametrize("declared", [["H", "W"], [None, None]], ids=["named", "unnamed"])
def test_named_and_unnamed_dynamic_dims_are_scaled_alike(declared):
    assert macs_input_shapes(_pyramid(declared)) == {"x": (1, 3, 32, 32)}


def test_given_input_sizes_are_the_ones_macs_are_estimated_at(tmp_path, capsys):
    path = tmp_path / "pyramid.onnx"
    onnx.save(_pyramid(["H", "W"]), str(path))
    assert macs_input_shapes(_pyramid(["H", "W"]), {"H": 64, "W": 64}) == {"x": (1, 3, 64, 64)}
    removed = {}
    for size in (32, 64):
        report = tmp_path / f"r{size}.json"
        assert main(["prune", str(path), "-o", str(tmp_path / f"o{size}.onnx"), "--structure",
                     "channels", "--min-size", "0", "--round-to", "1", "--sparsity", "0.5",
                     "--input-shapes", f"x:[1,3,{size},{size}]", "--report", str(report)]) == 0
        assert f"MACs estimated at x [1, 3, {size}, {size}]" in capsys.readouterr().out
        structured = json.loads(report.read_text())["structured"]
        assert structured["macs_at"] == {"x": [1, 3, size, size]}
        removed[size] = structured["macs_removed"]
    assert removed[64] == 4 * removed[32] > 0  # every Conv's MACs grow with H x W


def test_inspect_structured_estimates_macs_at_given_sizes(tmp_path, capsys):
    path = tmp_path / "pyramid.onnx"
    onnx.save(_pyramid(["H", "W"]), str(path))
    macs = {}
    for size in (32, 64):
        assert main(["inspect", str(path), "--structured", "--json", "--min-size", "0",
                     "--dim", f"H={size}", "--dim", f"W={size}"]) == 0
        found = json.loads(capsys.readouterr().out)
        assert found["macs_at"] == {"x": [1, 3, size, size]}
        macs[size] = sum(g["macs"] for g in found["groups"])
    assert macs[64] == 4 * macs[32] > 0
    assert main(["inspect", str(path), "--dim", "H=64"]) == 0
    assert "ignored without --structured" in capsys.readouterr().err
