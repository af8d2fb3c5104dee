"""External data stays inside the model's folder: no symlink, `..` or bad range reads outside.

Every test builds a model whose tensors (initializers, a Constant node, an If subgraph, a
local function body, a TENSORS attribute, sparse values and indices) live in a data file
beside it, points one of them somewhere it must not go, and runs the CLI in-process:
`inspect`, `prune` and `densify` must each refuse with one line naming the tensor (exit 2),
leave no output, leave the input alone, and never copy a byte of the canary file that sits
beside the model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxprune.cli import main
from onnxprune.errors import ModelLoadError
from onnxprune.io import load_model, read_array

REPO_ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("onnxprune_fuzz", REPO_ROOT / "tools" / "fuzz.py")
fuzz = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fuzz)

CANARY = b"\x13\x37CANARY\xc0\xde" * 4096
COMMANDS = ("inspect", "prune", "densify")


def all_tensors(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Tensors by name; sparse ones as `<values name>.values` / `.indices`."""
    found = {}
    for tensor in fuzz._all_tensors(model):
        found[tensor.name] = tensor
    for sparse in fuzz._all_sparse(model):
        found[sparse.values.name + ".values"] = sparse.values
        found[sparse.values.name + ".indices"] = sparse.indices
    return found


# where each kind of tensor lives in fuzz.build_rich_model
PLACES = {
    "initializer": "W1",
    "constant_node": "Wc",
    "subgraph": "Wt",
    "function_body": "Wf",
    "tensors_attribute": "Wh",
    "sparse_values": "Ws.values",
    "sparse_indices": "Ws.indices",
}


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    """(model path, canary path): the model in tmp/model/, every tensor external, the
    canary in tmp/ beside the folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = fuzz.build_rich_model()
    (folder / fuzz.DATA_NAME).write_bytes(fuzz.move_to_external(model))
    path = folder / fuzz.MODEL_NAME
    path.write_bytes(model.SerializeToString())
    canary = tmp_path / "canary.bin"
    canary.write_bytes(CANARY)
    return path, canary


def edit(path: Path, name: str, **entries: str) -> TensorProto:
    model = onnx.load(str(path), load_external_data=False)
    tensor = all_tensors(model)[name]
    assert tensor.data_location == TensorProto.EXTERNAL, name
    fuzz._set_external(tensor, **entries)
    path.write_bytes(model.SerializeToString())
    return tensor


def folder_state(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink()
                                         else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def assert_refused(path: Path, capsys, *needles: str) -> None:
    """Each command exits 2 with one line holding every needle; nothing written or changed."""
    before = folder_state(path.parent)
    out_dir = path.parent.parent / "out"
    out_dir.mkdir(exist_ok=True)
    for command in COMMANDS:
        argv = [command, str(path)]
        if command != "inspect":
            argv += ["-o", str(out_dir / "out.onnx")]
        capsys.readouterr()
        assert main(argv + ["-q"]) == 2, command
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("onnxprune: error:"), (command, lines)
        for needle in needles:
            assert needle in lines[0], (command, lines[0])
        assert list(out_dir.iterdir()) == [], command
    assert folder_state(path.parent) == before


def assert_no_canary_anywhere(root: Path, canary: Path) -> None:
    marker = CANARY[:10]
    for file in root.rglob("*"):
        if file.is_file() and not file.is_symlink() and file != canary:
            assert marker not in file.read_bytes(), file


@pytest.mark.parametrize("place", sorted(PLACES))
def test_symlink_to_a_file_outside_is_refused(case, capsys, place: str) -> None:
    path, canary = case
    (path.parent / "link.bin").symlink_to(canary)
    edit(path, PLACES[place], location="link.bin", offset="0")
    assert_refused(path, capsys, f"'{PLACES[place].split('.')[0]}'", "link.bin", "outside")
    assert_no_canary_anywhere(path.parent.parent, canary)


@pytest.mark.parametrize("place", sorted(PLACES))
def test_dot_dot_is_refused_everywhere(case, capsys, place: str) -> None:
    path, canary = case
    edit(path, PLACES[place], location="../canary.bin", offset="0")
    assert_refused(path, capsys, f"'{PLACES[place].split('.')[0]}'", "outside")


def test_symlink_to_etc_passwd_is_refused(case, capsys) -> None:
    path, _ = case
    (path.parent / "passwd.bin").symlink_to("/etc/passwd")
    edit(path, "W2", location="passwd.bin", offset="0", length="16")
    assert_refused(path, capsys, "'W2'", "outside")


def test_path_through_a_symlinked_directory_is_refused(case, capsys) -> None:
    path, canary = case
    (path.parent / "sub").symlink_to(canary.parent, target_is_directory=True)
    edit(path, "Wc", location="sub/canary.bin", offset="0")
    assert_refused(path, capsys, "'Wc'", "outside")
    assert_no_canary_anywhere(path.parent.parent, canary)


def test_the_data_file_itself_a_symlink_outside_is_refused(case, capsys) -> None:
    """Same bytes, but they live outside the folder: refused as onnxruntime does."""
    path, canary = case
    data = path.parent / fuzz.DATA_NAME
    outside = canary.parent / "elsewhere.bin"
    outside.write_bytes(data.read_bytes() + CANARY)
    data.unlink()
    data.symlink_to(outside)
    assert_refused(path, capsys, "outside")
    assert_no_canary_anywhere(path.parent.parent / "out", canary)


def test_a_symlink_that_stays_inside_is_followed(case, capsys, tmp_path: Path) -> None:
    path, _ = case
    (path.parent / "alias.bin").symlink_to(fuzz.DATA_NAME)
    expected = read_array(all_tensors(onnx.load(str(path), load_external_data=False))["W1"],
                          path.parent).copy()
    edit(path, "W1", location="alias.bin")
    out = tmp_path / "out" / "dense.onnx"
    out.parent.mkdir()
    assert main(["densify", str(path), "-o", str(out), "-q"]) == 0
    loaded = load_model(out)
    np.testing.assert_array_equal(
        read_array(all_tensors(loaded.proto)["W1"], loaded.base_dir), expected)


def test_a_symlinked_model_file_still_loads_lazily(tmp_path: Path) -> None:
    """A lazy load points at the model file itself, which may be a link to elsewhere."""
    real = tmp_path / "store" / "blob"
    real.parent.mkdir()
    real.write_bytes(fuzz.build_rich_model().SerializeToString())
    link = tmp_path / "model" / "model.onnx"
    link.parent.mkdir()
    link.symlink_to(real)
    loaded = load_model(link, lazy=True)
    eager = load_model(real)
    lazy_tensors, eager_tensors = all_tensors(loaded.proto), all_tensors(eager.proto)
    assert lazy_tensors["W1"].data_location == TensorProto.EXTERNAL
    for name in ("W1", "Wf", "Wh"):
        np.testing.assert_array_equal(read_array(lazy_tensors[name], loaded.base_dir),
                                      read_array(eager_tensors[name], eager.base_dir))


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("offset", "-64", "not a non-negative integer"),
    ("offset", "abc", "not a non-negative integer"),
    ("offset", " 12", "not a non-negative integer"),
    ("offset", "1e3", "not a non-negative integer"),
    ("offset", "0" * 5000, "not a non-negative integer"),
    ("offset", str(2**40), "truncated"),
    ("length", "-1", "not a non-negative integer"),
    ("length", "16", "does not match its shape"),
    ("length", str(64 * 64 * 4 + 4), "does not match its shape"),
    ("location", "x" * 5000, "cannot be read"),
    ("location", "nul\0byte.bin", "not a file name"),
    ("location", "missing.bin", "missing"),
], ids=lambda value: value if len(str(value)) < 30 else f"{str(value)[:8]}...x{len(value)}")
@pytest.mark.parametrize("place", ["initializer", "function_body", "tensors_attribute"])
def test_bad_offsets_lengths_and_locations_are_refused(case, capsys, key: str, value: str,
                                                       problem: str, place: str) -> None:
    path, _ = case
    edit(path, PLACES[place], **{key: value})
    assert_refused(path, capsys, f"'{PLACES[place]}'", problem)


def test_a_range_past_the_end_of_the_file_is_refused_before_mapping(case, capsys) -> None:
    path, _ = case
    data = path.parent / fuzz.DATA_NAME
    size = data.stat().st_size
    edit(path, "W1", offset=str(size - 100))
    assert_refused(path, capsys, "'W1'", "truncated")


def test_read_array_checks_containment_without_load_model(case, tmp_path: Path) -> None:
    """A proto built in memory (the Python API) is checked when its tensors are read."""
    path, canary = case
    model = onnx.load(str(path), load_external_data=False)
    tensor = all_tensors(model)["W1"]
    fuzz._set_external(tensor, location="../canary.bin", offset="0")
    with pytest.raises(ModelLoadError, match="outside"):
        read_array(tensor, path.parent)
    (path.parent / "link.bin").symlink_to(canary)
    fuzz._set_external(tensor, location="link.bin")
    with pytest.raises(ModelLoadError, match="outside"):
        read_array(tensor, path.parent)


@pytest.mark.parametrize("external", [False, True])
def test_function_and_tensors_attribute_data_follow_the_output(case, tmp_path: Path,
                                                               external: bool) -> None:
    """Tensors in function bodies and TENSORS attributes are copied with the rest, so the
    output in another folder reads the same values (not the input's file names)."""
    path, _ = case
    if not external:
        path.write_bytes(fuzz.build_rich_model().SerializeToString())
    source = load_model(path)
    expected = {name: read_array(t, source.base_dir).copy()
                for name, t in all_tensors(source.proto).items()}
    out = tmp_path / "elsewhere" / "pruned.onnx"
    out.parent.mkdir()
    assert main(["prune", str(path), "-o", str(out), "--min-size", "16", "-q"]) == 0
    full = onnx.load(str(out))  # onnx resolves the output's own external data
    got = all_tensors(full)
    for name in ("Wf", "Wh"):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(got[name]), expected[name])
        assert {e.value for e in got[name].external_data if e.key == "location"} <= {
            "pruned.onnx.data"}
