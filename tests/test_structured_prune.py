"""`prune --structure`: groups scored, kept counts chosen and rounded, the model shrunk, and
the result equal to the original with the removed channels zeroed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import example_feeds

import onnxprune
from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.io import load_model
from onnxprune.structured import ChannelGroup, Member, MemberRole, StructureKind
from onnxprune.structured.run import prune_structured
from onnxprune.structured.scores import GroupMagnitude, RandomChannels
from onnxprune.structured.selection import (
    global_counts,
    keep_sets,
    rounded_count,
    uniform_counts,
)
from onnxprune.structured.surgery import zeroed

DEMO = ("digits.onnx", "mlp.onnx", "cnn.onnx", "transformer.onnx")


def _group(channels: int, multiple_of: int = 1, name: str = "g") -> ChannelGroup:
    return ChannelGroup(name, StructureKind.CHANNELS, channels,
                        (Member("w", 1, MemberRole.OUTPUT),), multiple_of=multiple_of)


def test_kept_counts_round_to_the_nearest_unit_and_never_vanish():
    assert rounded_count(_group(256), 0.5 * 256, 8) == 128
    assert rounded_count(_group(256), 100.2, 8) == 104  # 12.53 units: 13
    assert rounded_count(_group(256), 99.0, 8) == 96  # 12.38 units: 12
    assert rounded_count(_group(256), 100.0, 8) == 104  # a half keeps more
    assert rounded_count(_group(256), 0.0, 8) == 8  # one unit at least
    assert rounded_count(_group(22), 21, 8) == 22  # a rounding above the count keeps all
    assert rounded_count(_group(96, multiple_of=3), 40, 8) == 48  # lcm(8, 3) = 24
    heads = ChannelGroup("h", StructureKind.HEADS, 3, (Member("q", 1, MemberRole.OUTPUT, 0, 192),
                                                      Member("k", 1, MemberRole.OUTPUT, 0, 64)))
    assert rounded_count(heads, 1.5, 8) == 2  # a head of 64 columns is already 8-aligned
    assert rounded_count(heads, 0.75 * 3, 8) == 2  # 25 % of 3 heads: one goes
    assert rounded_count(_group(99), 99.0, 8) == 99  # sparsity 0 keeps all, not 96
    assert rounded_count(_group(99), 97.0, 1) == 97
    mixed = ChannelGroup("m", StructureKind.HEADS, 8, (Member("q", 1, MemberRole.OUTPUT, 0, 96),
                                                      Member("k", 1, MemberRole.OUTPUT, 0, 64)))
    assert rounded_count(mixed, 3, 128) == 4  # q: 4 x 96 = 384 = 3 x 128; k: 256
    counts = uniform_counts([_group(64, name="a"), _group(100, name="b")], 0.25, 8)
    assert counts == {"a": 48, "b": 72}  # 75 wanted: 9.4 units of 8


def test_global_counts_remove_the_lowest_normalized_scores_up_to_the_budget():
    a, b = _group(8, name="a"), _group(8, name="b")
    # group a's scores are all alike; b has four channels far below its mean
    scores = {"a": np.ones(8), "b": np.array([0.01] * 4 + [2.0] * 4)}
    counts = global_counts([a, b], scores, {"a": 10.0, "b": 10.0}, 0.25, 1)
    assert counts == {"a": 8, "b": 4}


def test_keep_sets_take_the_best_scores_ties_to_the_lower_index():
    group = _group(6)
    keep = keep_sets([group], {"g": np.array([3.0, 1.0, 3.0, 5.0, 1.0, 0.0])}, {"g": 3})
    np.testing.assert_array_equal(keep["g"], [0, 2, 3])
    assert keep_sets([group], {"g": np.zeros(6)}, {"g": 6}) == {}  # all kept: untouched


def test_group_norm_is_the_norm_over_every_member():
    rng = np.random.default_rng(0)
    out, into, bias = rng.normal(size=(5, 4)), rng.normal(size=(4, 3)), rng.normal(size=4)
    group = ChannelGroup("g", StructureKind.CHANNELS, 4, (
        Member("out", 1, MemberRole.OUTPUT), Member("in", 0, MemberRole.INPUT),
        Member("b", 0, MemberRole.PER_CHANNEL)))
    got = GroupMagnitude().scores(group, {"out": out, "in": into, "b": bias})
    want = [np.sqrt((out[:, c] ** 2).sum() + (into[c] ** 2).sum() + bias[c] ** 2)
            for c in range(4)]
    np.testing.assert_allclose(got, want)
    first = RandomChannels().scores(group, {}, seed=1)
    assert np.array_equal(first, RandomChannels().scores(group, {}, seed=1))
    assert not np.array_equal(first, RandomChannels().scores(group, {}, seed=2))


@pytest.mark.parametrize("model", DEMO)
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_shrunk_model_computes_what_the_zeroed_model_computes(models_dir, model, method):
    loaded = load_model(models_dir / model)
    config = PruneConfig(structure="channels", sparsity=0.5, method=method, min_size=0)
    result = prune_structured(loaded, config)
    assert result.keep and result.params_after < result.params_before
    groups = [g for g in _groups(loaded.proto) if g.name in result.keep]
    reference = zeroed(loaded.proto, groups, result.keep)
    feeds = example_feeds(models_dir / model)
    want = _run(reference, feeds)
    got = _run(result.model, feeds)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    for report in result.groups:
        assert report.kept == report.channels or report.kept % config.round_to == 0
        assert report.params_removed == report.params * (report.channels - report.kept) \
            // report.channels


def test_cli_prune_structure_reports_groups_masks_and_provenance(models_dir, tmp_path,
                                                                 capsys):
    out, report_path, masks_path = (tmp_path / "o.onnx", tmp_path / "r.json",
                                    tmp_path / "m.npz")
    status = main(["prune", str(models_dir / "digits.onnx"), "-o", str(out), "--structure",
                   "channels", "--sparsity", "0.25", "--report", str(report_path),
                   "--save-masks", str(masks_path), "--validate", "--data",
                   str(models_dir / "digits-test.npz"), "--min-top1", "0.95"])
    text = capsys.readouterr().out
    assert status == 0 and "PASSED" in text
    report = json.loads(report_path.read_text())["structured"]
    groups = sorted(report["groups"], key=lambda g: g["channels"])
    assert [(g["channels"], g["kept"]) for g in groups] == [(128, 96), (256, 192)]
    assert report["params_after"] == report["params_before"] - report["removed_params"]
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["onnxprune:structure"] == "channels"
    assert sorted(props["onnxprune:groups"].split()) == sorted(
        f"{g['name']}:{g['channels']}->{g['kept']}" for g in groups)
    masks = onnxprune.MaskSet.load(masks_path)
    assert [int(masks[g["name"]].sum()) for g in groups] == [96, 192]


@pytest.mark.parametrize("args, message", [
    (["--structure", "rows"], "--structure rows: choose from channels, ffn, heads"),
    (["--structure", "channels", "--steps", "3"], "cannot be combined with --structure"),
    (["--structure", "channels", "--rounds", "2"], "cannot be combined with --structure"),
    (["--structure", "channels", "--permute-channels"], "--permute-channels cannot be"),
    (["--structure", "channels", "--method", "sparsegpt"], "unknown channel score"),
    (["--structure", "channels", "--allocation", "owl"], "choose uniform, global or sensitivity"),
    (["--structure", "channels", "--format", "packed"], "unknown format 'packed'"),
    (["--structure", "channels", "--update", "admm"], "unknown structured update"),
    (["--structure", "channels", "--include", "no-such-tensor"], "nothing to prune"),
])
def test_structured_refusals_are_one_line_errors(models_dir, tmp_path, capsys, args, message):
    out = tmp_path / "o.onnx"
    assert main(["prune", str(models_dir / "digits.onnx"), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_python_api_structure(models_dir):
    for bad in (0, 8.5, True):
        with pytest.raises(ConfigError, match="--round-to must be an integer >= 1"):
            PruneConfig(structure="channels", round_to=bad)
    with pytest.raises(ConfigError, match="--calib-samples must be >= 1"):
        PruneConfig(structure="channels", method="wanda", calib_samples=0)
    model, report = onnxprune.prune(str(models_dir / "mlp.onnx"), structure="channels",
                                    sparsity=0.5, min_size=0)
    assert report.structured["params_after"] < report.structured["params_before"]
    onnx.checker.check_model(model, full_check=True)
    source = onnx.load(str(models_dir / "mlp.onnx"))
    result = onnxprune.PrunePass(structure="channels", sparsity=0.5, min_size=0)(source)
    assert result.modified and result.report.structured["params_after"] < \
        result.report.structured["params_before"]


def _groups(model: onnx.ModelProto) -> list[ChannelGroup]:
    from onnxprune.structured.analysis import find_groups

    return find_groups(model)[0]


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_every_structure_name_maps_to_kinds_of_groups():
    from onnxprune.config import STRUCTURES
    from onnxprune.structured import run

    assert set(run.STRUCTURES) == set(STRUCTURES)
    assert run.parse_structures("ffn,heads") == {StructureKind.FFN, StructureKind.HEADS}


def test_allow_hidden_lifts_the_residual_stream_decline(models_dir, capsys):
    causes = {}
    for flags in ([], ["--allow-hidden", "--allow-norm"]):
        assert main(["inspect", str(models_dir / "transformer.onnx"), "--structured",
                     "--json", *flags]) == 0
        causes[bool(flags)] = [d["cause"] for d in json.loads(capsys.readouterr().out)
                               ["declined"]]
    assert "residual_stream" in causes[False] and "residual_stream" not in causes[True]
    config = PruneConfig(structure="ffn", allow_norm=True, allow_hidden=True)
    assert config.allow_norm and config.allow_hidden


def test_a_group_whose_tensors_cannot_hold_its_channels_is_declined(models_dir):
    """conv3 and conv4 given each other's bias: the group of conv3's channels would cut a
    bias of the wrong length, so it is declined (SHAPE_MISMATCH), not an internal error."""
    from onnxprune.io import model_from_proto
    from onnxprune.structured import DeclineCause

    model = onnx.load(str(models_dir / "cnn.onnx"))
    swap = {"conv3.bias": "conv4.bias", "conv4.bias": "conv3.bias"}
    for tensor in model.graph.initializer:
        tensor.name = swap.get(tensor.name, tensor.name)
    config = PruneConfig(structure="channels", sparsity=0.5, min_size=0)
    result = prune_structured(model_from_proto(model), config)
    (misfit,) = [d for d in result.declined if d.cause is DeclineCause.SHAPE_MISMATCH]
    assert "conv4.bias" in misfit.detail


def test_structured_wanda_keeps_the_channels_its_written_out_score_ranks_first(models_dir):
    """Σ_n |W[c, n]|·‖X_c‖ over the consumer MatMul's input X (its rows on the dense model,
    every calibration sample), computed here with onnxruntime and numpy, picks the same
    kept channels as `--method wanda`."""
    path, calib = models_dir / "digits.onnx", models_dir / "digits-test.npz"
    loaded = load_model(path)
    config = PruneConfig(structure="channels", sparsity=0.5, method="wanda",
                         calib=str(calib), min_size=0)
    result = prune_structured(loaded, config)
    model = onnx.load(str(path))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    consumers = {n.input[1]: n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    groups = {g.name: g for g in _groups(model)}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(x)
                              for x in consumers.values())
    names = [o.name for o in probe.graph.output]
    with np.load(calib) as data:
        values = dict(zip(names, _run(probe, {k: data[k] for k in data.files}), strict=True))
    checked = 0
    for name, kept in result.keep.items():
        (consumer,) = [m.tensor for m in groups[name].members if m.role is MemberRole.INPUT]
        activations = values[consumers[consumer]].reshape(-1, weights[consumer].shape[0])
        norms = np.sqrt((activations.astype(np.float64) ** 2).sum(axis=0))
        naive = (np.abs(weights[consumer]).astype(np.float64) * norms[:, None]).sum(axis=1)
        want = np.sort(np.argsort(-naive, kind="stable")[:len(kept)])
        np.testing.assert_array_equal(kept, want)
        checked += 1
    assert checked == 2


def test_a_refused_output_leaves_the_file_already_there_untouched(models_dir, tmp_path,
                                                                  capsys):
    """The shrunk model is checked before it is renamed into place: when the check refuses
    it (here because the input already fails the ONNX checker), OUT keeps its old bytes."""
    model = onnx.load(str(models_dir / "mlp.onnx"))
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["junk"], value_float=1.0,
                                                  value_int=2))
    source, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    out.write_bytes(b"an earlier result")
    assert main(["prune", str(source), "-o", str(out), "--structure", "channels"]) == 2
    err = capsys.readouterr().err
    assert "fails the ONNX checker" in err and "needs a model that passes it" in err
    assert out.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "out.onnx"]


@pytest.mark.parametrize("selection, causes", [
    (["--exclude", "conv1"], {"/conv1/Conv_output_0[0:16]": "exclude"}),
    (["--include", "conv4"], {"/conv1/Conv_output_0[0:16]": "include"}),
    (["--min-size", "12000"], {"/conv1/Conv_output_0[0:16]": "min_size"}),
    (["--min-size", "20000"], {"/conv1/Conv_output_0[0:16]": "min_size",
                               "/conv4/Conv_output_0": "min_size"}),
])
def test_inspect_structured_selects_groups_as_prune_does(models_dir, tmp_path, capsys,
                                                          selection, causes):
    """`inspect --structured` honours --include/--exclude/--min-size the way `prune
    --structure` does (one function, `run.select_groups`), and lists the groups they leave
    out as not selected, with why (as data in --json)."""
    model = str(models_dir / "cnn.onnx")
    assert main(["inspect", model, "--structured", "--json", *selection]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {g["name"]: g["cause"] for g in found["not_selected"]} == causes
    selected = {g["name"] for g in found["groups"]}
    assert selected.isdisjoint(causes) and len(selected) + len(causes) == 2
    assert main(["inspect", model, "--structured", *selection]) == 0
    text = capsys.readouterr().out
    assert "not selected:" in text and all(f"  {name} (" in text for name in causes)
    report_path = tmp_path / "r.json"
    status = main(["prune", model, "-o", str(tmp_path / "o.onnx"), "--structure", "channels",
                   "--report", str(report_path), *selection])
    capsys.readouterr()
    if not selected:
        assert status == 2
        return
    report = json.loads(report_path.read_text())["structured"]
    assert status == 0 and sorted(report["not_selected"]) == sorted(causes)
    assert {g["name"] for g in report["groups"]} == selected
