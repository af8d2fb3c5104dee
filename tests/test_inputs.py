"""Graph inputs, synthetic feeds, `.npz` feeds and `--dim` parsing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import CalibrationError, ConfigError
from onnxprune.inputs import (
    describe_feed,
    graph_inputs,
    load_npz_inputs,
    parse_dim_overrides,
    parse_input_shapes,
    synthetic_inputs,
)

VOCAB = 7


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def two_input_model() -> onnx.ModelProto:
    """x: float32 [batch, 4]; mask: int64 [batch, seq]; y = x @ W."""
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    return _model(
        [
            helper.make_node("MatMul", ["x", "W"], ["y"]),
            helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["mask_f"], ["total"], keepdims=0),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(weight, "W")],
    )


@pytest.fixture(scope="module")
def token_model() -> onnx.ModelProto:
    """ids int64 [batch, seq] -> Cast -> Gather(table [VOCAB, 4]); ORT rejects ids >= VOCAB."""
    table = np.arange(VOCAB * 4, dtype=np.float32).reshape(VOCAB, 4)
    return _model(
        [
            helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
            helper.make_node("Gather", ["table", "ids32"], ["emb"], axis=0),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(table, "table")],
    )


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --- graph_inputs ---------------------------------------------------------------------------


def test_graph_inputs_skips_initializers_listed_as_inputs():
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4]),
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
        [weight],
    )
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()  # an unnamed dimension
    (spec,) = graph_inputs(model)
    assert spec.name == "x"
    assert spec.dtype == np.float16
    assert spec.shape == (None, 4)


def test_npz_unknown_rank_reads_one_sample_and_says_so(tmp_path, caplog):
    """An input without a shape cannot tell a stack from one sample: one sample, a warning
    naming the input and the shape read, and how to give several."""
    model = _model(
        [helper.make_node("Identity", ["a"], ["b"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "stacked.npz"
    np.savez(path, a=_x(5, 3))
    (feed,) = load_npz_inputs(path, model)
    assert feed["a"].shape == (5, 3)
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelname == "WARNING" and "\n" not in message
    assert "'a'" in message and "no shape" in message and "one sample" in message
    assert "[5, 3] in stacked.npz" in message
    assert "folder of .npz files, one sample per file" in message
    caplog.clear()
    for i in range(3):  # the way to give several: one file per sample, one warning in all
        np.savez(tmp_path / f"s{i}.npz", a=_x(5, 3) + i)
    path.unlink()
    assert len(load_npz_inputs(tmp_path, model)) == 3
    assert len(caplog.records) == 1


def test_npz_known_rank_stack_says_nothing(tmp_path, two_input_model, caplog):
    np.savez(tmp_path / "calib.npz", x=_x(3, 1, 4), mask=_mask(3, 1, 2))
    assert len(load_npz_inputs(tmp_path / "calib.npz", two_input_model)) == 3
    assert caplog.records == []


def test_graph_inputs_named_and_unknown_rank():
    model = _model(
        [helper.make_node("Identity", ["a"], ["b"])],
        [helper.make_tensor_value_info("a", TensorProto.INT32, None)],
        [helper.make_tensor_value_info("b", TensorProto.INT32, None)],
    )
    (spec,) = graph_inputs(model)
    assert spec.shape is None and spec.rank is None and spec.dtype == np.int32


# --- synthetic_inputs -----------------------------------------------------------------------


def test_synthetic_inputs_deterministic_per_seed(two_input_model):
    first = synthetic_inputs(two_input_model, samples=3, seed=5)
    again = synthetic_inputs(two_input_model, samples=3, seed=5)
    other = synthetic_inputs(two_input_model, samples=3, seed=6)
    assert len(first) == 3
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(first[0]["x"], other[0]["x"])
    assert not np.array_equal(first[0]["x"], first[1]["x"])  # samples differ from each other


def test_synthetic_inputs_default_dims_types_and_ranges(two_input_model):
    (feed,) = synthetic_inputs(two_input_model)
    assert feed["x"].shape == (1, 4) and feed["x"].dtype == np.float32
    assert feed["mask"].shape == (1, 16) and feed["mask"].dtype == np.int64
    assert feed["mask"].min() >= 0 and feed["mask"].max() < 100
    large = synthetic_inputs(two_input_model, samples=1, dims={"batch": 4000})[0]["x"]
    assert abs(large.mean()) < 0.1 and 0.9 < large.std() < 1.1  # standard normal


def test_synthetic_inputs_honour_dims(two_input_model):
    (feed,) = synthetic_inputs(two_input_model, dims={"batch": 3, "seq": 5})
    assert feed["x"].shape == (3, 4)
    assert feed["mask"].shape == (3, 5)


def test_synthetic_inputs_reject_unknown_dim_name(two_input_model):
    with pytest.raises(ConfigError) as excinfo:
        synthetic_inputs(two_input_model, dims={"sequence": 5})
    message = _one_line_error(excinfo)
    assert "sequence" in message and "batch" in message and "seq" in message


def test_synthetic_inputs_unnamed_dims_and_odd_dtypes():
    inputs = [
        helper.make_tensor_value_info("h", TensorProto.FLOAT16, [None, None, 2]),
        helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [3]),
        helper.make_tensor_value_info("d", TensorProto.DOUBLE, [2]),
        helper.make_tensor_value_info("flag", TensorProto.BOOL, [50]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        helper.make_tensor_value_info("u", TensorProto.UINT8, [50]),
    ]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inputs]
    outputs = [
        helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None)
        for i in inputs
    ]
    model = _model(nodes, inputs, outputs)
    (feed,) = synthetic_inputs(model, seed=1)
    assert feed["h"].shape == (1, 16, 2) and feed["h"].dtype == np.float16
    assert feed["b"].dtype == ml_dtypes.bfloat16 and np.isfinite(feed["b"].astype(np.float32)).all()
    assert feed["d"].dtype == np.float64
    assert feed["flag"].dtype == np.bool_ and 0 < feed["flag"].sum() < 50
    assert feed["sr"].shape == () and feed["sr"].dtype == np.int64 and 0 <= feed["sr"] < 100
    assert feed["u"].dtype == np.uint8 and feed["u"].max() < 100


def test_synthetic_token_ids_stay_inside_the_gather_table(token_model):
    feeds = synthetic_inputs(token_model, samples=4, dims={"seq": 200})
    ids = np.stack([feed["ids"] for feed in feeds])
    assert ids.min() >= 0 and ids.max() == VOCAB - 1  # 800 draws cover all 7 rows
    session = ort.InferenceSession(
        token_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for feed in feeds:  # out-of-range ids would make onnxruntime raise
        (emb,) = session.run(None, feed)
        assert emb.shape == (1, 200, 4)


def test_synthetic_inputs_reject_zero_samples(two_input_model):
    with pytest.raises(ConfigError):
        synthetic_inputs(two_input_model, samples=0)


def test_synthetic_inputs_need_a_shape():
    model = _model(
        [helper.make_node("Identity", ["a"], ["b"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    with pytest.raises(CalibrationError) as excinfo:
        synthetic_inputs(model)
    assert "'a'" in _one_line_error(excinfo)


# --- parse_dim_overrides --------------------------------------------------------------------


def test_parse_dim_overrides():
    assert parse_dim_overrides(["batch=2", "seq=32"]) == {"batch": 2, "seq": 32}
    assert parse_dim_overrides(["batch=2,seq=32"]) == {"batch": 2, "seq": 32}
    assert parse_dim_overrides([]) == {}


@pytest.mark.parametrize("bad", ["batch", "=3", "batch=x", "batch=0", "batch=-1", "batch=1.5"])
def test_parse_dim_overrides_rejects_bad_syntax(bad):
    with pytest.raises(ConfigError) as excinfo:
        parse_dim_overrides([bad])
    _one_line_error(excinfo)


def test_parse_dim_overrides_rejects_conflicting_repeats():
    assert parse_dim_overrides(["seq=4", "seq=4"]) == {"seq": 4}
    with pytest.raises(ConfigError):
        parse_dim_overrides(["seq=4", "seq=8"])


# --- load_npz_inputs ------------------------------------------------------------------------


def _x(*shape) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def _mask(*shape) -> np.ndarray:
    return np.ones(shape, np.int64)


def test_npz_stacked_samples(tmp_path, two_input_model):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_x(5, 2, 4), mask=_mask(5, 2, 3))
    feeds = load_npz_inputs(path, two_input_model)
    assert len(feeds) == 5
    np.testing.assert_array_equal(feeds[3]["x"], _x(5, 2, 4)[3])
    assert feeds[0]["mask"].shape == (2, 3)
    assert len(load_npz_inputs(path, two_input_model, samples=2)) == 2


def test_npz_single_batch_is_one_sample(tmp_path, two_input_model):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_x(6, 4), mask=_mask(6, 3))
    (feed,) = load_npz_inputs(path, two_input_model)
    np.testing.assert_array_equal(feed["x"], _x(6, 4))
    assert feed["mask"].shape == (6, 3)


def test_npz_folder_one_sample_per_file_in_name_order(tmp_path, two_input_model):
    for i in range(3):
        np.savez(tmp_path / f"sample_{i}.npz", x=_x(1, 4) + i, mask=_mask(1, 2))
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = load_npz_inputs(tmp_path, two_input_model)
    assert [float(feed["x"][0, 0]) for feed in feeds] == [0.0, 1.0, 2.0]
    assert len(load_npz_inputs(tmp_path, two_input_model, samples=2)) == 2


def test_npz_lossless_casts(tmp_path, two_input_model):
    path = tmp_path / "calib.npz"
    np.savez(path, x=_x(1, 4).astype(np.float64), mask=_mask(1, 2).astype(np.int32))
    (feed,) = load_npz_inputs(path, two_input_model)
    assert feed["x"].dtype == np.float32 and feed["mask"].dtype == np.int64


def test_npz_bfloat16_round_trip(tmp_path):
    model = _model(
        [helper.make_node("Identity", ["a"], ["b"])],
        [helper.make_tensor_value_info("a", TensorProto.BFLOAT16, [2])],
        [helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [2])],
    )
    path = tmp_path / "bf16.npz"
    np.savez(path, a=np.array([1.5, -2.0], ml_dtypes.bfloat16))  # stored as raw |V2
    (feed,) = load_npz_inputs(path, model)
    assert feed["a"].dtype == ml_dtypes.bfloat16
    assert feed["a"].astype(np.float32).tolist() == [1.5, -2.0]


def _write(tmp_path, **arrays):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, expected",
    [
        ({"x": _x(1, 4)}, ["missing", "'mask'"]),
        ({"x": _x(1, 4), "mask": _mask(1, 2), "extra": _x(1)}, ["unknown", "'extra'"]),
        ({"x": _x(1, 4).astype(np.float16), "mask": _mask(1, 2)}, ["'x'", "float16", "float32"]),
        ({"x": _x(1, 4), "mask": _mask(1, 2).astype(np.float32)}, ["'mask'", "int64"]),
        ({"x": _x(4), "mask": _mask(1, 2)}, ["'x'", "rank 2"]),
        ({"x": _x(1, 1, 1, 4), "mask": _mask(1, 2)}, ["'x'", "rank 2"]),
        ({"x": _x(1, 5), "mask": _mask(1, 2)}, ["'x'", "[1, 5]", "[batch, 4]"]),
        ({"x": _x(3, 1, 4), "mask": _mask(2, 1, 2)}, ["different numbers of samples"]),
        ({"x": _x(0, 1, 4), "mask": _mask(0, 1, 2)}, ["no samples"]),
    ],
)
def test_npz_errors(tmp_path, two_input_model, arrays, expected):
    path = _write(tmp_path, **arrays)
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(path, two_input_model)
    message = _one_line_error(excinfo)
    for fragment in expected:
        assert fragment in message


def test_npz_missing_file(tmp_path, two_input_model):
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(tmp_path / "absent.npz", two_input_model)
    assert "absent.npz" in _one_line_error(excinfo)


def test_npz_not_an_archive(tmp_path, two_input_model):
    text = tmp_path / "calib.npz"
    text.write_text("not numpy at all\n" * 10)
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(text, two_input_model)
    assert "not a readable .npz" in _one_line_error(excinfo)
    single = tmp_path / "single.npy"
    np.save(single, _x(1, 4))
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(single, two_input_model)
    assert "not an .npz" in _one_line_error(excinfo)


def test_npz_empty_folder(tmp_path, two_input_model):
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(tmp_path, two_input_model)
    assert "no .npz" in _one_line_error(excinfo)


def test_npz_error_in_folder_names_the_file(tmp_path, two_input_model):
    np.savez(tmp_path / "a.npz", x=_x(1, 4), mask=_mask(1, 2))
    np.savez(tmp_path / "b.npz", x=_x(1, 4))
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(tmp_path, two_input_model)
    message = _one_line_error(excinfo)
    assert "b.npz" in message and "'mask'" in message


# --- dynamic dims written as -1 (PaddlePaddle) ------------------------------------------------


def _paddle_like_model() -> onnx.ModelProto:
    """x float32 [-1, 3, ?, ?] as PaddlePaddle exports write it; y = ReduceMean over H, W."""
    model = _model(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, None, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])],
        opset=13,
    )
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "?"
    return model


def test_minus_one_dims_are_dynamic():
    model = _paddle_like_model()
    (spec,) = graph_inputs(model)
    assert spec.shape == (None, 3, None, None) and spec.shape_text() == "[?, 3, ?, ?]"
    (feed,) = synthetic_inputs(model)
    assert feed["x"].shape == (1, 3, 16, 16)


def test_npz_fitting_minus_one_dims_is_accepted(tmp_path):
    path = tmp_path / "image.npz"
    image = _x(1, 3, 48, 192)
    np.savez(path, x=image)
    (feed,) = load_npz_inputs(path, _paddle_like_model())
    np.testing.assert_array_equal(feed["x"], image)
    np.savez(path, x=_x(1, 4, 48, 192))  # the static channel count still binds
    with pytest.raises(CalibrationError) as excinfo:
        load_npz_inputs(path, _paddle_like_model())
    assert "[1, 4, 48, 192]" in _one_line_error(excinfo)


# --- --input-shapes -------------------------------------------------------------------------


def test_parse_input_shapes_forms():
    assert parse_input_shapes([]) == {}
    assert parse_input_shapes(["x:[1,3,48,192]"]) == {"x": (1, 3, 48, 192)}
    assert parse_input_shapes(["ids:[1, 128]  mask:[1,128]", "sr:[]"]) == {
        "ids": (1, 128), "mask": (1, 128), "sr": ()}
    assert parse_input_shapes(["input:0:[2,4]"]) == {"input:0": (2, 4)}
    assert parse_input_shapes(["x:[1,2]", "x:[1,2]"]) == {"x": (1, 2)}


@pytest.mark.parametrize("bad", ["x", "x:1,2", "x:[1,2", "x:[a]", "x:[1,-1]", "x:[1] junk",
                                 ":[1]", "x:[1.5]"])
def test_parse_input_shapes_rejects_bad_syntax(bad):
    with pytest.raises(ConfigError) as excinfo:
        parse_input_shapes([bad])
    assert "--input-shapes" in _one_line_error(excinfo)


def test_parse_input_shapes_rejects_conflicting_repeats():
    with pytest.raises(ConfigError) as excinfo:
        parse_input_shapes(["x:[1,2]", "x:[1,3]"])
    assert "[1, 2]" in _one_line_error(excinfo) and "[1, 3]" in str(excinfo.value)


def test_input_shapes_set_unnamed_and_minus_one_dims():
    (feed,) = synthetic_inputs(_paddle_like_model(), input_shapes={"x": (2, 3, 48, 192)})
    assert feed["x"].shape == (2, 3, 48, 192)


def test_input_shapes_bind_named_dims_for_the_other_inputs(two_input_model):
    (feed,) = synthetic_inputs(two_input_model, input_shapes={"x": (5, 4)})
    assert feed["x"].shape == (5, 4)
    assert feed["mask"].shape == (5, 16)  # "batch" follows x; "seq" keeps its default
    (feed,) = synthetic_inputs(two_input_model, dims={"seq": 7}, input_shapes={"x": (5, 4)})
    assert feed["mask"].shape == (5, 7)


@pytest.mark.parametrize(
    "shapes, dims, expected",
    [
        ({"y": (1, 4)}, {}, ["unknown input", "y", "x, mask"]),
        ({"x": (1, 4, 1)}, {}, ["rank 3", "[batch, 4]"]),
        ({"x": (1, 5)}, {}, ["axis 1 is 4", "got 5"]),
        ({"x": (2, 4)}, {"batch": 3}, ["'batch'", "3", "--dim batch=3", "got 2"]),
        ({"x": (2, 4), "mask": (3, 8)}, {}, ["'batch'", "got"]),
    ],
)
def test_input_shapes_that_do_not_fit_the_model(two_input_model, shapes, dims, expected):
    with pytest.raises(ConfigError) as excinfo:
        synthetic_inputs(two_input_model, dims=dims, input_shapes=shapes)
    message = _one_line_error(excinfo)
    for fragment in expected:
        assert fragment in message


def test_scalar_input_shape():
    model = _model(
        [helper.make_node("Identity", ["sr"], ["out"])],
        [helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.INT64, [])],
    )
    (feed,) = synthetic_inputs(model, input_shapes={"sr": ()})
    assert isinstance(feed["sr"], np.ndarray) and feed["sr"].shape == ()


def test_named_first_axis_dim_defaults_to_one():
    """Exporters name the batch axis anything (PaddlePaddle: p2o.DynamicDimension.0)."""
    model = _model(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 3,
                                                                "p2o.DynamicDimension.1"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    (feed,) = synthetic_inputs(model)
    assert feed["x"].shape == (1, 3, 16)


def test_describe_feed():
    feed = {"x": np.zeros((1, 3), np.float32), "sr": np.array(16000, np.int64)}
    assert describe_feed(feed) == "x: float32[1, 3], sr: int64[]"


# --- masks and Gather bounds ------------------------------------------------------------------


def _mask_model(name: str, elem_type: int) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Identity", [name], ["out"])],
        [helper.make_tensor_value_info(name, elem_type, ["batch", "seq"])],
        [helper.make_tensor_value_info("out", elem_type, ["batch", "seq"])],
    )


@pytest.mark.parametrize("name, elem_type", [("attention_mask", TensorProto.INT64),
                                             ("pixel_mask", TensorProto.INT32),
                                             ("Mask", TensorProto.BOOL)])
def test_mask_inputs_are_padding_masks(name, elem_type):
    feeds = synthetic_inputs(_mask_model(name, elem_type), samples=8, dims={"batch": 4,
                                                                          "seq": 32})
    masks = np.stack([feed[name] for feed in feeds]).astype(np.int64)
    assert set(np.unique(masks)) <= {0, 1}
    assert masks.mean() > 0.75  # mostly 1
    assert (masks == 0).any()  # some padding
    lengths = masks.sum(axis=-1)
    assert lengths.min() >= 24  # at most a quarter of a row is padding
    # 1 up to the length, then 0: padding at the end of each row
    np.testing.assert_array_equal(masks, np.arange(32) < lengths[..., np.newaxis])


def test_integer_inputs_not_named_mask_keep_the_wide_range():
    (feed,) = synthetic_inputs(_mask_model("positions", TensorProto.INT64), dims={"seq": 200})
    assert feed["positions"].max() > 1


def _gather_model(nodes, table) -> onnx.ModelProto:
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)],
        [table],
    )


def test_gather_bound_through_a_dequantized_table_and_moving_ops():
    """ids -> Transpose -> Slice -> Gather(DequantizeLinear(int8 table [VOCAB, 4]))."""
    table = numpy_helper.from_array(np.ones((VOCAB, 4), np.int8), "q_table")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([1 << 30], np.int64), "ends")
    model = _gather_model(
        [
            helper.make_node("DequantizeLinear", ["q_table", "scale"], ["table"]),
            helper.make_node("Transpose", ["ids"], ["ids_t"], perm=[1, 0]),
            helper.make_node("Slice", ["ids_t", "starts", "ends"], ["ids_s"]),
            helper.make_node("Gather", ["table", "ids_s"], ["emb"], axis=0),
        ],
        table,
    )
    model.graph.initializer.extend([scale, starts, ends])
    _check_ids_run(model, VOCAB)


def _if_model(then_nodes, else_nodes, outer_nodes=(), outer_initializers=()) -> onnx.ModelProto:
    """emb = If(flag, then_nodes, else_nodes); both branches read the outer `ids` (or what
    `outer_nodes` make of it) and return `emb`."""

    def branch(name, nodes):
        return helper.make_graph(list(nodes), name, [], [helper.make_tensor_value_info(
            "emb", TensorProto.FLOAT, ["batch", "seq", 4])])

    model = _model(
        [*outer_nodes, helper.make_node("If", ["flag"], ["emb"],
                                        then_branch=branch("then", then_nodes),
                                        else_branch=branch("else", else_nodes))],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 4])],
        outer_initializers,
    )
    onnx.checker.check_model(model)
    return model


def _table_constant(output: str, rows: int) -> onnx.NodeProto:
    table = numpy_helper.from_array(np.ones((rows, 4), np.float32), output)
    return helper.make_node("Constant", [], [output], value=table)


def _check_ids_run(model: onnx.ModelProto, bound: int) -> None:
    feeds = synthetic_inputs(model, samples=4, dims={"seq": 200})
    ids = np.stack([feed["ids"] for feed in feeds])
    assert ids.min() >= 0 and ids.max() == bound - 1
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)  # out-of-range ids would make onnxruntime raise


def test_gather_bound_found_inside_if_branches():
    """The ids are read only inside the branches, each Gather's table a Constant of its
    branch (silero-vad keeps its weights so); the smaller table bounds the ids."""
    model = _if_model(
        [_table_constant("table", VOCAB), helper.make_node("Gather", ["table", "ids"], ["emb"])],
        [_table_constant("table", VOCAB + 3),
         helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
         helper.make_node("Gather", ["table", "ids32"], ["emb"])])
    _check_ids_run(model, VOCAB)


def test_gather_bound_through_outer_ops_and_an_outer_table_inside_a_branch():
    """ids -> Cast (main graph) -> Identity -> Gather in a branch, whose table is a main-graph
    initializer cast inside the branch; the other branch has a larger table."""
    table = numpy_helper.from_array(np.ones((VOCAB, 4), np.float16), "table16")
    then_nodes = [helper.make_node("Identity", ["ids32"], ["ids_b"]),
                  helper.make_node("Cast", ["table16"], ["table"], to=TensorProto.FLOAT),
                  helper.make_node("Gather", ["table", "ids_b"], ["emb"])]
    else_nodes = [_table_constant("table", VOCAB + 3),
                  helper.make_node("Gather", ["table", "ids32"], ["emb"])]
    model = _if_model(then_nodes, else_nodes,
                      [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32)],
                      [table])
    _check_ids_run(model, VOCAB)


def test_gather_bound_with_a_sparse_table():
    """A model written with --format sparse keeps its tensors as sparse initializers (a
    lazily loaded model is read as it is stored): the table is found all the same."""
    values = numpy_helper.from_array(np.ones(2, np.float32), "table")
    indices = numpy_helper.from_array(np.array([0, 5], np.int64), "table_indices")
    sparse = helper.make_sparse_tensor(values, indices, [VOCAB, 4])
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", "seq", 4])],
    )
    model.graph.sparse_initializer.append(sparse)
    _check_ids_run(model, VOCAB)


# --- scalar inputs in .npz files --------------------------------------------------------------


@pytest.fixture(scope="module")
def scalar_model() -> onnx.ModelProto:
    """audio float32 [1, n], sr int64 scalar; out = audio * sr (silero-vad's inputs)."""
    return _model(
        [
            helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["audio", "sr_f"], ["out"]),
        ],
        [
            helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, "n"]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "n"])],
    )


def _run(model: onnx.ModelProto, feed) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_npz_scalar_input_single_file(tmp_path, scalar_model):
    path = tmp_path / "one.npz"
    np.savez(path, audio=_x(1, 4), sr=np.int64(16000))
    (feed,) = load_npz_inputs(path, scalar_model)
    assert isinstance(feed["sr"], np.ndarray) and feed["sr"].shape == ()
    assert int(feed["sr"]) == 16000
    np.testing.assert_array_equal(_run(scalar_model, feed), _x(1, 4) * 16000)


def test_npz_scalar_input_stacked_and_in_a_folder(tmp_path, scalar_model):
    np.savez(tmp_path / "a.npz", audio=_x(2, 1, 4), sr=np.array([8000, 16000], np.int64))
    np.savez(tmp_path / "b.npz", audio=_x(1, 4), sr=np.array(16000, np.int32))  # cast
    feeds = load_npz_inputs(tmp_path, scalar_model)
    assert [int(feed["sr"]) for feed in feeds] == [8000, 16000, 16000]
    for feed in feeds:
        assert isinstance(feed["sr"], np.ndarray) and feed["sr"].dtype == np.int64
        _run(scalar_model, feed)
