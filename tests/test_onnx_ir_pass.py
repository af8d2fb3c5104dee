"""`onnxprune.passes.PrunePass` inside `onnx_ir.passes.PassManager`, beside onnx_ir's own
passes: the same weights and outputs as `onnxprune.prune`, in-place and functional runs,
`modified`, and onnx_ir's pre/postcondition errors."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DEMO_TARGETS, example_feeds
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.errors import ConfigError, NothingToPruneError
from onnxprune.formats import stored_formats
from onnxprune.patterns import prune_count
from onnxprune.registry import METHODS

ir = pytest.importorskip("onnx_ir")
common_passes = pytest.importorskip("onnx_ir.passes.common")
from onnxprune.passes import PrunePass  # noqa: E402  (needs onnx_ir)


def _stored(model: ir.Model) -> dict[str, np.ndarray]:
    """Copies of the main graph's initializers and Constant-node values, by name."""
    values = {v.name: np.array(v.const_value.numpy()) for v in model.graph.initializers.values()
              if v.const_value is not None}
    for node in model.graph:
        if node.op_type == "Constant" and "value" in node.attributes:
            values[node.outputs[0].name] = np.array(node.attributes["value"].as_tensor().numpy())
    return values


def _proto_stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _outputs(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same_outputs(got: ir.Model, want: onnx.ModelProto, feeds: dict) -> None:
    for a, b in zip(_outputs(got, feeds), _outputs(want, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


def _groups_of(weights: np.ndarray, axis: int, m: int) -> np.ndarray:
    """[groups, m]: consecutive runs of m along `axis` (naive, for the N:M checks)."""
    return np.moveaxis(weights, axis, -1).reshape(-1, m)


@pytest.mark.parametrize("name", sorted(DEMO_TARGETS))
def test_pass_manager_prunes_like_prune(models_dir, name):
    path = models_dir / name
    model = ir.load(str(path))
    before = _stored(model)
    graph, nodes = model.graph, list(model.graph)
    prune_pass = PrunePass(sparsity=0.6)
    result = ir.passes.PassManager([prune_pass, common_passes.RemoveUnusedNodesPass(),
                                    common_passes.TopologicalSortPass()])(model)
    assert result.modified and result.model is model
    # dense pruning changes tensor values only: same graph, same nodes
    assert model.graph is graph and list(model.graph) == nodes
    want, _ = onnxprune.prune(str(path), sparsity=0.6)
    got, reference = _stored(model), _proto_stored(want)
    assert sorted(t.name for t in prune_pass.report.targets) == sorted(DEMO_TARGETS[name])
    for target in DEMO_TARGETS[name]:
        pruned, dense = got[target], before[target]
        assert np.count_nonzero(pruned == 0) == prune_count(dense.size, 0.6)
        kept = pruned != 0
        assert (pruned[kept].view(np.uint32) == dense[kept].view(np.uint32)).all()
        assert pruned.tobytes() == reference[target].tobytes()
    for other in set(before) - set(DEMO_TARGETS[name]):
        assert got[other].tobytes() == before[other].tobytes()
    assert model.metadata_props["onnxprune:sparsity"] == "0.6"
    _assert_same_outputs(model, want, example_feeds(path))


def test_in_place_false_returns_a_new_model_and_leaves_the_input(models_dir):
    model = ir.load(str(models_dir / "cnn.onnx"))
    snapshot = ir.to_proto(model)
    prune_pass = PrunePass(in_place=False, sparsity=0.5)
    assert not prune_pass.in_place and not prune_pass.changes_input
    result = ir.passes.PassManager([prune_pass, common_passes.RemoveUnusedNodesPass()])(model)
    assert result.modified and result.model is not model
    assert ir.to_proto(model) == snapshot
    got = _stored(result.model)
    assert np.count_nonzero(got["conv2.weight"] == 0) == prune_count(got["conv2.weight"].size,
                                                                      0.5)
    # the tensors the prune left alone are shared with the input, not copied
    for name, value in model.graph.initializers.items():
        shared = result.model.graph.initializers[name].const_value is value.const_value
        assert shared == (name not in DEMO_TARGETS["cnn.onnx"])


def test_in_place_changes_the_given_model(models_dir):
    model = ir.load(str(models_dir / "mlp.onnx"))
    snapshot = ir.to_proto(model)
    prune_pass = PrunePass(sparsity=0.5)
    assert prune_pass.in_place and prune_pass.changes_input
    result = prune_pass(model)
    assert result.model is model and ir.to_proto(model) != snapshot
    weights = model.graph.initializers["fc1.weight"].const_value.numpy()
    assert np.count_nonzero(weights == 0) == prune_count(weights.size, 0.5)


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("options", [
    dict(sparsity=0.0),
    dict(sparsity=0.0, format="compact"),
    dict(structure="ffn", sparsity=0.0),
], ids=["dense", "compact", "structured"])
def test_nothing_to_do_is_not_modified(models_dir, options, in_place):
    model = ir.load(str(models_dir / "transformer.onnx"))
    snapshot = ir.to_proto(model)
    prune_pass = PrunePass(in_place=in_place, **options)
    result = prune_pass(model)
    assert not result.modified and (result.model is model) == in_place
    assert ir.to_proto(model) == snapshot and ir.to_proto(result.model) == snapshot
    assert prune_pass.report is not None


@pytest.mark.parametrize("options", [dict(sparsity=0.7), dict(pattern="2:4")],
                         ids=["unstructured", "2:4"])
@pytest.mark.parametrize("in_place", [True, False])
def test_pruning_again_at_the_same_level_changes_nothing(models_dir, options, in_place):
    model = ir.load(str(models_dir / "mlp.onnx"))
    assert PrunePass(**options)(model).modified
    pruned = ir.to_proto(model)
    again = PrunePass(in_place=in_place, **options)(model)
    assert not again.modified and (again.model is model) == in_place
    assert ir.to_proto(model) == pruned and ir.to_proto(again.model) == pruned


def test_a_repeating_pass_manager_stops_when_a_round_changes_nothing(models_dir):
    class Counted(PrunePass):
        calls = 0

        def call(self, model):
            self.calls += 1
            return super().call(model)

    model = ir.load(str(models_dir / "mlp.onnx"))
    counted = Counted(sparsity=0.5)
    manager = ir.passes.PassManager([counted, common_passes.RemoveUnusedNodesPass()],
                                    steps=4, early_stop=True)
    assert manager(model).modified
    assert counted.calls == 2  # the second round changed nothing: no third


def test_2_4_through_the_pass_manager(models_dir):
    path = models_dir / "transformer.onnx"
    model = ir.load(str(path))
    before = _stored(model)
    prune_pass = PrunePass(pattern="2:4")
    result = ir.passes.PassManager([common_passes.TopologicalSortPass(), prune_pass,
                                    common_passes.RemoveUnusedNodesPass()])(model)
    assert result.modified
    want, _ = onnxprune.prune(str(path), pattern="2:4")
    got, reference = _stored(model), _proto_stored(want)
    for target, axis in DEMO_TARGETS["transformer.onnx"].items():
        groups = _groups_of(got[target], axis, 4)
        assert ((groups != 0).sum(axis=1) == 2).all()
        dense_groups = _groups_of(before[target], axis, 4)
        kept = groups != 0
        # the two largest magnitudes of every group are the ones kept, bit for bit
        assert (np.abs(dense_groups[kept]).reshape(-1, 2).min(axis=1)
                >= np.abs(dense_groups[~kept]).reshape(-1, 2).max(axis=1)).all()
        assert (groups[kept] == dense_groups[kept]).all()
        assert got[target].tobytes() == reference[target].tobytes()
    assert all(t.is_2_4 and t.meets_plan for t in prune_pass.report.targets)
    _assert_same_outputs(model, want, example_feeds(path))


@pytest.mark.parametrize("name, options", [
    ("transformer.onnx", dict(structure="ffn", sparsity=0.5)),
    ("mlp.onnx", dict(structure="channels", sparsity=0.25, min_size=0, pattern="2:4")),
], ids=["ffn", "channels-then-2:4"])
@pytest.mark.parametrize("in_place", [True, False])
def test_structured_through_the_pass_manager(models_dir, name, options, in_place):
    path = models_dir / name
    model = ir.load(str(path))
    snapshot = ir.to_proto(model)
    prune_pass = PrunePass(in_place=in_place, **options)
    result = ir.passes.PassManager([prune_pass, common_passes.RemoveUnusedNodesPass()])(model)
    assert result.modified and (result.model is model) == in_place
    if not in_place:
        assert ir.to_proto(model) == snapshot
    structured = prune_pass.report.structured
    assert structured["params_after"] < structured["params_before"]
    want, _ = onnxprune.prune(str(path), **options)
    got, reference = _stored(result.model), _proto_stored(want)
    assert got.keys() == reference.keys()
    for tensor, values in reference.items():
        assert got[tensor].shape == values.shape and got[tensor].tobytes() == values.tobytes()
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    _assert_same_outputs(result.model, want, example_feeds(path))


def test_compact_format_and_back_to_dense(models_dir):
    path = models_dir / "transformer.onnx"
    model = ir.load(str(path))
    assert PrunePass(sparsity=0.9, format="compact")(model).modified
    assert stored_formats(ir.to_proto(model))  # rebuilt by standard ops at session start
    want, _ = onnxprune.prune(str(path), sparsity=0.9, format="compact")
    feeds = example_feeds(path)
    _assert_same_outputs(model, want, feeds)
    densified = PrunePass(in_place=False, sparsity=0.9)(model)
    assert densified.modified and not stored_formats(ir.to_proto(densified.model))
    dense, _ = onnxprune.prune(str(path), sparsity=0.9)
    got = _stored(densified.model)
    for target, values in _proto_stored(dense).items():
        assert got[target].tobytes() == values.tobytes()


def _if_model() -> onnx.ModelProto:
    """x [2, 64] -> If(cond): x @ W (an initializer of the then-branch) or x @ V (a
    Constant node of the else-branch, whose tensor has a name of its own)."""
    rng = np.random.default_rng(3)
    w, v = (numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), name)
            for name in ("W", "value_of_V"))
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 64])
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "then", [],
                             [y], [w])
    other = helper.make_graph([helper.make_node("Constant", [], ["V"], value=v),
                               helper.make_node("MatMul", ["x", "V"], ["y"])], "else", [],
                              [y])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weights_in_subgraphs_are_written_back_in_their_slots():
    source = _if_model()
    model = ir.from_proto(source)
    if_node = next(iter(model.graph))
    result = PrunePass(sparsity=0.5, min_size=0)(model)
    assert result.modified and next(iter(model.graph)) is if_node
    want, report = onnxprune.prune(source, sparsity=0.5, min_size=0)
    assert len(report.targets) == 2
    then, other = (if_node.attributes[b].as_graph() for b in ("then_branch", "else_branch"))
    got = {"W": then.initializers["W"].const_value.numpy(),
           "V": next(iter(other)).attributes["value"].as_tensor().numpy()}
    branches = {a.name: a.g for a in want.graph.node[0].attribute}
    expected = {"W": numpy_helper.to_array(branches["then_branch"].initializer[0]),
                "V": numpy_helper.to_array(branches["else_branch"].node[0].attribute[0].t)}
    for name, values in expected.items():
        assert np.count_nonzero(values == 0) == 2048
        assert got[name].tobytes() == values.tobytes()


