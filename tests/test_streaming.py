"""Streaming prune (file to file, one target in memory) against the in-memory path.

The in-memory path loads the whole model, prunes it in the proto and writes it; the streaming
path (`prune(path, output)`) reads targets from the input's files and writes each one to the
output as it is pruned. Both must give the same values bit for bit; an inline model gives the
same file byte for byte. Chunk sizes are made tiny here so every chunk and block boundary is
crossed on small tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
import onnxprune.formats.storage as storage_module
import onnxprune.io as io_module
import onnxprune.patterns as masking_module
from onnxprune.config import PruneConfig
from onnxprune.errors import OutputPathError
from onnxprune.formats import densify_model
from onnxprune.io import (
    ModelWriter,
    iter_all_tensors,
    iter_chunks,
    load_model,
    read_array,
    save_model,
    uses_external_data,
)
from onnxprune.methods import Job
from onnxprune.registry import METHODS
from onnxprune.targets import Selection, discover_targets

F = TensorProto.FLOAT
vi = helper.make_tensor_value_info


def make_model() -> onnx.ModelProto:
    """Targets of every storage kind and reduction axis, plus tensors that are not targets.

    MatMul B [K, N] (axis 0), Gemm transB (axis 1), Conv [O, I, kh, kw] (axis 1), a
    Constant-node weight, a weight in an If branch, a float_data weight, a float16 weight
    behind a Cast, a bias and an int64 shape that stay as they are.
    """
    rng = np.random.default_rng(7)

    def weights(*shape, dtype=np.float32):
        values = rng.standard_normal(shape).astype(dtype)
        values.reshape(-1)[::17] = 0.0  # some zeros already, and ties among them
        return values

    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h4", "Wt"], ["yt"])], "then", [], [vi("yt", F, [1, 64])],
        [numpy_helper.from_array(weights(64, 64), "Wt")])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h4"], ["ye"])], "else", [], [vi("ye", F, [1, 64])])
    conv = weights(16, 32, 3, 3)
    nodes = [
        helper.make_node("Conv", ["img", "Wconv"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Flatten", ["c1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "Wsmall"], ["g0"], transB=1),
        helper.make_node("MatMul", ["x", "W1"], ["h1"]),
        helper.make_node("Add", ["h1", "b1"], ["h2"]),
        helper.make_node("Add", ["h2", "g0"], ["h2b"]),
        helper.make_node("Gemm", ["h2b", "W2"], ["h3"], transB=1),
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(
            weights(128, 64), "Wc")),
        helper.make_node("MatMul", ["h3", "Wc"], ["h3c"]),
        helper.make_node("Cast", ["Wh"], ["Wh32"], to=F),
        helper.make_node("MatMul", ["h3c", "Wh32"], ["h4"]),
        helper.make_node("If", ["cond"], ["y0"], then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("Reshape", ["y0", "shape"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(conv, "Wconv"),
        numpy_helper.from_array(weights(256, 16 * 4 * 4), "Wsmall"),
        numpy_helper.from_array(weights(96, 256), "W1"),
        numpy_helper.from_array(weights(256), "b1"),
        helper.make_tensor("W2", F, [128, 256], weights(128, 256).ravel().tolist()),
        numpy_helper.from_array(weights(64, 64, dtype=np.float16), "Wh"),
        numpy_helper.from_array(np.array([1, 64], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes, "streaming", [vi("x", F, [1, 96]), vi("img", F, [1, 32, 4, 4]),
                             vi("cond", TensorProto.BOOL, [])],
        [vi("y", F, [1, 64])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks and copies of a few thousand elements, lifts and splits from 256 bytes."""
    monkeypatch.setattr(masking_module, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(io_module.writer, "COPY_CHUNK_BYTES", 1000)
    monkeypatch.setattr(io_module.wire, "LAZY_MIN_BYTES", 256)
    monkeypatch.setattr(io_module.writer, "SPLIT_MIN_BYTES", 256)
    monkeypatch.setattr(storage_module, "STREAMED_PAYLOAD_BYTES", 256)


@pytest.fixture
def external_path(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save(make_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.weights", size_threshold=256)
    return path


@pytest.fixture
def inline_path(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "inline.onnx"
    path.parent.mkdir(exist_ok=True)
    onnx.save(make_model(), str(path))
    return path


CONFIGS = {
    "layer": dict(sparsity=0.6),
    "global": dict(sparsity=0.7, scope="global"),
    "random-global": dict(sparsity=0.4, method="random", scope="global", seed=3),
    "2:4": dict(pattern="2:4"),
    "4:8-random": dict(pattern="4:8", method="random"),
    "compact-90": dict(sparsity=0.9, format="compact"),
    "compact-2:4": dict(pattern="2:4", format="compact"),
    "wanda-compact": dict(method="wanda", format="compact", sparsity=0.8),
    "sparsegpt-sequential": dict(method="sparsegpt", pattern="2:4"),
}


def values_by_name(path: Path) -> dict[str, np.ndarray]:
    """Every tensor's values (compact and sparse forms made dense first)."""
    model = onnx.load(str(path))  # with its external data, the plain onnx way
    densify_model(model, path.parent)
    return {t.name: numpy_helper.to_array(t) for t in iter_all_tensors(model.graph)}


def bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _timeless(target_report) -> dict:
    return {k: v for k, v in target_report.__dict__.items() if k != "seconds"}


def in_memory_prune(path: Path, out: Path, options: dict):
    """The reference: the whole model in memory, pruned in the proto, then written."""
    loaded = load_model(path)
    proto = onnx.load(str(path))  # external data read into the proto
    pruned, report = onnxprune.prune(proto, base_dir=path.parent, inplace=True, **options)
    assert pruned is proto
    save_model(io_module.model_from_proto(proto, path.parent), out,
               external=loaded.uses_external_data)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_external_streaming_equals_in_memory(external_path: Path, tmp_path: Path,
                                             name: str) -> None:
    options = CONFIGS[name]
    streamed = tmp_path / "streamed.onnx"
    reference = tmp_path / "reference.onnx"
    _, report = onnxprune.prune(external_path, streamed, **options)
    reference_report = in_memory_prune(external_path, reference, options)
    assert [_timeless(t) for t in report.targets] == [_timeless(t)
                                                      for t in reference_report.targets]
    assert sum(t.zeros for t in report.targets) > sum(t.zeros_before for t in report.targets)
    got, want = values_by_name(streamed), values_by_name(reference)
    assert got.keys() == want.keys() == values_by_name(external_path).keys()
    for tensor_name in want:
        assert got[tensor_name].dtype == want[tensor_name].dtype
        assert bits(got[tensor_name]) == bits(want[tensor_name]), tensor_name
    # written with external data, like its input, and nothing else beside it
    skeleton = onnx.load(str(streamed), load_external_data=False)
    assert any(uses_external_data(t) for t in iter_all_tensors(skeleton.graph))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in", "reference.onnx", "reference.onnx.data", "streamed.onnx", "streamed.onnx.data"]
    feeds = {"x": np.ones((1, 96), np.float32), "img": np.ones((1, 32, 4, 4), np.float32),
             "cond": np.array(True)}
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
               for p in (streamed, reference)]
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])


@pytest.mark.parametrize("name", ["global", "4:8-random"])
def test_streaming_runs_are_byte_identical(external_path: Path, tmp_path: Path,
                                           name: str) -> None:
    first, second = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.onnx"
    for out in (first, second):
        out.parent.mkdir()
        onnxprune.prune(external_path, out, **CONFIGS[name])
    assert first.read_bytes() == second.read_bytes()
    assert Path(f"{first}.data").read_bytes() == Path(f"{second}.data").read_bytes()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inline_streaming_gives_the_in_memory_file(inline_path: Path, tmp_path: Path,
                                                   name: str) -> None:
    streamed, reference = tmp_path / "streamed.onnx", tmp_path / "reference.onnx"
    returned, _ = onnxprune.prune(inline_path, streamed, **CONFIGS[name])
    pruned, _ = onnxprune.prune(onnx.load(str(inline_path)), **CONFIGS[name])
    onnx.save(pruned, str(reference))
    assert streamed.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "reference.onnx",
                                                          "streamed.onnx"]
    # the model returned references its tensors in the written file
    located = {e.value for t in iter_all_tensors(returned.graph) for e in t.external_data
               if e.key == "location"}
    assert located == {"streamed.onnx"}


