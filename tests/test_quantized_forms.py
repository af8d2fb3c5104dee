"""tools/quantized_forms.py, the reading of integer weights that judges fuzz.py --quantized
and peer_suite.py --quantized apart from onnxprune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_quantized import _make

from onnxprune.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import quantized_forms  # noqa: E402


def test_the_fuzz_oracle_reads_a_scale_stored_as_a_sparse_initializer(tmp_path) -> None:
    """tools/fuzz.py --quantized --seed 21, case 401: a fuzz mutation stored a MatMulNBits
    scale as a sparse initializer (int32 indices); the prune writes it dense with the same
    values, which tools/quantized_forms.py called "scales changed" because it saw no scale
    in the input (it read initializers and Constant values, not sparse initializers)."""
    path = _make("matmul-nbits", tmp_path)
    model = onnx.load(str(path))
    scale = next(t for t in model.graph.initializer if t.name == "W2_scales")
    values = numpy_helper.to_array(scale)
    sparse = onnx.SparseTensorProto()
    sparse.values.CopyFrom(numpy_helper.from_array(values.reshape(-1), "W2_scales"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.arange(values.size, dtype=np.int32)))
    sparse.dims.extend(values.shape)
    model.graph.initializer.remove(scale)
    model.graph.sparse_initializer.append(sparse)
    source, out, report = tmp_path / "s.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(model, str(source))
    before = quantized_forms.integer_weights(model)
    dense = quantized_forms.integer_weights(onnx.load(str(path)))
    np.testing.assert_array_equal(before["W2_Q4"].scale, dense["W2_Q4"].scale)
    assert main(["prune", str(source), "-o", str(out), "--method", "admm", "--format",
                 "dense", "--min-size", "256", "--report", str(report), "-q"]) == 0
    after = quantized_forms.integer_weights(onnx.load(str(out)))
    assert quantized_forms.pruning_problems(before, after, json.loads(report.read_text()),
                                            rebuilds=True) == []
    # indices out of order or repeated say no one array: not read (not judged), not guessed
    model.graph.sparse_initializer[-1].indices.CopyFrom(
        numpy_helper.from_array(np.zeros(values.size, np.int64)))
    with pytest.raises(quantized_forms.Unreadable):
        quantized_forms.integer_weights(model)
