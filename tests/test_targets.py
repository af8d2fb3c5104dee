"""Target discovery: the reduction axis of every layout, skip reasons, storage places, 2-D view.

Models are tiny and written inside the tests (ONNX text, or onnx.helper where subgraphs are
needed); every one passes onnx.checker, so the layouts tested are layouts onnxruntime runs.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from conftest import DEMO_SKIPS, DEMO_TARGETS, real_model
from onnx import TensorProto, helper, numpy_helper

from onnxprune.config import Pattern
from onnxprune.io import read_array
from onnxprune.targets import (
    Selection,
    SkipCause,
    SkippedTensor,
    WeightTarget,
    discover_targets,
)

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# min_size=1: the test models are tiny; the size rule has tests of its own
ALL = Selection(min_size=1)


def weights_like(shape, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Random bit patterns of `dtype` (NaNs and infinities included): round trips must be exact."""
    dtype = np.dtype(dtype)
    bits = np.dtype(f"u{dtype.itemsize}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, np.iinfo(bits).max, size=shape, dtype=bits, endpoint=True).view(dtype)


def normal(shape, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def build(graph_text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text; `weights` become initializers. Checked with shape inference."""
    model = onnx.parser.parse_model(HEADER + graph_text)
    for name, array in weights.items():
        model.graph.initializer.append(numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def discover(
    model: onnx.ModelProto, selection: Selection = ALL
) -> tuple[dict[str, WeightTarget], dict[str, SkippedTensor]]:
    targets, skipped = discover_targets(model, selection)
    by_name = {t.name: t for t in targets}
    skipped_by_name = {s.name: s for s in skipped}
    assert len(by_name) == len(targets), "target names must be unique"
    assert not set(by_name) & set(skipped_by_name), "a name is both target and skipped"
    return by_name, skipped_by_name


# --- the reduction axis of each layout ---------------------------------------------------------

# (id, graph text, weights, name of the weight, stored reduction axis, op_type, group)
LAYOUTS = [
    (
        "matmul_b",
        "g (float[2,8] x) => (float[2,16] y) { y = MatMul(x, W) }",
        {"W": (8, 16)},
        "W",
        0,
        "MatMul",
        1,
    ),
    (
        "matmul_b_batched",
        "g (float[3,2,8] x) => (float[3,2,16] y) { y = MatMul(x, W) }",
        {"W": (3, 8, 16)},
        "W",
        1,
        "MatMul",
        1,
    ),
    (
        "matmul_a",
        "g (float[8,2] x) => (float[16,2] y) { y = MatMul(W, x) }",
        {"W": (16, 8)},
        "W",
        1,
        "MatMul",
        1,
    ),
    (
        "matmul_a_batched",
        "g (float[3,8,2] x) => (float[3,16,2] y) { y = MatMul(W, x) }",
        {"W": (3, 16, 8)},
        "W",
        2,
        "MatMul",
        1,
    ),
    (
        "gemm_b",
        "g (float[2,8] x) => (float[2,16] y) { y = Gemm(x, W) }",
        {"W": (8, 16)},
        "W",
        0,
        "Gemm",
        1,
    ),
    (
        "gemm_b_transposed",
        "g (float[2,8] x) => (float[2,16] y) { y = Gemm<transB=1>(x, W) }",
        {"W": (16, 8)},
        "W",
        1,
        "Gemm",
        1,
    ),
    (
        "gemm_a",
        "g (float[8,2] x) => (float[16,2] y) { y = Gemm(W, x) }",
        {"W": (16, 8)},
        "W",
        1,
        "Gemm",
        1,
    ),
    (
        "gemm_a_transposed",
        "g (float[8,2] x) => (float[16,2] y) { y = Gemm<transA=1>(W, x) }",
        {"W": (8, 16)},
        "W",
        0,
        "Gemm",
        1,
    ),
    (
        "conv_grouped",
        "g (float[1,8,5,5] x) => (float[1,16,3,3] y) { y = Conv<group=2>(x, W) }",
        {"W": (16, 4, 3, 3)},
        "W",
        1,
        "Conv",
        2,
    ),
    (
        "conv_depthwise",
        "g (float[1,8,5,5] x) => (float[1,8,3,3] y) { y = Conv<group=8>(x, W) }",
        {"W": (8, 1, 3, 3)},
        "W",
        1,
        "Conv",
        8,
    ),
    (
        "conv1d",
        "g (float[1,8,10] x) => (float[1,16,8] y) { y = Conv(x, W) }",
        {"W": (16, 8, 3)},
        "W",
        1,
        "Conv",
        1,
    ),
    (
        "conv_transpose",
        "g (float[1,8,5,5] x) => (float[1,4,7,7] y) { y = ConvTranspose(x, W) }",
        {"W": (8, 4, 3, 3)},
        "W",
        0,
        "ConvTranspose",
        1,
    ),
    (
        "conv_transpose_grouped",
        "g (float[1,8,5,5] x) => (float[1,4,7,7] y) { y = ConvTranspose<group=2>(x, W) }",
        {"W": (8, 2, 3, 3)},
        "W",
        0,
        "ConvTranspose",
        2,
    ),
    (
        "lstm_w",
        "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = LSTM<hidden_size=4>(x, W, R, B) }",
        {"W": (1, 16, 8), "R": (1, 16, 4), "B": (1, 32)},
        "W",
        2,
        "LSTM",
        1,
    ),
    (
        "lstm_r",
        "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = LSTM<hidden_size=4>(x, W, R, B) }",
        {"W": (1, 16, 8), "R": (1, 16, 4), "B": (1, 32)},
        "R",
        2,
        "LSTM",
        1,
    ),
    (
        "gru_w",
        "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = GRU<hidden_size=4>(x, W, R, B) }",
        {"W": (1, 12, 8), "R": (1, 12, 4), "B": (1, 24)},
        "W",
        2,
        "GRU",
        1,
    ),
    (
        "gru_r",
        "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = GRU<hidden_size=4>(x, W, R, B) }",
        {"W": (1, 12, 8), "R": (1, 12, 4), "B": (1, 24)},
        "R",
        2,
        "GRU",
        1,
    ),
    (
        "rnn_w",
        "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = RNN<hidden_size=4>(x, W, R, B) }",
        {"W": (1, 4, 8), "R": (1, 4, 4), "B": (1, 8)},
        "W",
        2,
        "RNN",
        1,
    ),
    (
        "rnn_r",
        "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = RNN<hidden_size=4>(x, W, R, B) }",
        {"W": (1, 4, 8), "R": (1, 4, 4), "B": (1, 8)},
        "R",
        2,
        "RNN",
        1,
    ),
    # stored [N, K], transposed to [K, N] for MatMul B: K is stored axis 1
    (
        "transpose",
        "g (float[2,8] x) => (float[2,16] y) { t = Transpose<perm=[1,0]>(W)\n y = MatMul(x, t) }",
        {"W": (16, 8)},
        "W",
        1,
        "MatMul",
        1,
    ),
    # stored [8, 3, 16] -> [3, 8, 16]: MatMul B axis 1 is stored axis perm[1] = 0
    (
        "transpose_3d",
        "g (float[3,2,8] x) => (float[3,2,16] y) "
        "{ t = Transpose<perm=[1,0,2]>(W)\n y = MatMul(x, t) }",
        {"W": (8, 3, 16)},
        "W",
        0,
        "MatMul",
        1,
    ),
    # stored [16, 8, 3] -> [3, 16, 8] -> [3, 8, 16]: K = 8 is stored axis 1
    (
        "two_transposes",
        "g (float[3,2,8] x) => (float[3,2,16] y) "
        "{ a = Transpose<perm=[2,0,1]>(W)\n b = Transpose<perm=[0,2,1]>(a)\n y = MatMul(x, b) }",
        {"W": (16, 8, 3)},
        "W",
        1,
        "MatMul",
        1,
    ),
    # no perm: reverse the axes
    (
        "transpose_no_perm",
        "g (float[2,8] x) => (float[2,16] y) { t = Transpose(W)\n y = MatMul(x, t) }",
        {"W": (16, 8)},
        "W",
        1,
        "MatMul",
        1,
    ),
    # stored [6, 4, 2] -> [2, 4, 6], MatMul input A reduces its last axis: stored axis 0
    (
        "transpose_no_perm_3d",
        "g (float[2,6,3] x) => (float[2,4,3] y) { t = Transpose(W)\n y = MatMul(t, x) }",
        {"W": (6, 4, 2)},
        "W",
        0,
        "MatMul",
        1,
    ),
    (
        "cast",
        "g (float[2,8] x) => (float[2,16] y) { c = Cast<to=1>(W)\n y = MatMul(x, c) }",
        {"W": (8, 16, "float16")},
        "W",
        0,
        "MatMul",
        1,
    ),
    (
        "identity",
        "g (float[2,8] x) => (float[2,16] y) { i = Identity(W)\n y = MatMul(x, i) }",
        {"W": (8, 16)},
        "W",
        0,
        "MatMul",
        1,
    ),
    (
        "cast_transpose_identity",
        "g (float[2,8] x) => (float[2,16] y) "
        "{ c = Cast<to=1>(W)\n t = Transpose<perm=[1,0]>(c)\n i = Identity(t)\n"
        " y = Gemm<transB=1>(x, i) }",
        {"W": (8, 16, "double")},
        "W",
        0,
        "Gemm",
        1,
    ),
]


def _layout_model(graph_text: str, weights: dict) -> onnx.ModelProto:
    arrays = {}
    for seed, (name, spec) in enumerate(weights.items()):
        dtype = spec[-1] if isinstance(spec[-1], str) else "float32"
        shape = spec[:-1] if isinstance(spec[-1], str) else spec
        arrays[name] = normal(shape, dtype, seed)
    return build(graph_text, **arrays)


@pytest.mark.parametrize(
    ("graph_text", "weights", "name", "axis", "op_type", "group"),
    [case[1:] for case in LAYOUTS],
    ids=[case[0] for case in LAYOUTS],
)
def test_reduction_axis(graph_text, weights, name, axis, op_type, group) -> None:
    model = _layout_model(graph_text, weights)
    targets, _ = discover(model)
    target = targets[name]
    assert target.reduction_axis == axis
    assert target.op_type == op_type
    assert target.group == group
    assert target.source == "initializer"
    assert target.shape == tuple(model.graph.initializer[list(weights).index(name)].dims)
    assert [c.op_type for c in target.consumers] == [op_type]


@pytest.mark.parametrize(
    ("graph_text", "weights", "name", "axis", "op_type", "group"),
    [case[1:] for case in LAYOUTS],
    ids=[case[0] for case in LAYOUTS],
)
def test_matrix_round_trip_is_bit_identical(
    graph_text, weights, name, axis, op_type, group
) -> None:
    targets, _ = discover(_layout_model(graph_text, weights))
    target = targets[name]
    dtype = np.dtype(target.dtype)
    array = weights_like(target.shape, dtype, seed=7)
    matrix = target.to_matrix(array)
    assert matrix.shape == (array.size // target.shape[axis], target.shape[axis])
    back = target.from_matrix(matrix)
    assert back.dtype == dtype and back.shape == array.shape
    assert back.flags.c_contiguous
    assert back.tobytes() == array.tobytes()
    # column j holds exactly the weights at index j of the reduction axis
    for j in (0, target.shape[axis] - 1):
        assert sorted(matrix[:, j].view(f"u{dtype.itemsize}")) == sorted(
            np.take(array, j, axis=axis).ravel().view(f"u{dtype.itemsize}")
        )


def test_conv_matrix_has_input_channel_columns() -> None:
    model = build(
        "g (float[1,6,7,7] x) => (float[1,10,5,5] y) { y = Conv(x, W) }", W=normal((10, 6, 3, 3))
    )
    target = discover(model)[0]["W"]
    weights = read_array(model.graph.initializer[0], Path("."))
    matrix = target.to_matrix(weights)
    assert matrix.shape == (10 * 3 * 3, 6)
    # row (o, kh, kw) lists the input channels of output o at that tap
    np.testing.assert_array_equal(matrix[(4 * 3 + 2) * 3 + 1], weights[4, :, 2, 1])


def test_zero_size_tensor_round_trip() -> None:
    model = build(
        "g (float[2,0] x) => (float[2,4] y) { y = MatMul(x, W) }", W=np.zeros((0, 4), np.float32)
    )
    target = discover(model, Selection(min_size=0))[0]["W"]
    matrix = target.to_matrix(np.zeros((0, 4), np.float32))
    assert matrix.shape == (4, 0)
    assert target.from_matrix(matrix).shape == (0, 4)


# --- biases and other non-weights next to the weights above ------------------------------------


@pytest.mark.parametrize(
    ("graph_text", "weights", "bias"),
    [
        (
            "g (float[2,8] x) => (float[2,16] y) { y = Gemm(x, W, C) }",
            {"W": (8, 16), "C": (16,)},
            "C",
        ),
        (
            "g (float[1,8,5,5] x) => (float[1,16,3,3] y) { y = Conv(x, W, C) }",
            {"W": (16, 8, 3, 3), "C": (16,)},
            "C",
        ),
        (
            "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = LSTM<hidden_size=4>(x, W, R, B) }",
            {"W": (1, 16, 8), "R": (1, 16, 4), "B": (1, 32)},
            "B",
        ),
        (
            "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = GRU<hidden_size=4>(x, W, R, B) }",
            {"W": (1, 12, 8), "R": (1, 12, 4), "B": (1, 24)},
            "B",
        ),
        (
            "g (float[5,1,8] x) => (float[5,1,1,4] y) { y = RNN<hidden_size=4>(x, W, R, B) }",
            {"W": (1, 4, 8), "R": (1, 4, 4), "B": (1, 8)},
            "B",
        ),
        (
            "g (float[2,8] x) => (float[2,16] y) { h = MatMul(x, W)\n y = Add(h, C) }",
            {"W": (8, 16), "C": (16,)},
            "C",
        ),
    ],
    ids=["gemm_c", "conv_bias", "lstm_b", "gru_b", "rnn_b", "add"],
)
def test_biases_are_skipped(graph_text, weights, bias) -> None:
    targets, skipped = discover(_layout_model(graph_text, weights))
    assert skipped[bias].cause is SkipCause.BIAS
    assert "W" in targets


def test_depthwise_conv_is_unstructured_only() -> None:
    model = build(
        "g (float[1,64,5,5] x) => (float[1,64,3,3] y) { y = Conv<group=64>(x, W) }",
        W=normal((64, 1, 3, 3)),
    )
    targets, _ = discover(model, Selection(min_size=576))
    assert targets["W"].reduction_axis == 1 and targets["W"].reduction_length == 1
    _, skipped = discover(model, Selection(min_size=577))
    assert skipped["W"].cause is SkipCause.BELOW_MIN_SIZE
    assert skipped["W"].detail == {"numel": 576, "min_size": 577}
    _, skipped = discover(model, Selection(min_size=1, pattern=Pattern(2, 4)))
    assert skipped["W"].cause is SkipCause.AXIS_NOT_MULTIPLE
    assert skipped["W"].detail["length"] == 1 and skipped["W"].detail["pattern"] == Pattern(2, 4)


def test_nm_needs_whole_groups_along_conv_transpose_input_channels() -> None:
    # ConvTranspose [Cin=8, Cout/g, k, k] with group=2: 4 input channels per group
    model = build(
        "g (float[1,8,5,5] x) => (float[1,4,7,7] y) { y = ConvTranspose<group=2>(x, W) }",
        W=normal((8, 2, 3, 3)),
    )
    targets, _ = discover(model, Selection(min_size=1, pattern=Pattern(2, 4)))
    assert targets["W"].reduction_axis == 0
    _, skipped = discover(model, Selection(min_size=1, pattern=Pattern(4, 8)))
    assert "W" in skipped
    assert skipped["W"].cause is SkipCause.AXIS_NOT_MULTIPLE
    assert skipped["W"].detail == {"length": 8, "per_group": 4, "group": 2,
                                   "pattern": Pattern(4, 8)}


def test_nm_axis_length_check_uses_the_reduction_axis() -> None:
    # [K=12, N=16]: 16 is a multiple of 8 but K, the reduction axis, is not
    model = build("g (float[2,12] x) => (float[2,16] y) { y = MatMul(x, W) }", W=normal((12, 16)))
    targets, _ = discover(model, Selection(min_size=1, pattern=Pattern(2, 4)))
    assert "W" in targets
    _, skipped = discover(model, Selection(min_size=1, pattern=Pattern(4, 8)))
    assert skipped["W"].cause is SkipCause.AXIS_NOT_MULTIPLE
    assert skipped["W"].detail["length"] == 12


# --- shared weights ----------------------------------------------------------------------------


def test_shared_weight_with_agreeing_consumers_is_one_target() -> None:
    model = build(
        "g (float[2,8] x) => (float[2,16] y, float[2,16] z) { y = MatMul(x, W)\n z = Gemm(x, W) }",
        W=normal((8, 16)),
    )
    targets, _ = discover(model)
    assert list(targets) == ["W"]
    assert targets["W"].reduction_axis == 0
    assert sorted((c.op_type, c.slot) for c in targets["W"].consumers) == [
        ("Gemm", 1),
        ("MatMul", 1),
    ]


def test_shared_weight_with_disagreeing_consumers_is_skipped() -> None:
    # square W: MatMul reads it as [K, N] (axis 0), Gemm transB=1 as [N, K] (axis 1)
    model = build(
        "g (float[2,8] x) => (float[2,8] y, float[2,8] z) "
        "{ y = MatMul(x, W)\n z = Gemm<transB=1>(x, W) }",
        W=normal((8, 8)),
    )
    targets, skipped = discover(model)
    assert not targets
    assert skipped["W"].cause is SkipCause.AXIS_DISAGREES
    assert skipped["W"].detail == {"axes": [0, 1]}


def test_transpose_reconciles_two_consumers() -> None:
    # the same [8, 8] weight, once straight and once through Transpose into Gemm transB=1
    model = build(
        "g (float[2,8] x) => (float[2,8] y, float[2,8] z) "
        "{ y = MatMul(x, W)\n t = Transpose(W)\n z = Gemm<transB=1>(x, t) }",
        W=normal((8, 8)),
    )
    targets, _ = discover(model)
    assert targets["W"].reduction_axis == 0
    assert len(targets["W"].consumers) == 2


# --- embeddings and selection ------------------------------------------------------------------

EMBEDDING = "g (int64[2,3] ids) => (float[2,3,16] y) { e = Gather(embed, ids)\n y = MatMul(e, fc) }"


def _embedding_model() -> onnx.ModelProto:
    return build(EMBEDDING, embed=normal((32, 8)), fc=normal((8, 16), seed=1))


def test_gather_embedding_is_skipped_unless_included() -> None:
    targets, skipped = discover(_embedding_model())
    assert list(targets) == ["fc"]
    assert skipped["embed"].cause is SkipCause.EMBEDDING


def test_include_selects_the_embedding_and_restricts_the_rest() -> None:
    targets, skipped = discover(_embedding_model(), Selection(include=("^embed$",), min_size=1))
    assert list(targets) == ["embed"]
    assert targets["embed"].reduction_axis == 1
    assert targets["embed"].op_type == "Gather"
    assert skipped["fc"].cause is SkipCause.NOT_INCLUDED


def test_exclude_removes_a_target() -> None:
    targets, skipped = discover(_embedding_model(), Selection(exclude=("^fc",), min_size=1))
    assert not targets
    assert skipped["fc"].cause is SkipCause.EXCLUDED
    assert skipped["embed"].cause is SkipCause.EMBEDDING
    # exclude beats include
    targets, skipped = discover(
        _embedding_model(), Selection(include=(".",), exclude=("^fc",), min_size=1)
    )
    assert list(targets) == ["embed"]
    assert skipped["fc"].cause is SkipCause.EXCLUDED


def test_tied_embedding_and_lm_head_agree() -> None:
    # the table [V, D] is read by Gather (axis D) and, transposed, as MatMul B [D, V]
    model = build(
        "g (int64[2,3] ids) => (float[2,3,32] y) "
        "{ e = Gather(embed, ids)\n t = Transpose(embed)\n y = MatMul(e, t) }",
        embed=normal((32, 8)),
    )
    _, skipped = discover(model)
    assert skipped["embed"].cause is SkipCause.EMBEDDING
    targets, _ = discover(model, Selection(include=("embed",), min_size=1))
    assert targets["embed"].reduction_axis == 1
    assert len(targets["embed"].consumers) == 2


# --- what is not a weight ----------------------------------------------------------------------


def _mixed_model() -> onnx.ModelProto:
    return build(
        "g (float[2,8] x) => (float[2,4,4] y, float[2,16] z, float[8,16] W2, float[8,16] W3i,"
        " float[3] G) {\n"
        "  h = MatMul(x, W)\n"
        "  hb = Add(h, b)\n"
        "  n = LayerNormalization(hb, scale, shift)\n"
        "  y = Reshape(n, shape)\n"
        "  s = MatMul(x, small)\n"
        "  z2 = MatMul(x, W2)\n"
        "  W3i = Identity(W3)\n"
        "  z3 = MatMul(x, W3)\n"
        "  z4 = Add(s, z2)\n"
        "  z = Add(z4, z3)\n"
        "  G = Identity(Gonly)\n"
        "}",
        W=normal((8, 16)),
        b=normal((16,)),
        scale=normal((16,)),
        shift=normal((16,)),
        shape=np.array([2, 4, 4], np.int64),
        small=normal((8, 16)),
        W2=normal((8, 16)),
        W3=normal((8, 16)),
        unused=normal((8, 16)),
        Gonly=normal((3,)),
    )


def test_skip_reasons() -> None:
    targets, skipped = discover(_mixed_model(), Selection(min_size=100))
    assert set(targets) == {"W", "small"}
    causes = {name: s.cause for name, s in skipped.items()}
    assert causes == {
        "b": SkipCause.BIAS,
        "scale": SkipCause.NORMALIZATION,
        "shift": SkipCause.NORMALIZATION,
        "shape": SkipCause.INTEGER,
        "W2": SkipCause.ALSO_GRAPH_OUTPUT,
        "W3": SkipCause.ALSO_GRAPH_OUTPUT,
        "unused": SkipCause.UNUSED,
        "Gonly": SkipCause.GRAPH_OUTPUT,
    }
    # the words reports show, derived from the causes
    assert {name: s.reason for name, s in skipped.items()} == {
        "b": "bias",
        "scale": "normalization parameter",
        "shift": "normalization parameter",
        "shape": "integer tensor",
        "W2": "also a graph output",
        "W3": "also a graph output",
        "unused": "unused",
        "Gonly": "graph output",
    }
    assert skipped["shape"].dtype == "int64"
    assert skipped["b"].shape == (16,) and skipped["b"].dtype == "float32"


def test_below_min_size() -> None:
    _, skipped = discover(_mixed_model(), Selection(min_size=129))
    assert skipped["W"].cause is SkipCause.BELOW_MIN_SIZE
    assert skipped["W"].detail == {"numel": 128, "min_size": 129}
    targets, _ = discover(_mixed_model(), Selection(min_size=128))
    assert "W" in targets


def test_batch_normalization_parameters_are_skipped() -> None:
    model = build(
        "g (float[1,8,5,5] x) => (float[1,16,3,3] y) "
        "{ c = Conv(x, W)\n y = BatchNormalization(c, s, b, m, v) }",
        W=normal((16, 8, 3, 3)),
        s=normal((16,)),
        b=normal((16,)),
        m=normal((16,)),
        v=np.ones(16, np.float32),
    )
    targets, skipped = discover(model)
    assert list(targets) == ["W"]
    assert {skipped[n].cause for n in "sbmv"} == {SkipCause.NORMALIZATION}


def test_unknown_consumer_is_named_in_the_reason() -> None:
    model = build("g (float[8,16] x) => (float[8,16] y) { y = Mul(x, W) }", W=normal((8, 16)))
    _, skipped = discover(model)
    assert skipped["W"].cause is SkipCause.NOT_WEIGHT_INPUT
    assert skipped["W"].detail == {"op": "Mul"}


@pytest.mark.parametrize(
    ("type_text", "dtype"),
    [
        ("float", "float32"),
        ("float16", "float16"),
        ("bfloat16", "bfloat16"),
        ("double", "float64"),
    ],
)
def test_float_dtypes_are_targets(type_text: str, dtype: str) -> None:
    array = normal((8, 16)).astype(np.dtype(dtype))
    model = build(
        f"g ({type_text}[2,8] x) => ({type_text}[2,16] y) {{ y = MatMul(x, W) }}", W=array
    )
    target = discover(model)[0]["W"]
    assert target.dtype == dtype
    stored = read_array(target.tensor, Path("."))
    assert stored.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(stored, array)
    bits = weights_like(target.shape, np.dtype(dtype), seed=3)
    assert target.from_matrix(target.to_matrix(bits)).tobytes() == bits.tobytes()


# --- where a weight is stored ------------------------------------------------------------------

vi = helper.make_tensor_value_info
F = TensorProto.FLOAT


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(array, name), name=f"const_{name}"
    )


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "main", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_constant_node_weight() -> None:
    model = _model(
        [_const("W", normal((8, 16))), helper.make_node("MatMul", ["x", "W"], ["y"])],
        [vi("x", F, [2, 8])],
        [vi("y", F, [2, 16])],
    )
    target = discover(model)[0]["W"]
    assert target.source == "constant_node"
    assert target.reduction_axis == 0
    stored = model.graph.node[0].attribute[0].t
    assert target.tensor.SerializeToString() == stored.SerializeToString()
    values = read_array(target.tensor, Path("."))
    np.testing.assert_array_equal(values, numpy_helper.to_array(stored))
    assert target.from_matrix(target.to_matrix(values)).tobytes() == values.tobytes()


def _if_model(then_nodes, else_nodes, then_init=(), else_init=(), main_init=(), main_nodes=()):
    then_g = helper.make_graph(then_nodes, "then", [], [vi("yt", F, [2, 16])], list(then_init))
    else_g = helper.make_graph(else_nodes, "else", [], [vi("ye", F, [2, 16])], list(else_init))
    node = helper.make_node(
        "If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch"
    )
    return _model(
        [*main_nodes, node],
        [vi("x", F, [2, 8]), vi("c", TensorProto.BOOL, [])],
        [vi("y", F, [2, 16])],
        main_init,
    )


def test_weights_inside_if_branches() -> None:
    model = _if_model(
        [_const("Wt", normal((8, 16))), helper.make_node("MatMul", ["x", "Wt"], ["yt"])],
        [helper.make_node("Gemm", ["x", "We"], ["ye"], transB=1)],
        else_init=[numpy_helper.from_array(normal((16, 8)), "We")],
    )
    targets, _ = discover(model)
    assert targets["Wt"].source == "subgraph:branch"
    assert targets["Wt"].reduction_axis == 0
    assert targets["We"].source == "subgraph:branch"
    assert targets["We"].reduction_axis == 1


def test_outer_scope_initializer_takes_its_axis_from_the_inner_consumer() -> None:
    # W [16, 8] in the main graph, used only inside the branches: Gemm transB=1 in one,
    # Transpose + MatMul in the other; both reduce stored axis 1 (MatMul alone would say 0)
    model = _if_model(
        [helper.make_node("Gemm", ["x", "W"], ["yt"], transB=1)],
        [
            helper.make_node("Transpose", ["W"], ["Wt"]),
            helper.make_node("MatMul", ["x", "Wt"], ["ye"]),
        ],
        main_init=[numpy_helper.from_array(normal((16, 8)), "W")],
    )
    targets, _ = discover(model)
    assert targets["W"].source == "initializer"
    assert targets["W"].reduction_axis == 1
    assert sorted(c.op_type for c in targets["W"].consumers) == ["Gemm", "MatMul"]


def test_outer_scope_transpose_output_used_inside_a_branch() -> None:
    model = _if_model(
        [helper.make_node("MatMul", ["x", "Wt"], ["yt"])],
        [helper.make_node("MatMul", ["x", "Wt"], ["ye"])],
        main_init=[numpy_helper.from_array(normal((16, 8)), "W")],
        main_nodes=[helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0])],
    )
    targets, _ = discover(model)
    assert targets["W"].reduction_axis == 1
    assert len(targets["W"].consumers) == 2


def test_outer_scope_disagreement_is_found_across_scopes() -> None:
    model = _if_model(
        [helper.make_node("MatMul", ["x", "W"], ["yt"])],
        [helper.make_node("Gemm", ["x", "W"], ["ye"], transB=1)],
        main_init=[numpy_helper.from_array(normal((8, 8)), "W")],
    )
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    for branch in model.graph.node[0].attribute:
        branch.g.output[0].type.tensor_type.shape.dim[1].dim_value = 8
    _, skipped = discover(model)
    assert skipped["W"].cause is SkipCause.AXIS_DISAGREES


def test_branch_that_returns_an_outer_weight_makes_it_an_output() -> None:
    model = _if_model(
        [helper.make_node("MatMul", ["x", "W"], ["yt"])],
        [helper.make_node("Identity", ["W2"], ["ye"])],
        main_init=[
            numpy_helper.from_array(normal((8, 16)), "W"),
            numpy_helper.from_array(normal((2, 16)), "W2"),
        ],
    )
    targets, skipped = discover(model)
    assert "W" in targets
    assert skipped["W2"].cause is SkipCause.GRAPH_OUTPUT


def _loop_model() -> onnx.ModelProto:
    """Loop body -> If -> (Constant weight, initializer weight): two levels of nesting."""
    inner_then = helper.make_graph(
        [_const("Wc", normal((8, 16))), helper.make_node("MatMul", ["x", "Wc"], ["it"])],
        "inner_then",
        [],
        [vi("it", F, [2, 16])],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Gemm", ["x", "Wi"], ["ie"], transB=1)],
        "inner_else",
        [],
        [vi("ie", F, [2, 16])],
        [numpy_helper.from_array(normal((16, 8), seed=2), "Wi")],
    )
    body = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["cond_in"],
                ["r"],
                then_branch=inner_then,
                else_branch=inner_else,
                name="inner_if",
            ),
            helper.make_node("MatMul", ["x", "Wb"], ["rb"], name="body_mm"),
            helper.make_node("Add", ["r", "rb"], ["out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, [])],
        [vi("cond_out", TensorProto.BOOL, []), vi("out", F, [2, 16])],
        [numpy_helper.from_array(normal((8, 16), seed=3), "Wb")],
    )
    loop = helper.make_node("Loop", ["n", "c"], ["y"], body=body, name="loop")
    return _model(
        [loop],
        [vi("x", F, [2, 8]), vi("c", TensorProto.BOOL, []), vi("n", TensorProto.INT64, [])],
        [vi("y", F, [3, 2, 16])],
    )


def test_weights_nested_two_levels() -> None:
    targets, _ = discover(_loop_model())
    assert {name: (t.source, t.reduction_axis) for name, t in targets.items()} == {
        "Wb": ("subgraph:loop", 0),
        "Wc": ("subgraph:inner_if", 0),
        "Wi": ("subgraph:inner_if", 1),
    }
    # the subgraph as data too, for code that needs it (compact storage names its nodes)
    assert {name: t.scope_label for name, t in targets.items()} == {
        "Wb": "loop", "Wc": "inner_if", "Wi": "inner_if"}
    main_targets, _ = discover(_mixed_model())
    assert {t.scope_label for t in main_targets.values()} == {""}


def _same_name_model() -> onnx.ModelProto:
    """`W` in the main graph and again in both branches of an If (legal: sibling scopes)."""
    return _if_model(
        [helper.make_node("MatMul", ["x", "W"], ["yt"])],
        [helper.make_node("Gemm", ["x", "W"], ["ye"], transB=1)],
        then_init=[numpy_helper.from_array(normal((8, 16), seed=1), "W")],
        else_init=[numpy_helper.from_array(normal((16, 8), seed=2), "W")],
        main_init=[numpy_helper.from_array(normal((8, 16), seed=3), "W")],
        main_nodes=[helper.make_node("MatMul", ["x", "W"], ["unused_y"])],
    )


def test_names_are_unique_when_branches_reuse_a_name() -> None:
    targets, _ = discover(_same_name_model())
    assert len(targets) == 3
    assert targets["W"].source == "initializer"
    branch_names = sorted(set(targets) - {"W"})
    assert all(name.endswith("/W") and "branch" in name for name in branch_names)
    axes = {targets[name].reduction_axis for name in branch_names}
    assert axes == {0, 1}  # each name points at its own tensor


def test_names_do_not_depend_on_the_selection() -> None:
    all_names = set(discover(_same_name_model())[0])
    targets, skipped = discover(_same_name_model(), Selection(exclude=("^W$",), min_size=1))
    assert set(skipped) == {"W"}
    assert set(targets) == all_names - {"W"}
    branch = sorted(all_names - {"W"})[0]
    targets, skipped = discover(_same_name_model(), Selection(include=(f"^{branch}$",), min_size=1))
    assert list(targets) == [branch]


def test_round_trip_of_stored_values_everywhere() -> None:
    """to_matrix/from_matrix on the real stored values of every kind of storage place."""
    for model in (_loop_model(), _same_name_model(), _mixed_model(), _embedding_model()):
        targets, _ = discover_targets(model, Selection(min_size=1, include=(".",)))
        assert targets
        for target in targets:
            values = read_array(target.tensor, Path("."))
            back = target.from_matrix(target.to_matrix(values))
            assert back.tobytes() == values.tobytes()


# --- demo and real models ----------------------------------------------------------------------


def _conv_input_channels(model: onnx.ModelProto) -> dict[str, list[tuple[int, int]]]:
    """weight name -> [(channels of the Conv's data input, group)] where shapes are known."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found: dict[str, list[tuple[int, int]]] = {}

    def walk(graph: onnx.GraphProto) -> None:
        shapes = {
            v.name: v.type.tensor_type.shape
            for v in [*graph.value_info, *graph.input, *graph.output]
        }
        for node in graph.node:
            if node.op_type == "Conv" and len(node.input) > 1:
                shape = shapes.get(node.input[0])
                if shape is not None and len(shape.dim) > 1 and shape.dim[1].HasField("dim_value"):
                    group = next((a.i for a in node.attribute if a.name == "group"), 1)
                    found.setdefault(node.input[1], []).append((shape.dim[1].dim_value, group))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(inferred.graph)
    return found


def _check_conv_axes(model: onnx.ModelProto, targets: list[WeightTarget]) -> int:
    channels = _conv_input_channels(model)
    checked = 0
    for target in targets:
        if target.op_type != "Conv":
            continue
        assert target.reduction_axis == 1
        for in_channels, group in channels.get(target.name, []):
            assert target.reduction_length * group == in_channels, target.name
            assert target.group == group
            checked += 1
    return checked


@pytest.mark.parametrize("model_name", sorted(DEMO_TARGETS))
def test_demo_models(models_dir: Path, model_name: str) -> None:
    model = onnx.load(str(models_dir / model_name))
    targets, skipped = discover_targets(model)
    found = {t.name: t for t in targets}
    assert {name: found[name].reduction_axis for name in DEMO_TARGETS[model_name]} == (
        DEMO_TARGETS[model_name]
    )
    skipped_names = {s.name for s in skipped}
    assert set(DEMO_SKIPS[model_name]) <= skipped_names
    for target in targets:
        expected = "constant_node" if target.name == "conv4.weight" else "initializer"
        assert target.source == expected, target.name
        values = read_array(target.tensor, models_dir)
        assert target.from_matrix(target.to_matrix(values)).tobytes() == values.tobytes()
    if model_name == "cnn.onnx":
        assert _check_conv_axes(model, targets) == 2
        assert found["conv2.weight"].group == 2
    if model_name == "transformer.onnx":
        cause = next(s.cause for s in skipped if s.name == "embed_tokens.weight")
        assert cause is SkipCause.EMBEDDING


def test_demo_cnn_depthwise_with_nm(models_dir: Path) -> None:
    model = onnx.load(str(models_dir / "cnn.onnx"))
    targets, skipped = discover_targets(model, Selection(min_size=1, pattern=Pattern(2, 4)))
    causes = {s.name: s.cause for s in skipped}
    assert causes["conv3.weight"] is SkipCause.AXIS_NOT_MULTIPLE
    assert "conv1.weight" not in {t.name for t in targets}  # 3 input channels
    targets, _ = discover_targets(model, Selection(min_size=1))
    assert {"conv1.weight", "conv3.weight"} <= {t.name for t in targets}


def test_silero_vad_weights_in_if_subgraphs() -> None:
    model = onnx.load(str(real_model("silero_vad")))
    targets, skipped = discover_targets(model)
    assert len(targets) >= 4
    assert all(t.source.startswith("subgraph:") for t in targets)
    assert {t.op_type for t in targets} == {"Conv"}
    assert _check_conv_axes(model, targets) >= 4
    for target in targets:
        values = read_array(target.tensor, Path("."))
        assert target.from_matrix(target.to_matrix(values)).tobytes() == values.tobytes()
    assert len({t.name for t in targets} | {s.name for s in skipped}) == (
        len(targets) + len(skipped)
    )


@pytest.mark.parametrize("name", ["ppocr_cls", "ppocr_rec"])
def test_paddle_weights_in_constant_nodes(name: str) -> None:
    model = onnx.load(str(real_model(name)))
    targets, _ = discover_targets(model)
    assert len(targets) >= 5
    assert {t.source for t in targets} == {"constant_node"}
    assert _check_conv_axes(model, targets) >= 5
    for target in targets:
        if target.op_type == "MatMul":
            assert target.reduction_axis == 0
        values = read_array(target.tensor, Path("."))
        assert target.from_matrix(target.to_matrix(values)).tobytes() == values.tobytes()