def test_save_of_an_unchanged_model_is_byte_identical(inline_path: Path, tmp_path: Path) -> None:
    for lazy in (False, True):
        out = tmp_path / f"copy-{lazy}.onnx"
        save_model(load_model(inline_path, lazy=lazy), out)
        assert out.read_bytes() == inline_path.read_bytes()


def test_lazy_load_leaves_large_tensors_in_the_file(inline_path: Path) -> None:
    loaded = load_model(inline_path, lazy=True)
    eager = load_model(inline_path)
    assert loaded.lazy and not loaded.uses_external_data
    lazy_tensors = {t.name: t for t in iter_all_tensors(loaded.proto.graph)}
    for tensor in iter_all_tensors(eager.proto.graph):
        lazy = lazy_tensors[tensor.name]
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= io_module.wire.LAZY_MIN_BYTES:
            assert uses_external_data(lazy) and not lazy.HasField("raw_data")
            assert {e.key: e.value for e in lazy.external_data}["location"] == "inline.onnx"
        else:
            assert lazy == tensor
        np.testing.assert_array_equal(read_array(lazy, loaded.base_dir),
                                      read_array(tensor, eager.base_dir))


def test_iter_chunks_covers_the_tensor(external_path: Path) -> None:
    loaded = load_model(external_path)
    for tensor in iter_all_tensors(loaded.proto.graph):
        if tensor.data_type not in io_module.FLOAT_TYPES:
            continue
        pieces = [np.array(piece) for piece in iter_chunks(tensor, loaded.base_dir, 300)]
        assert all(piece.size <= 300 for piece in pieces)
        np.testing.assert_array_equal(np.concatenate(pieces),
                                      read_array(tensor, loaded.base_dir).reshape(-1))


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_chunked_scores_equal_whole_target_scores(external_path: Path, method: str) -> None:
    loaded = load_model(external_path)
    targets, _ = discover_targets(loaded.proto, Selection(min_size=1))
    for target in targets:
        weights = read_array(target.tensor, loaded.base_dir)
        whole = METHODS.build(method).scores(Job(target, weights, plan=None, seed=5)).reshape(-1)
        for size in (333, 4096, weights.size):
            pieces = iter_chunks(target.tensor, loaded.base_dir, size)
            chunked = np.concatenate([np.array(s) for s in METHODS.build(method).score_chunks(
                target, pieces, seed=5)])
            assert bits(chunked) == bits(whole), (target.name, size)


