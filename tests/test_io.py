"""Model I/O: clear load errors, lazy external data, atomic saves that leave the proto alone."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune.io as io_module
from onnxprune.cli import main as cli_main
from onnxprune.errors import ModelLoadError, OutputPathError
from onnxprune.io import (
    check_output_path,
    iter_all_tensors,
    load_model,
    model_file_bytes,
    model_from_proto,
    read_array,
    save_model,
    write_array,
)

F = TensorProto.FLOAT
vi = helper.make_tensor_value_info
RNG_SEED = 0


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return {
        "W1": rng.standard_normal((64, 32)).astype(np.float32),
        "b1": rng.standard_normal(32).astype(np.float32),
        "W2": rng.standard_normal((16, 32)).astype(np.float32),
        "Wc": rng.standard_normal((16, 16)).astype(np.float32),
        "Wt": rng.standard_normal((16, 16)).astype(np.float32),
    }


def make_model() -> onnx.ModelProto:
    """A small model with every kind of storage and every model-level field we must keep.

    W1 raw_data initializer, b1 small (stays inline), W2 in float_data, Wc in a Constant node,
    Wt in an If branch; a local function; metadata, doc strings, producer, two opsets.
    """
    arrays = _arrays()
    scale = helper.make_function(
        "local",
        "Scale",
        ["X"],
        ["Y"],
        [
            helper.make_node("Constant", [], ["two"], value_float=2.0),
            helper.make_node("Mul", ["X", "two"], ["Y"]),
        ],
        [helper.make_opsetid("", 17)],
        doc_string="doubles its input",
    )
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h5", "Wt"], ["yt"])],
        "then",
        [],
        [vi("yt", F, [2, 16])],
        [numpy_helper.from_array(arrays["Wt"], "Wt")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h5"], ["ye"])], "else", [], [vi("ye", F, [2, 16])]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="fc1", doc_string="first layer"),
        helper.make_node("Add", ["h1", "b1"], ["h2"], name="bias1"),
        helper.make_node("Scale", ["h2"], ["h3"], domain="local", name="scale"),
        helper.make_node("Gemm", ["h3", "W2"], ["h4"], transB=1, name="fc2"),
        helper.make_node(
            "Constant",
            [],
            ["Wc"],
            name="const_wc",
            value=numpy_helper.from_array(arrays["Wc"], "Wc"),
        ),
        helper.make_node("MatMul", ["h4", "Wc"], ["h5"], name="fc3"),
        helper.make_node(
            "If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch"
        ),
    ]
    w2 = helper.make_tensor("W2", F, [16, 32], arrays["W2"].ravel().tolist())  # float_data
    graph = helper.make_graph(
        nodes,
        "rich",
        [vi("x", F, [2, 64]), vi("c", TensorProto.BOOL, [])],
        [vi("y", F, [2, 16])],
        [
            numpy_helper.from_array(arrays["W1"], "W1"),
            numpy_helper.from_array(arrays["b1"], "b1"),
            w2,
        ],
        doc_string="graph doc",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[scale],
        producer_name="onnxprune-tests",
        producer_version="9.9",
        doc_string="model doc",
        domain="org.example",
        model_version=7,
    )
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests", "purpose": "io"})
    onnx.checker.check_model(model, full_check=True)
    return model


FEEDS = {
    "x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32),
    "c": np.array(True),
}


def run(path: Path) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, FEEDS)


def assert_same_outputs(a: Path, b: Path) -> None:
    for x, y in zip(run(a), run(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def inline_path(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save(make_model(), str(path))
    return path


@pytest.fixture
def external_path(tmp_path: Path) -> Path:
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(
        make_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    return path


def tensors_by_name(proto: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in iter_all_tensors(proto.graph)}


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


# --- loading -----------------------------------------------------------------------------------


def test_load_inline(inline_path: Path) -> None:
    loaded = load_model(inline_path)
    assert not loaded.uses_external_data
    assert loaded.path == inline_path and loaded.base_dir == inline_path.parent
    tensors = tensors_by_name(loaded.proto)
    assert sorted(tensors) == ["W1", "W2", "Wc", "Wt", "b1"]
    for name, array in _arrays().items():
        np.testing.assert_array_equal(read_array(tensors[name], loaded.base_dir), array)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"this is not an onnx model\n" * 20, "not a valid ONNX model"),
        (b"", "no graph"),
        (bytes(range(256)) * 4, "not a valid ONNX model"),
    ],
)
def test_load_rejects_garbage(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    message = one_line_error(info)
    assert problem in message and "bad.onnx" in message


def test_load_rejects_a_model_cut_inside_a_tensor(inline_path: Path, tmp_path: Path) -> None:
    data = inline_path.read_bytes()
    start = data.find(_arrays()["W1"].tobytes()[:256])
    assert start > 0
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: start + 1000])
    with pytest.raises(ModelLoadError) as info:
        load_model(cut)
    assert "truncated" in one_line_error(info)


def test_load_rejects_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path / "nope.onnx")
    assert "no such file" in one_line_error(info)
    with pytest.raises(ModelLoadError) as info:
        load_model(tmp_path)
    assert "directory" in one_line_error(info)


def test_load_rejects_missing_external_data(external_path: Path) -> None:
    (external_path.parent / "weights.bin").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_model(external_path)
    message = one_line_error(info)
    assert "weights.bin" in message and "missing" in message


def test_load_rejects_truncated_external_data(external_path: Path) -> None:
    data = external_path.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(ModelLoadError) as info:
        load_model(external_path)
    message = one_line_error(info)
    assert "weights.bin" in message and "truncated" in message


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("location", "../weights.bin", "outside"),
        ("location", "/etc/passwd", "outside"),
        ("offset", "twelve", "not a non-negative integer"),
    ],
)
def test_load_rejects_bad_external_entries(
    external_path: Path, key: str, value: str, problem: str
) -> None:
    proto = onnx.load(str(external_path), load_external_data=False)
    entry = next(e for e in proto.graph.initializer[0].external_data if e.key == key)
    entry.value = value
    external_path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError) as info:
        load_model(external_path)
    assert problem in one_line_error(info)


def test_load_rejects_inline_tensor_with_wrong_byte_count(tmp_path: Path) -> None:
    model = make_model()
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-4]
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert "'W1'" in one_line_error(info)


# --- external data -----------------------------------------------------------------------------


def test_external_data_is_memory_mapped_not_read(external_path: Path) -> None:
    loaded = load_model(external_path)
    assert loaded.uses_external_data
    tensors = tensors_by_name(loaded.proto)
    external = {n for n, t in tensors.items() if t.data_location == TensorProto.EXTERNAL}
    # onnx.save moves raw tensors of 1 KiB and more: not W2 (float_data) nor b1 (small)
    assert {"W1", "Wt"} <= external and not {"W2", "b1"} & external
    assert not any(tensors[n].HasField("raw_data") for n in external)
    arrays = _arrays()
    for name in external:
        values = read_array(tensors[name], loaded.base_dir)
        assert isinstance(values, np.memmap)
        assert not values.flags.writeable
        np.testing.assert_array_equal(values, arrays[name])
    # the bytes are read from the file when asked for, not at load time
    data = external_path.parent / "weights.bin"
    offset = int(next(e.value for e in tensors["W1"].external_data if e.key == "offset"))
    with open(data, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.full(4, 7.0, np.float32).tobytes())
    np.testing.assert_array_equal(read_array(tensors["W1"], loaded.base_dir).ravel()[:4], 7.0)


def test_save_external_model_elsewhere(external_path: Path, tmp_path: Path) -> None:
    loaded = load_model(external_path)
    before = loaded.proto.SerializeToString()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "pruned.onnx"
    assert save_model(loaded, out) == out
    assert files_in(out_dir) == ["pruned.onnx", "pruned.onnx.data"]
    assert loaded.proto.SerializeToString() == before
    saved = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value
        for t in iter_all_tensors(saved.graph)
        for e in t.external_data
        if e.key == "location"
    }
    assert locations == {"pruned.onnx.data"}
    for tensor in iter_all_tensors(saved.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            offset = int(next(e.value for e in tensor.external_data if e.key == "offset"))
            assert offset % io_module.EXTERNAL_ALIGNMENT == 0
    assert_same_outputs(external_path, out)
    # the original files are untouched and still load
    np.testing.assert_array_equal(
        read_array(tensors_by_name(load_model(external_path).proto)["W1"], external_path.parent),
        _arrays()["W1"],
    )
    assert (
        model_file_bytes(out) == out.stat().st_size + (out_dir / "pruned.onnx.data").stat().st_size
    )


def test_save_inline_model_is_byte_identical(inline_path: Path, tmp_path: Path) -> None:
    loaded = load_model(inline_path)
    before = loaded.proto.SerializeToString()
    out = tmp_path / "copy.onnx"
    save_model(loaded, out)
    assert loaded.proto.SerializeToString() == before
    assert out.read_bytes() == inline_path.read_bytes()
    assert files_in(tmp_path) == ["copy.onnx", "in"]
    assert model_file_bytes(out) == out.stat().st_size


def test_save_inline_model_as_external_keeps_the_proto(inline_path: Path, tmp_path: Path) -> None:
    loaded = load_model(inline_path)
    before = loaded.proto.SerializeToString()
    out = tmp_path / "ext.onnx"
    save_model(loaded, out, external=True)
    assert loaded.proto.SerializeToString() == before
    saved = tensors_by_name(onnx.load(str(out), load_external_data=False))
    assert saved["b1"].HasField("raw_data")  # small tensors stay inline
    assert {n for n, t in saved.items() if t.data_location == TensorProto.EXTERNAL} == {
        "W1",
        "W2",
        "Wc",
        "Wt",
    }
    assert_same_outputs(inline_path, out)
    reloaded = load_model(out)
    for name, array in _arrays().items():
        tensor = tensors_by_name(reloaded.proto)[name]
        np.testing.assert_array_equal(read_array(tensor, reloaded.base_dir), array)


def test_large_model_is_written_with_external_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(io_module.writer, "PROTOBUF_LIMIT", 4096)
    proto = make_model()
    before = proto.SerializeToString()
    loaded = model_from_proto(proto, tmp_path)
    assert not loaded.uses_external_data
    out = tmp_path / "big.onnx"
    save_model(loaded, out)
    assert files_in(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert proto.SerializeToString() == before
    assert onnx.load(str(out), load_external_data=False).graph.initializer[0].data_location == (
        TensorProto.EXTERNAL
    )
    original = tmp_path / "original.onnx"
    onnx.save(make_model(), str(original))
    assert_same_outputs(original, out)


def test_model_level_fields_survive(external_path: Path, tmp_path: Path) -> None:
    original = make_model()
    loaded = load_model(external_path)
    out = tmp_path / "kept.onnx"
    save_model(loaded, out)
    saved = onnx.load(str(out))  # with the external data
    assert saved.ir_version == 8
    assert [(o.domain, o.version) for o in saved.opset_import] == [("", 17), ("local", 1)]
    assert [f.SerializeToString() for f in saved.functions] == [
        f.SerializeToString() for f in original.functions
    ]
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "tests", "purpose": "io"}
    assert (saved.producer_name, saved.producer_version) == ("onnxprune-tests", "9.9")
    assert (saved.doc_string, saved.graph.doc_string) == ("model doc", "graph doc")
    assert (saved.domain, saved.model_version) == ("org.example", 7)
    # the nodes that hold no tensor are byte for byte the same; the values are the same
    for mine, theirs in zip(saved.graph.node, original.graph.node, strict=True):
        if mine.op_type not in ("Constant", "If"):
            assert mine.SerializeToString() == theirs.SerializeToString()
    assert saved.graph.node[0].doc_string == "first layer"
    for name, tensor in tensors_by_name(saved).items():
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), _arrays()[name])


def test_untouched_parts_are_unchanged_after_a_write(inline_path: Path, tmp_path: Path) -> None:
    loaded = load_model(inline_path)
    w1 = tensors_by_name(loaded.proto)["W1"]
    values = read_array(w1, loaded.base_dir, writable=True)
    values[:, ::2] = 0.0
    write_array(w1, values)
    out = tmp_path / "pruned.onnx"
    save_model(loaded, out)
    original = onnx.load(str(inline_path))
    saved = onnx.load(str(out))
    assert [n.SerializeToString() for n in saved.graph.node] == [
        n.SerializeToString() for n in original.graph.node
    ]
    assert saved.graph.initializer[1:] == original.graph.initializer[1:]
    assert saved.functions == original.functions
    assert saved.metadata_props == original.metadata_props
    np.testing.assert_array_equal(numpy_helper.to_array(saved.graph.initializer[0]), values)


def test_saved_file_has_ordinary_permissions(inline_path: Path, tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    out = tmp_path / "mode.onnx"
    save_model(load_model(inline_path), out, external=True)
    for path in (out, tmp_path / "mode.onnx.data"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_save_refuses_to_overwrite_the_models_own_data(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(
        make_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="other.onnx.data",
    )
    loaded = load_model(path)
    before = {name: (tmp_path / name).read_bytes() for name in files_in(tmp_path)}
    with pytest.raises(OutputPathError) as info:
        save_model(loaded, tmp_path / "other.onnx")  # its data file is the input's
    assert "external data file" in one_line_error(info)
    with pytest.raises(OutputPathError):
        save_model(loaded, tmp_path / "other.onnx.data")
    assert {name: (tmp_path / name).read_bytes() for name in files_in(tmp_path)} == before
    w1 = tensors_by_name(load_model(path).proto)["W1"]
    np.testing.assert_array_equal(read_array(w1, tmp_path), _arrays()["W1"])


# --- atomic saves ------------------------------------------------------------------------------


def _failing(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize("external", [False, True])
def test_failed_write_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, inline_path: Path, tmp_path: Path, external: bool
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model.onnx").write_bytes(b"previous output")
    loaded = load_model(inline_path)
    before = loaded.proto.SerializeToString()
    monkeypatch.setattr(io_module.os, "fsync", _failing(OSError(errno.ENOSPC, "No space")))
    with pytest.raises((OutputPathError, OSError)):
        save_model(loaded, out_dir / "model.onnx", external=external, durable=True)
    monkeypatch.undo()
    assert files_in(out_dir) == ["model.onnx"]
    assert (out_dir / "model.onnx").read_bytes() == b"previous output"
    assert loaded.proto.SerializeToString() == before


def test_failed_rename_of_the_model_removes_its_data_file(
    monkeypatch: pytest.MonkeyPatch, inline_path: Path, tmp_path: Path
) -> None:
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "model.onnx":
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    loaded = load_model(inline_path)
    monkeypatch.setattr(io_module.os, "replace", replace)
    with pytest.raises((OutputPathError, OSError)):
        save_model(loaded, tmp_path / "model.onnx", external=True)
    monkeypatch.undo()
    assert calls == ["model.onnx.data", "model.onnx"]
    assert files_in(tmp_path) == ["in"]


class _DiskFullFile:
    """A binary file whose writes fail once `limit` bytes have gone through."""

    def __init__(self, path, mode, limit: int):
        self._file = open(path, mode)  # noqa: SIM115
        self._left = limit

    def write(self, data) -> int:
        if len(data) > self._left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_disk_full_while_moving_tensors_keeps_the_proto(
    monkeypatch: pytest.MonkeyPatch, inline_path: Path, tmp_path: Path
) -> None:
    loaded = load_model(inline_path)
    before = loaded.proto.SerializeToString()
    # W1 (8 KiB, raw) and W2 (2 KiB, float_data) fit; Wc (1 KiB, raw) does not
    monkeypatch.setattr(
        io_module.writer, "open", lambda path, mode="r": _DiskFullFile(path, mode, 10500),
        raising=False,
    )
    with pytest.raises((OutputPathError, OSError)):
        save_model(loaded, tmp_path / "full.onnx", external=True)
    monkeypatch.undo()
    assert files_in(tmp_path) == ["in"]
    assert loaded.proto.SerializeToString() == before
    for name, array in _arrays().items():
        tensor = tensors_by_name(loaded.proto)[name]
        np.testing.assert_array_equal(read_array(tensor, loaded.base_dir), array)


# --- output paths ------------------------------------------------------------------------------


def test_check_output_path_accepts_a_new_file(inline_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "new.onnx"
    assert check_output_path(out, inline_path) == out
    assert files_in(tmp_path) == ["in"]  # the writability probe is gone


def test_check_output_path_rejects_the_input(
    monkeypatch: pytest.MonkeyPatch, inline_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(OutputPathError) as info:
        check_output_path(inline_path, inline_path)
    assert "input" in one_line_error(info)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError):
        check_output_path("in/../in/./model.onnx", inline_path)
    with pytest.raises(OutputPathError):
        check_output_path(inline_path, Path("in/model.onnx"))
    link = tmp_path / "link.onnx"
    link.symlink_to(inline_path)
    with pytest.raises(OutputPathError):
        check_output_path(link, inline_path)
    hard = tmp_path / "hard.onnx"
    os.link(inline_path, hard)
    with pytest.raises(OutputPathError):
        check_output_path(hard, inline_path)


def test_check_output_path_rejects_missing_directory_and_directory(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError) as info:
        check_output_path(tmp_path / "missing" / "out.onnx", None)
    assert "does not exist" in one_line_error(info)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(OutputPathError) as info:
        check_output_path(tmp_path / "dir.onnx", None)
    assert "is a directory" in one_line_error(info)


def test_check_output_path_rejects_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes here")
        with pytest.raises(OutputPathError) as info:
            check_output_path(locked / "out.onnx", None)
        assert "not writable" in one_line_error(info)
    finally:
        locked.chmod(0o700)


# --- tensors -----------------------------------------------------------------------------------


def test_write_array_checks_dtype_and_shape() -> None:
    tensor = numpy_helper.from_array(np.ones((4, 8), np.float32), "W")
    with pytest.raises(ValueError, match="float64"):
        write_array(tensor, np.ones((4, 8), np.float64))
    with pytest.raises(ValueError, match="W"):
        write_array(tensor, np.ones((8, 4), np.float32))
    with pytest.raises(ValueError, match="STRING"):
        write_array(numpy_helper.from_array(np.array(["a"], dtype=object), "s"),
                    np.array(["a"], dtype=object))
    with pytest.raises(ValueError, match="int32"):  # whole-byte integers: type checked too
        write_array(numpy_helper.from_array(np.ones(3, np.int64), "i"), np.ones(3, np.int32))
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), 1.0)
    values = np.arange(32, dtype=np.float32).reshape(4, 8)
    write_array(tensor, values.T.copy().T)  # non-contiguous input is fine
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), values)


def test_write_array_makes_an_external_tensor_inline(external_path: Path) -> None:
    loaded = load_model(external_path)
    tensor = tensors_by_name(loaded.proto)["W1"]
    values = read_array(tensor, loaded.base_dir, writable=True) * 2
    write_array(tensor, values)
    assert tensor.data_location != TensorProto.EXTERNAL and not tensor.external_data
    np.testing.assert_array_equal(read_array(tensor, loaded.base_dir), values)


def test_write_array_replaces_float_data() -> None:
    tensor = helper.make_tensor("W", F, [2, 2], [1.0, 2.0, 3.0, 4.0])
    write_array(tensor, np.full((2, 2), 5.0, np.float32))
    assert not tensor.float_data
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), 5.0)


@pytest.mark.parametrize("storage", ["raw", "float_data", "external"])
def test_read_array_writable_is_an_independent_copy(external_path: Path, storage: str) -> None:
    loaded = load_model(external_path)
    tensors = tensors_by_name(loaded.proto)
    tensor = {"raw": tensors["b1"], "float_data": tensors["W2"], "external": tensors["W1"]}[storage]
    name = tensor.name
    copy = read_array(tensor, loaded.base_dir, writable=True)
    assert type(copy) is np.ndarray and copy.flags.writeable
    copy[...] = 0.0
    np.testing.assert_array_equal(read_array(tensor, loaded.base_dir), _arrays()[name])
    np.testing.assert_array_equal(
        read_array(tensors_by_name(load_model(external_path).proto)[name], external_path.parent),
        _arrays()[name],
    )


def test_read_array_is_read_only_by_default(inline_path: Path) -> None:
    loaded = load_model(inline_path)
    values = read_array(tensors_by_name(loaded.proto)["W1"], loaded.base_dir)
    with pytest.raises(ValueError):
        values[0, 0] = 1.0


@pytest.mark.parametrize("dtype", [np.float16, np.float64, "bfloat16"])
def test_read_array_other_float_types(dtype) -> None:
    dtype = (
        np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))
        if (dtype == "bfloat16")
        else np.dtype(dtype)
    )
    values = np.arange(6, dtype=np.float32).reshape(2, 3).astype(dtype)
    tensor = numpy_helper.from_array(values, "t")
    read = read_array(tensor, Path("."))
    assert read.dtype == dtype
    np.testing.assert_array_equal(read.astype(np.float32), values.astype(np.float32))
    write_array(tensor, (values.astype(np.float32) * 2).astype(dtype))
    np.testing.assert_array_equal(
        numpy_helper.to_array(tensor).astype(np.float32), values.astype(np.float32) * 2
    )


def test_iter_all_tensors_reaches_constants_and_subgraphs() -> None:
    names = [t.name for t in iter_all_tensors(make_model().graph)]
    assert sorted(names) == ["W1", "W2", "Wc", "Wt", "b1"]


# --- corrupt but parseable models: one-line ModelLoadError naming the tensor ---------------------


def _save_edited(tmp_path: Path, edit) -> Path:
    model = make_model()
    edit(model)
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_dims(tensor: TensorProto, dims: list[int]) -> None:
    del tensor.dims[:]
    tensor.dims.extend(dims)


def _clear_data(tensor: TensorProto) -> None:
    for field in ("raw_data", "float_data"):
        tensor.ClearField(field)


CORRUPT_TENSORS = {
    "data type 0": (lambda m: setattr(_initializer(m, "W1"), "data_type", 0), "'W1'",
                    "no data type"),
    "data type 99": (lambda m: setattr(_initializer(m, "W1"), "data_type", 99), "'W1'",
                     "unknown data type (99)"),
    "no data": (lambda m: _clear_data(_initializer(m, "W1")), "'W1'", "has no data"),
    "float_data count": (lambda m: _initializer(m, "W2").float_data.append(1.0), "'W2'",
                         "513 values in float_data"),
    "negative dim": (lambda m: _set_dims(_initializer(m, "W1"), [-64, -32]), "'W1'",
                     "negative dimension"),
    "huge dims": (lambda m: _set_dims(_initializer(m, "W2"), [2**40, 2**40]), "'W2'",
                  "impossibly large shape"),
    "int64 raw_data size": (
        lambda m: m.graph.initializer.append(
            TensorProto(name="shape", data_type=TensorProto.INT64, dims=[3], raw_data=b"\0" * 20)),
        "'shape'", "20 bytes of data"),
    "string raw_data": (
        lambda m: m.graph.initializer.append(
            TensorProto(name="s", data_type=TensorProto.STRING, dims=[1], raw_data=b"ab")),
        "'s'", "STRING"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_TENSORS))
@pytest.mark.parametrize("lazy", [False, True])
def test_corrupt_tensors_are_refused_at_load(tmp_path: Path, case: str, lazy: bool) -> None:
    edit, name, problem = CORRUPT_TENSORS[case]
    path = _save_edited(tmp_path, edit)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, lazy=lazy)
    message = one_line_error(info)
    assert name in message and problem in message


@pytest.mark.parametrize("case", sorted(CORRUPT_TENSORS))
def test_corrupt_tensors_are_refused_when_read_from_memory(case: str) -> None:
    """The Python API hands in protos that load_model never saw: read_array checks too."""
    edit, name, problem = CORRUPT_TENSORS[case]
    model = make_model()
    edit(model)
    tensor = model.graph.initializer[-1] if case in ("int64 raw_data size", "string raw_data") \
        else _initializer(model, name.strip("'"))
    with pytest.raises(ModelLoadError) as info:
        read_array(tensor, Path("."))
    message = one_line_error(info)
    assert name in message and problem in message


def _invalid_utf8(tmp_path: Path, set_marker) -> Path:
    """A model whose marked text field holds bytes that are not UTF-8 (protobuf will not set
    them, so the marker is replaced in the serialized bytes)."""
    model = make_model()
    set_marker(model, "MARKER1234")
    path = tmp_path / "utf8.onnx"
    path.write_bytes(model.SerializeToString().replace(b"MARKER1234", b"\xff\xfe\x80" * 3 + b"x"))
    return path


@pytest.mark.parametrize("where", ["node name", "tensor name", "doc string", "metadata"])
@pytest.mark.parametrize("command", ["inspect", "prune", "densify"])
def test_invalid_utf8_text_is_refused(tmp_path: Path, capsys, where: str, command: str) -> None:
    def set_marker(model: onnx.ModelProto, marker: str) -> None:
        if where == "node name":
            model.graph.node[0].name = marker
        elif where == "tensor name":
            model.graph.node[0].input[1] = marker
            model.graph.initializer[0].name = marker
        elif where == "doc string":
            model.graph.node[0].doc_string = marker
        else:
            helper.set_model_props(model, {"note": marker})

    path = _invalid_utf8(tmp_path, set_marker)
    argv = [command, str(path), "-q"]
    if command != "inspect":
        argv += ["-o", str(tmp_path / "out.onnx")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid UTF-8" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_invalid_utf8_location_is_refused(external_path: Path) -> None:
    proto = onnx.load(str(external_path), load_external_data=False)
    entry = next(e for e in proto.graph.initializer[0].external_data if e.key == "location")
    entry.value = "MARKER1234"
    external_path.write_bytes(proto.SerializeToString().replace(b"MARKER1234", b"\xff" * 10))
    with pytest.raises(ModelLoadError) as info:
        load_model(external_path)
    assert "not valid UTF-8" in one_line_error(info)


def _sparse_model(tmp_path: Path, edit) -> Path:
    dense = np.zeros((16, 16), np.float32)
    dense[::3, ::2] = np.arange(1, 49, dtype=np.float32).reshape(6, 8)
    indices = np.flatnonzero(dense).astype(np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.ravel()[indices], "Ws"),
                                       numpy_helper.from_array(indices, ""), [16, 16])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "Ws"], ["y"])], "g",
                              [vi("x", F, [1, 16])], [vi("y", F, [1, 16])],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    edit(model.graph.sparse_initializer[0])
    path = tmp_path / "sparse.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _set_indices(sparse: onnx.SparseTensorProto, indices: np.ndarray) -> None:
    sparse.indices.CopyFrom(numpy_helper.from_array(indices, ""))


SPARSE_DEFECTS = {
    "index past the end": (lambda s: _set_indices(s, np.r_[np.arange(47), 256].astype(np.int64)),
                           "outside its shape"),
    "negative index": (lambda s: _set_indices(s, np.r_[-1, np.arange(1, 48)].astype(np.int64)),
                       "outside its shape"),
    "2-D index past the end": (
        lambda s: _set_indices(s, np.c_[np.arange(48) % 16, np.full(48, 16)].astype(np.int64)),
        "outside its shape"),
    "fewer indices than values": (lambda s: _set_indices(s, np.arange(40, dtype=np.int64)),
                                  "indices of shape [40] for 48 values"),
    "float indices": (lambda s: _set_indices(s, np.arange(48, dtype=np.float32)),
                      "must be integers"),
    "values not 1-D": (lambda s: s.values.dims.append(1), "values must be 1-D"),
    "huge shape": (lambda s: (s.ClearField("dims"), s.dims.extend([2**40, 2**40])),
                   "invalid shape"),
    "indices without data": (lambda s: s.indices.ClearField("raw_data"),
                             "indices of sparse tensor 'Ws' has no data"),
}


@pytest.mark.parametrize("case", sorted(SPARSE_DEFECTS))
@pytest.mark.parametrize("command", ["inspect", "prune", "densify"])
def test_corrupt_sparse_tensors_are_refused(tmp_path: Path, capsys, case: str,
                                            command: str) -> None:
    edit, problem = SPARSE_DEFECTS[case]
    path = _sparse_model(tmp_path, edit)
    argv = [command, str(path), "-q", "--min-size", "16"] if command != "densify" \
        else [command, str(path), "-q"]
    if command != "inspect":
        argv += ["-o", str(tmp_path / "out.onnx")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'Ws'" in err[0] and problem in err[0], err
    assert not (tmp_path / "out.onnx").exists()


def test_a_sound_sparse_tensor_still_densifies(tmp_path: Path) -> None:
    path = _sparse_model(tmp_path, lambda sparse: None)
    out = tmp_path / "dense.onnx"
    assert cli_main(["densify", str(path), "-o", str(out), "-q"]) == 0
    dense = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0])
    expected = np.zeros((16, 16), np.float32)
    expected[::3, ::2] = np.arange(1, 49, dtype=np.float32).reshape(6, 8)
    np.testing.assert_array_equal(dense, expected)


@pytest.mark.parametrize(("declared", "holds", "problem"), [
    (onnx.AttributeProto.TENSOR, "sparse_tensor", "type TENSOR but holds a sparse tensor"),
    (onnx.AttributeProto.SPARSE_TENSOR, "t", "type SPARSE_TENSOR but holds a tensor"),
    (onnx.AttributeProto.TENSOR, None, "type TENSOR but holds nothing"),
    (onnx.AttributeProto.FLOATS, "t", "type FLOATS but holds a tensor"),
])
@pytest.mark.parametrize("command", ["inspect", "prune", "densify"])
def test_attribute_holding_the_wrong_kind_of_tensor_is_refused(
        tmp_path: Path, capsys, declared: int, holds: str | None, problem: str,
        command: str) -> None:
    def edit(model: onnx.ModelProto) -> None:
        node = next(n for n in model.graph.node if n.op_type == "Constant")
        value = numpy_helper.from_array(_arrays()["Wc"], "Wc")
        del node.attribute[:]
        attr = node.attribute.add()
        attr.name, attr.type = "value", declared
        if holds == "t":
            attr.t.CopyFrom(value)
        elif holds == "sparse_tensor":
            attr.sparse_tensor.values.CopyFrom(value)
            attr.sparse_tensor.values.ClearField("dims")
            attr.sparse_tensor.values.dims.append(256)
            attr.sparse_tensor.indices.CopyFrom(numpy_helper.from_array(np.arange(256), ""))
            attr.sparse_tensor.dims.extend([16, 16])

    path = _save_edited(tmp_path, edit)
    argv = [command, str(path), "-q"]
    if command != "inspect":
        argv += ["-o", str(tmp_path / "out.onnx")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'const_wc'" in err[0] and problem in err[0], err


def test_model_file_bytes_ignores_unusable_locations(external_path: Path) -> None:
    proto = onnx.load(str(external_path), load_external_data=False)
    for tensor, location in zip(proto.graph.initializer, ["x" * 5000, "../../etc/passwd"],
                                strict=False):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    external_path.write_bytes(proto.SerializeToString())
    assert model_file_bytes(external_path) >= external_path.stat().st_size


@pytest.mark.parametrize(("declared", "problem"), [
    (onnx.AttributeProto.FLOAT, "type FLOAT but holds an int"),
    (onnx.AttributeProto.INTS, "type INTS but holds an int"),
    (onnx.AttributeProto.GRAPH, "type GRAPH but holds an int"),
])
def test_attribute_whose_type_does_not_match_its_value_is_refused(
        tmp_path: Path, capsys, declared: int, problem: str) -> None:
    """(A Transpose whose `perm` claimed FLOAT made target discovery read 0.0 as a perm.)"""
    def edit(model: onnx.ModelProto) -> None:
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        gemm.attribute[0].type = declared

    path = _save_edited(tmp_path, edit)
    assert cli_main(["inspect", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'fc2'" in err[0] and "'transB'" in err[0] and problem in err[0]


def test_transpose_perm_that_is_no_permutation_is_refused(tmp_path: Path, capsys) -> None:
    """Target discovery looks through Transposes to find a weight's axis."""
    model = onnx.load(str(Path(__file__).resolve().parent.parent / "models" / "cnn.onnx"))
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose")
    perm = next(a for a in transpose.attribute if a.name == "perm")
    perm.ints[0] = 7
    path = tmp_path / "cnn.onnx"
    path.write_bytes(model.SerializeToString())
    assert cli_main(["inspect", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a permutation" in err[0]


@pytest.fixture(scope="module")
def compact_model(tmp_path_factory) -> Path:
    import onnxprune

    path = tmp_path_factory.mktemp("compact") / "compact.onnx"
    mlp = Path(__file__).resolve().parent.parent / "models" / "mlp.onnx"
    onnxprune.prune(str(mlp), str(path), sparsity=0.9, format="compact")
    return path


def _edit_compact(source: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(source))
    node = next(n for n in model.graph.node if n.doc_string.startswith("onnxprune:compact {"))
    edit(model, node)
    path = tmp_path / "edited.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _edit_meta(**changes):
    def edit(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
        import json

        head, text = node.doc_string.split(" ", 1)
        meta = json.loads(text)
        meta.update(changes)
        node.doc_string = f"{head} {json.dumps(meta)}"

    return edit


def _cut_payload(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    import json

    prefix = json.loads(node.doc_string.split(" ", 1)[1])["prefix"] + "/"
    tensor = next(t for t in model.graph.initializer if t.name.startswith(prefix)
                  and t.name.endswith("values"))
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[:3], tensor.name))


@pytest.mark.parametrize(("edit", "problem"), [
    (_edit_meta(data_type=99), "data_type 99"),
    (_edit_meta(shape=[-4, 4]), "shape"),
    (_edit_meta(tensor=["x"]), "'tensor' is not a name"),
    (_edit_meta(chunks=[{"kind": "gaps", "rows": [0, 10**6]}]), "chunk"),
    (_edit_meta(stored_as=3), "stored_as"),
    (_cut_payload, "cannot be decoded"),
], ids=["data_type", "shape", "tensor", "rows", "stored_as", "payload"])
@pytest.mark.parametrize("command", ["inspect", "densify"])
def test_corrupt_compact_tensors_are_refused(compact_model: Path, tmp_path: Path, capsys,
                                             edit, problem: str, command: str) -> None:
    path = _edit_compact(compact_model, tmp_path, edit)
    argv = [command, str(path), "-q"]
    if command == "densify":
        argv += ["-o", str(tmp_path / "out.onnx")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0], err
    assert not (tmp_path / "out.onnx").exists()
