"""Internal errors found by `python tools/fuzz.py --structured --cases 300 --seed 11` (and
`--cases 1500 --seed 12`) once its structured mode drew the newer options (calibrated
channel scores, `--update least-squares`, `--latency-budget`), each reduced to a small
model: a structured prune or
`inspect --structured` must end in exit 0 or a one-line exit-2 refusal (exit 3 is an
internal error), leaving no output behind on a refusal.

- a sparse initializer read by a node (onnxruntime runs the model; the full checker does
  not pass it): `--method magnitude` refuses cleanly ("fails the ONNX checker"), but every
  calibrated path (flap, obs, wanda, `--update least-squares`) ends in
  `KeyError` at calib/capture.py (`_session`: the sparse initializer is neither static nor
  a graph input, so a calibration stage looks for it among the captured values);
- the same with a sparse index out of range and `--latency-budget`: onnxruntime's `Fail`
  from `create_session` (structured/latency.py `_session`) escapes instead of a refusal;
- a grouped Conv, or a Gemm with transB, whose weight has rank 1: `IndexError` in
  structured/rules_layers.py (`conv`, `gemm`), in `inspect --structured` as well;
- `--latency-budget` on a valid model that onnxruntime cannot run at the default synthetic
  shapes (a reflect Pad longer than the default dynamic length; found on silero-vad's
  models, the peer suite's real models, with the new options drawn by hand): onnxruntime's
  `InvalidArgument` from `session.run` in structured/latency.py (`_run_with_outputs`)
  escapes; `--sparsity` on the same model works, and so does the budget with `--dim`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _mlp_with_sparse_addend(bad_index: bool = False) -> onnx.ModelProto:
    """x + shift -> MatMul w1 (16 hidden units) -> Relu -> MatMul w2, `shift` a sparse
    initializer (one index past its 8 values with `bad_index`)."""
    rng = np.random.default_rng(0)
    values = numpy_helper.from_array(np.array([1.0, -2.0, 0.5], np.float32), "shift")
    indices = numpy_helper.from_array(np.array([1, 4, 9 if bad_index else 6], np.int64),
                                      "shift_indices")
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "shift"], ["h0"]),
         helper.make_node("MatMul", ["h0", "w1"], ["h1"]),
         helper.make_node("Relu", ["h1"], ["h2"]),
         helper.make_node("MatMul", ["h2", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F, [2, 8])],
        [helper.make_tensor_value_info("y", F, [2, 4])], [w1, w2],
        sparse_initializer=[helper.make_sparse_tensor(values, indices, [8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _grouped_conv_with_rank1_weight() -> onnx.ModelProto:
    """A 1x1 Conv, then a Conv with group 2 whose weight is stored 1-D ([8])."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"]),
         helper.make_node("Conv", ["h", "w2"], ["y"], group=2)], "g",
        [helper.make_tensor_value_info("x", F, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", F, None)], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_with_rank1_weight() -> onnx.ModelProto:
    """MatMul (16 units), then a Gemm (transB) whose B is stored 1-D ([16])."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Gemm", ["h", "w2"], ["y"], transB=1)], "g",
        [helper.make_tensor_value_info("x", F, [2, 8])],
        [helper.make_tensor_value_info("y", F, None)], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reflect_pad_then_convs() -> onnx.ModelProto:
    """x [1, 4, t] -> Pad (reflect, 32 each side of t) -> Conv (32 units) -> Relu -> Conv:
    runs for t > 32 only."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, 4, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 32, 1)).astype(np.float32), "w2")
    pads = numpy_helper.from_array(np.array([0, 0, 32, 0, 0, 32], np.int64), "pads")
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
         helper.make_node("Conv", ["p", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", F, [1, 4, "t"])],
        [helper.make_tensor_value_info("y", F, [1, 4, None])], [w1, w2, pads])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _ends_cleanly(capsys, argv: list[str], out_dir: Path | None = None) -> None:
    from onnxprune.cli import main

    code = main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("onnxprune:")]
    assert code in (0, 2), (code, errors)
    if code == 2:
        assert len(errors) == 1 and errors[0].startswith("onnxprune: error: "), errors
        if out_dir is not None:
            assert not list(out_dir.iterdir())


def _saved(tmp_path: Path, model: onnx.ModelProto) -> tuple[Path, Path]:
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return path, out_dir


@pytest.mark.parametrize("options", [
    ["--method", "flap"], ["--method", "obs"], ["--method", "wanda"],
    ["--update", "least-squares"], ["--method", "flap", "--pattern", "2:4"],
], ids=["flap", "obs", "wanda", "least-squares", "flap-then-2:4"])
def test_calibrated_structured_prune_of_a_model_with_a_sparse_initializer(
        tmp_path: Path, capsys, options) -> None:
    """Was: exit 3, KeyError: 'shift' at calib/capture.py:243 (`_session`); `--method
    magnitude` on the same model refuses in one line (the input fails the checker)."""
    path, out_dir = _saved(tmp_path, _mlp_with_sparse_addend())
    _ends_cleanly(capsys, ["prune", str(path), "-o", str(out_dir / "out.onnx"),
                           "--structure", "channels", "--min-size", "0", *options, "-q"],
                  out_dir)


def test_latency_budget_on_a_sparse_index_out_of_range(tmp_path: Path, capsys) -> None:
    """Was: exit 3, onnxruntime's Fail ("Sparse tensor: shift index is out of bounds") from
    runtime.create_session, reached from structured/latency.py `_session` while the tables
    are measured; without `--latency-budget` the same model is a one-line refusal."""
    path, out_dir = _saved(tmp_path, _mlp_with_sparse_addend(bad_index=True))
    _ends_cleanly(capsys, ["prune", str(path), "-o", str(out_dir / "out.onnx"),
                           "--structure", "channels", "--min-size", "0",
                           "--latency-budget", "0.7", "--latency-threads", "1",
                           "--latency-table", str(tmp_path / "tables.json"), "-q"], out_dir)


@pytest.mark.parametrize("build", [_grouped_conv_with_rank1_weight, _gemm_with_rank1_weight],
                         ids=["grouped-conv", "gemm-transB"])
def test_structured_analysis_of_a_layer_with_a_rank1_weight(tmp_path: Path, capsys,
                                                            build) -> None:
    """Was: exit 3, IndexError at structured/rules_layers.py:189 (`conv`: `dims[1]` of a
    1-D weight) or :153 (`gemm`: `axes[1]`), for `inspect --structured` and `prune
    --structure channels` alike (the fuzzer's swap_fields and swap_node_inputs mutations on
    the cnn and rich models, seeds 11 and 12)."""
    path, out_dir = _saved(tmp_path, build())
    _ends_cleanly(capsys, ["inspect", str(path), "--structured"])
    _ends_cleanly(capsys, ["prune", str(path), "-o", str(out_dir / "out.onnx"),
                           "--structure", "channels", "--min-size", "0", "-q"], out_dir)


def test_latency_budget_on_a_model_that_does_not_run_at_the_synthetic_shapes(
        tmp_path: Path, capsys) -> None:
    """Was: exit 3, InvalidArgument ("Pad reflect: pre-pad (32) exceeds maximum allowed
    (15)") from onnxruntime's run in structured/latency.py `_run_with_outputs`, reached from
    `measure_tables` -> `_regions`; a refusal that names the shapes (and --dim /
    --input-shapes) is what the user needs. `--sparsity 0.5`, and the budget with
    `--dim t=256`, exit 0 on the same model."""
    path, out_dir = _saved(tmp_path, _reflect_pad_then_convs())
    _ends_cleanly(capsys, ["prune", str(path), "-o", str(out_dir / "out.onnx"),
                           "--structure", "channels", "--min-size", "0",
                           "--latency-budget", "0.7", "--latency-threads", "1",
                           "--latency-table", str(tmp_path / "tables.json"), "-q"], out_dir)