@pytest.mark.parametrize("name", ["layer", "4:8-random"])
def test_chunk_size_does_not_change_the_result(external_path: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               name: str) -> None:
    results = []
    for chunk in (401, 1 << 30):
        monkeypatch.setattr(masking_module, "CHUNK_ELEMENTS", chunk)
        out = tmp_path / f"c{chunk}" / "m.onnx"
        out.parent.mkdir()
        onnxprune.prune(external_path, out, **CONFIGS[name])
        results.append(values_by_name(out))
    for other in results[1:]:
        assert {k: bits(v) for k, v in other.items()} == {k: bits(v)
                                                          for k, v in results[0].items()}


def test_graph_changed_after_put_is_still_written_right(inline_path: Path,
                                                        tmp_path: Path) -> None:
    """A store that also edits the graph (as sparse or compact formats do) moves the layout:
    the values already written are taken from the first file into a new one."""
    loaded = load_model(inline_path, lazy=True)
    targets, _ = discover_targets(loaded.proto, Selection())
    out = tmp_path / "changed.onnx"
    expected = {}
    with ModelWriter(loaded, out) as writer:
        for target in targets:
            values = -read_array(target.tensor, loaded.base_dir, writable=True)
            writer.put(target.tensor, values)
            expected[target.name] = values
        loaded.proto.graph.initializer.insert(0, numpy_helper.from_array(
            np.arange(1000, dtype=np.float32), "added"))
        loaded.proto.graph.doc_string = "edited after the values were written"
        writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.onnx", "in"]
    saved = values_by_name(out)
    np.testing.assert_array_equal(saved["added"], np.arange(1000, dtype=np.float32))
    for name, values in expected.items():
        np.testing.assert_array_equal(saved[name], values)
    assert onnx.load(str(out)).graph.doc_string == "edited after the values were written"


@pytest.mark.parametrize("fixture", ["external_path", "inline_path"])
def test_error_during_streaming_leaves_nothing(request: pytest.FixtureRequest, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               fixture: str) -> None:
    path = request.getfixturevalue(fixture)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = []

    def failing_progress(target) -> None:
        calls.append(target.name)
        if len(calls) == 3:
            raise RuntimeError("stop half-way")

    with pytest.raises(RuntimeError):
        onnxprune.prune(path, out_dir / "m.onnx", config=PruneConfig(), progress=failing_progress)
    assert list(out_dir.iterdir()) == []


def test_writer_refuses_to_replace_the_file_it_reads(tmp_path: Path) -> None:
    """After a lazy load the model file is a source of tensor bytes like any data file."""
    source = tmp_path / "m.onnx.data"  # an inline model with an unlucky name
    onnx.save(make_model(), str(source))
    before = source.read_bytes()
    loaded = load_model(source, lazy=True)
    with pytest.raises(OutputPathError):
        ModelWriter(loaded, tmp_path / "m.onnx", external=True)  # data file: m.onnx.data
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]
