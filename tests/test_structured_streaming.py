"""`prune --structure` with an output file streams: the model is read lazily, each cut tensor
is read, cut and handed to the `ModelWriter` one at a time (`surgery.Shrinking`), and the
written tensors equal what the in-memory rewrite (`shrink`) stores. A refused output leaves
nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.graph import GraphIndex
from onnxprune.io import ModelWriter, load_model, model_from_proto, read_array, tensor_nbytes
from onnxprune.io import writer as writer_module
from onnxprune.structured.analysis import find_groups
from onnxprune.structured.run import prune_structured
from onnxprune.structured.surgery import Shrinking, check_shrunk, shrink

CASES = [("transformer.onnx", "ffn,heads"), ("cnn.onnx", "channels"), ("mlp.onnx", "ffn")]


def _save_external(model: onnx.ModelProto, path: Path) -> Path:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # (saving with external data changes the proto it saves)
    onnx.save_model(copy, str(path), save_as_external_data=True,
                    location=path.name + ".weights")
    return path


def _as_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer stored in a Constant node instead."""
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t)
             for t in model.graph.initializer]
    nodes += model.graph.node
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_constant_node_weights_stream_like_initializers(models_dir, tmp_path):
    source = tmp_path / "constants.onnx"
    onnx.save(_as_constants(onnx.load(str(models_dir / "mlp.onnx"))), str(source))
    config = PruneConfig(structure="ffn", sparsity=0.5, min_size=0)
    onnxprune.prune(source, tmp_path / "out.onnx", config=config)
    want = _in_memory(source, config)
    got = _values(tmp_path / "out.onnx")
    assert sorted(got) == sorted(want) and not load_model(tmp_path / "out.onnx"
                                                          ).proto.graph.initializer
    for tensor, values in want.items():
        np.testing.assert_array_equal(got[tensor], values, err_msg=tensor)


def _values(path: Path) -> dict[str, np.ndarray]:
    loaded = load_model(path)
    return {s.name: np.array(read_array(s.tensor, loaded.base_dir))
            for s in GraphIndex(loaded.proto).stored}


def _in_memory(path: Path, config: PruneConfig) -> dict[str, np.ndarray]:
    """The tensors of the shrunk model as `shrink` stores them in memory, for `config`."""
    result = prune_structured(load_model(path), config)
    return {s.name: np.array(read_array(s.tensor, path.parent))
                          for s in GraphIndex(result.model).stored}


@pytest.mark.parametrize("name, structure", CASES)
@pytest.mark.parametrize("external", [True, False], ids=["external", "inline"])
def test_streamed_output_holds_what_the_in_memory_rewrite_stores(models_dir, tmp_path, name,
                                                                  structure, external):
    source = models_dir / name
    if external:
        source = _save_external(onnx.load(str(source)), tmp_path / name)
    out = tmp_path / "out.onnx"
    config = PruneConfig(structure=structure, sparsity=0.5, min_size=0)
    proto, report = onnxprune.prune(source, out, config=config)
    want = _in_memory(source, config)
    got = _values(out)
    assert sorted(got) == sorted(want)
    for tensor, values in want.items():
        assert got[tensor].dtype == values.dtype
        np.testing.assert_array_equal(got[tensor], values, err_msg=tensor)
    written = load_model(out)
    assert written.uses_external_data == external
    cut = [g for g in report.structured["groups"] if g["kept"] < g["channels"]]
    assert cut
    if external:  # every cut tensor went to the data file, none inline
        members = {m for g in cut for m in g["tensors"]}
        big = [t for t in written.proto.graph.initializer if t.name in members
               and tensor_nbytes(t) >= writer_module.EXTERNAL_THRESHOLD]
        assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    onnx.checker.check_model(str(out), full_check=True)
    assert {p.key: p.value for p in proto.metadata_props}["onnxprune:structure"] == structure