def test_a_constant_output_that_carries_its_value_gets_the_pruned_one(models_dir):
    model = ir.load(str(models_dir / "cnn.onnx"))
    constant = next(node for node in model.graph if node.op_type == "Constant"
                    and node.outputs[0].name == "conv4.weight")
    # as onnx_ir's constant folding leaves a Constant: its output holds the value too
    constant.outputs[0].const_value = constant.attributes["value"].as_tensor()
    assert PrunePass(sparsity=0.5)(model).modified
    pruned = constant.attributes["value"].as_tensor()
    assert constant.outputs[0].const_value is pruned
    assert np.count_nonzero(pruned.numpy() == 0) == prune_count(pruned.size, 0.5)


@pytest.fixture()
def external_mlp(models_dir, tmp_path):
    """mlp.onnx saved with its tensors in `mlp.data` beside it."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(onnx.load(str(models_dir / "mlp.onnx")), str(folder / "mlp.onnx"),
              save_as_external_data=True, location="mlp.data", size_threshold=1024)
    return folder / "mlp.onnx"


def test_external_data_is_read_in_place_and_never_written(models_dir, external_mlp,
                                                          tmp_path, monkeypatch):
    data = external_mlp.with_name("mlp.data")
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)  # not the model's folder
    model = ir.load(str(external_mlp))
    bias = model.graph.initializers["fc1.bias"].const_value
    assert isinstance(bias, ir.ExternalTensor)
    assert PrunePass(sparsity=0.5)(model).modified
    assert model.graph.initializers["fc1.bias"].const_value is bias  # untouched, not read
    want, _ = onnxprune.prune(str(models_dir / "mlp.onnx"), sparsity=0.5)
    got = _stored(model)
    for tensor, values in _proto_stored(want).items():
        assert got[tensor].tobytes() == values.tobytes()
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest
    # a rebuilt graph (compact storage) still reads the tensors it left in the data file
    model = ir.load(str(external_mlp))
    assert PrunePass(sparsity=0.9, format="compact")(model).modified
    bias = model.graph.initializers["fc1.bias"].const_value
    assert isinstance(bias, ir.ExternalTensor)
    assert bias.numpy().tobytes() == _proto_stored(want)["fc1.bias"].tobytes()


def test_external_data_of_a_model_made_from_a_proto_needs_base_dir(external_mlp, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    proto = onnx.load(str(external_mlp), load_external_data=False)
    with pytest.raises(ir.passes.PreconditionError, match="external data .* not found"):
        PrunePass(sparsity=0.5)(ir.from_proto(proto))
    model = ir.from_proto(proto)
    result = PrunePass(sparsity=0.5, base_dir=external_mlp.parent, in_place=False)(model)
    weights = result.model.graph.initializers["fc2.weight"].const_value.numpy()
    assert result.modified and np.count_nonzero(weights == 0) == weights.size // 2
    structured = PrunePass(structure="channels", sparsity=0.5, min_size=0,
                           base_dir=external_mlp.parent)(model)
    assert structured.modified
    assert np.isfinite(_outputs(model, example_feeds(external_mlp))[0]).all()


def test_external_data_in_two_folders_is_a_precondition_error(external_mlp, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(external_mlp.with_name("mlp.data"), other / "mlp.data")
    model = ir.load(str(external_mlp))
    model.graph.initializers["fc1.bias"].const_value.base_dir = str(other)
    with pytest.raises(ir.passes.PreconditionError, match="several folders"):
        PrunePass(sparsity=0.5)(model)


def test_precondition_errors(models_dir):
    proto = onnx.load(str(models_dir / "mlp.onnx"))
    with pytest.raises(ir.passes.PreconditionError, match="takes an onnx_ir.Model"):
        PrunePass()(proto)
    model = ir.load(str(models_dir / "mlp.onnx"))
    snapshot = ir.to_proto(model)
    with pytest.raises(ir.passes.PreconditionError, match="nothing to prune") as caught:
        PrunePass(include="no-such-tensor")(model)
    assert isinstance(caught.value.__cause__, NothingToPruneError)
    manager = ir.passes.PassManager([common_passes.RemoveUnusedNodesPass(),
                                     PrunePass(min_size=10**9)])
    with pytest.raises(ir.passes.PassError) as wrapped:  # the manager names the failing pass
        manager(model)
    chain, error = [], wrapped.value
    while error is not None:
        chain.append(type(error))
        error = error.__cause__
    assert ir.passes.PreconditionError in chain
    assert ir.to_proto(model) == snapshot


@pytest.mark.parametrize("options, message", [
    (dict(sparsity=2), "sparsity must be in"),
    (dict(pattern="4:2"), "need 0 < N < M"),
    (dict(format="sparse"), "cannot hold"),
    (dict(structure="channels", format="sparse"), "cannot hold"),
    (dict(ria_alpha=-1.0, method="ria"), "ria"),
    (dict(no_such_option=1), "unknown option"),
])
def test_bad_options_are_refused_at_construction(options, message):
    with pytest.raises(ConfigError, match=message):
        PrunePass(**options)


def test_postcondition_error_when_a_target_misses_its_pattern(models_dir):
    class Cheat(METHODS.part_class("magnitude")):
        name = "cheat-keep-all"
        reconstructs = True
        needs = METHODS.get("sparsegpt").needs

        def reconstruct(self, job):  # the dense weights: 2:4 is not met
            return job.weights.copy()

    with pytest.raises(ir.passes.PostconditionError, match="no report"):
        PrunePass().ensures(ir.load(str(models_dir / "mlp.onnx")))
    METHODS.register(Cheat())
    try:
        prune_pass = PrunePass(pattern="2:4", method="cheat-keep-all", calib_samples=1)
        with pytest.raises(ir.passes.PostconditionError, match="miss their planned pattern"):
            prune_pass(ir.load(str(models_dir / "mlp.onnx")))
        assert {t.meets_plan for t in prune_pass.report.targets} == {False}
    finally:
        METHODS.unregister("cheat-keep-all")


def test_import_onnxprune_needs_no_onnx_ir_and_passes_names_it():
    script = ("import sys; sys.modules['onnx_ir'] = None\n"  # as if not installed
              "import onnxprune, onnxprune.api\n"
              "try:\n    import onnxprune.passes\n"
              "except ImportError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "onnxprune.passes needs onnx_ir: pip install onnx-ir"
