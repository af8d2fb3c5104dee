"""`tools/graph_feeds.py`: the one feed builder of tools/fuzz.py and tools/peer_suite.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO_ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"onnxprune_{name}",
                                                  REPO_ROOT / "tools" / f"{name}.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def _model(*inputs: onnx.ValueInfoProto, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph([], "g", list(inputs), [], list(initializers))
    return helper.make_model(graph)


def test_fuzz_and_peer_suite_share_one_feed_builder():
    assert _tool("fuzz").graph_feeds is _tool("peer_suite").graph_feeds


def test_feeds_follow_the_graph_and_the_seed():
    graph_feeds = _tool("peer_suite").graph_feeds
    model = _model(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4]),
                   helper.make_tensor_value_info("ids", TensorProto.INT64, [2, None]),
                   helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                   helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
                   initializers=[onnx.numpy_helper.from_array(np.ones(2, np.float32), "w")])
    feeds = graph_feeds(model)
    assert {name: (a.dtype, a.shape) for name, a in feeds.items()} == {
        "x": (np.float32, (1, 3, 4)), "ids": (np.int64, (2, 1)), "flag": (np.bool_, ())}
    assert not feeds["ids"].any()
    np.testing.assert_array_equal(graph_feeds(model)["x"], feeds["x"])
    assert not np.array_equal(graph_feeds(model, seed=1)["x"], feeds["x"])
    assert graph_feeds(model, max_elements=11) is None
    strings = _model(helper.make_tensor_value_info("s", TensorProto.STRING, [1]))
    assert graph_feeds(strings) is None
    sequence = _model(helper.make_tensor_sequence_value_info("q", TensorProto.FLOAT, None))
    assert graph_feeds(sequence) is None