def test_cut_tensors_go_to_their_place_in_the_output_as_they_come(models_dir, tmp_path,
                                                                  monkeypatch):
    """Each cut tensor is written when it is given (data file, or its reserved room in the
    model file), not kept in memory until commit: memory holds one tensor at a time."""
    kept: list[tuple[int, str]] = []
    put = ModelWriter.put

    def spying_put(self, tensor, values):
        put(self, tensor, values)
        where = self._pending[id(tensor)][1]
        kept.append((values.nbytes, type(where).__name__))

    monkeypatch.setattr(ModelWriter, "put", spying_put)
    source = _save_external(onnx.load(str(models_dir / "transformer.onnx")),
                            tmp_path / "t.onnx")
    for model, written in ((source, "_Placed"), (models_dir / "transformer.onnx",
                                                 "_WrittenSlot")):  # external, lazy inline
        kept.clear()
        onnxprune.prune(model, tmp_path / "o.onnx", structure="ffn,heads", sparsity=0.5,
                        min_size=0)
        # (the data file takes tensors of EXTERNAL_THRESHOLD bytes or more; smaller ones go
        # inline in the model file, written at commit)
        assert len(kept) >= 6 and all(where == written for nbytes, where in kept
                                      if nbytes >= writer_module.EXTERNAL_THRESHOLD
                                      or written == "_WrittenSlot"), kept


def test_a_refused_streamed_output_leaves_nothing_behind(models_dir, tmp_path, capsys):
    """The checker refuses the written model before it is renamed into place: neither the
    model file nor its data file is left, and a file already at OUT keeps its bytes."""
    model = onnx.load(str(models_dir / "mlp.onnx"))
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["junk"], value_float=1.0,
                                                  value_int=2))
    source = _save_external(model, tmp_path / "bad.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier result")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["prune", str(source), "-o", str(out), "--structure", "ffn"]) == 2
    assert "fails the ONNX checker" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _mlp_groups(models_dir):
    model = onnx.load(str(models_dir / "mlp.onnx"))
    groups, _ = find_groups(model)
    keep = {g.name: np.arange(0, g.channels, 2) for g in groups}
    return model, groups, keep


def test_replace_gives_final_values_of_cut_and_uncut_tensors(models_dir):
    model, groups, keep = _mlp_groups(models_dir)
    plain = shrink(model, groups, keep)
    stored = {s.name: s.tensor for s in GraphIndex(plain).stored}
    consumer = next(m.tensor for m in groups[0].members if m.role.value == "input")
    uncut = next(name for name, t in stored.items() if t.data_type == onnx.TensorProto.FLOAT
                 and all(name not in {m.tensor for m in g.members} for g in groups))
    new_consumer = np.full(tuple(stored[consumer].dims), 0.5, np.float32)
    new_uncut = np.full(tuple(stored[uncut].dims), -1.0, np.float32)
    replaced = shrink(model, groups, keep, replace={consumer: new_consumer, uncut: new_uncut})
    check_shrunk(replaced)
    values = {s.name: read_array(s.tensor, Path(".")) for s in GraphIndex(replaced).stored}
    np.testing.assert_array_equal(values[consumer], new_consumer)
    np.testing.assert_array_equal(values[uncut], new_uncut)
    for name, tensor in stored.items():
        if name not in (consumer, uncut):
            np.testing.assert_array_equal(values[name], read_array(tensor, Path(".")))
    original = {s.name: read_array(s.tensor, Path(".")) for s in GraphIndex(model).stored}
    assert not np.all(original[uncut] == -1.0)  # the input is left as it was


@pytest.mark.parametrize("replace, words", [
    ({"nowhere": np.zeros(3, np.float32)}, "no initializer or Constant node stores"),
    ({"fc2.weight": np.zeros((3, 3), np.float32)}, "needs float32"),
])
def test_replacements_that_do_not_fit_are_value_errors(models_dir, replace, words):
    model, groups, keep = _mlp_groups(models_dir)
    names = {m.tensor for g in groups for m in g.members}
    replace = {(next(iter(sorted(names))) if k == "fc2.weight" else k): v
               for k, v in replace.items()}
    with pytest.raises(ValueError, match=words):
        Shrinking(model, groups, keep, replace=replace)


def test_an_expected_tensor_never_given_is_refused_and_nothing_written(models_dir, tmp_path):
    model, groups, keep = _mlp_groups(models_dir)
    shrinking = Shrinking(model, groups, keep)
    out = tmp_path / "o.onnx"
    with ModelWriter(model_from_proto(shrinking.model), out, expect=shrinking.tensors
                     ) as writer:
        for stored, values in list(shrinking.values())[1:]:  # the first one left out
            writer.put(stored.tensor, values)
        with pytest.raises(ValueError, match="expected but not given"):
            writer.commit()
    assert list(tmp_path.iterdir()) == []
