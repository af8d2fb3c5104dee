"""`prune --structure S --sparsity F --pattern N:M [--format F]`: whole channels removed
first, then N:M on what is left (`stages.py`), with the report, provenance and masks of both
stages, and OUT written only when both succeed."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import example_feeds
from onnx import numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.config import Pattern
from onnxprune.io import load_model
from onnxprune.patterns import nm_holds
from onnxprune.stages import unstructured_method
from onnxprune.targets import Selection, discover_targets

# (model, --structure and the selection that finds groups in it)
CASES = [
    ("transformer.onnx", ["--structure", "ffn"]),
    ("mlp.onnx", ["--structure", "channels", "--min-size", "0"]),
    ("cnn.onnx", ["--structure", "channels", "--min-size", "0"]),
]


def _weights(path) -> dict[str, np.ndarray]:
    """Every stored tensor of the main graph: initializers and Constant-node values."""
    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _prune(models_dir, tmp_path, name, structure, *extra, out="out.onnx") -> tuple:
    """(output path, exit status) of one `prune` run on a demo model."""
    path = tmp_path / out
    status = main(["prune", str(models_dir / name), "-o", str(path), "--sparsity", "0.25",
                   *structure, *extra])
    return path, status


@pytest.mark.parametrize("name, structure", CASES)
def test_shrunk_then_2_4_keeps_the_shrunk_values_and_runs(models_dir, tmp_path, name,
                                                          structure):
    """The output has the shrunk model's shapes, every N:M target holds 2:4 along its
    reduction axis, and every value it keeps is the shrunk model's, bit for bit."""
    shrunk_path, status = _prune(models_dir, tmp_path, name, structure, out="shrunk.onnx")
    assert status == 0
    out, status = _prune(models_dir, tmp_path, name, structure, "--pattern", "2:4",
                         "--report", str(tmp_path / "r.json"))
    assert status == 0
    shrunk, pruned = _weights(shrunk_path), _weights(out)
    assert {k: v.shape for k, v in pruned.items()} == {k: v.shape for k, v in shrunk.items()}
    for tensor, values in pruned.items():
        kept = values != 0
        np.testing.assert_array_equal(values[kept], shrunk[tensor][kept])
    report = json.loads((tmp_path / "r.json").read_text())
    names = {t["name"] for t in report["targets"]}
    assert names and all(t["pattern"] == "2:4" and t["meets_plan"] for t in report["targets"])
    loaded = load_model(out)
    targets, _ = discover_targets(loaded.proto, Selection(min_size=0, pattern=Pattern(2, 4)))
    checked = [t for t in targets if t.name in names]
    assert len(checked) == len(names)
    for target in checked:
        assert nm_holds(target, pruned[target.tensor_name], 2, 4), target.name
        assert np.count_nonzero(pruned[target.tensor_name]) == target.numel // 2
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for output in session.run(None, example_feeds(models_dir / name)):
        assert np.isfinite(output).all()
    assert report["structured"]["then"] == {"method": "magnitude", "pattern": "2:4",
                                            "format": "dense", "sparsity": 0.5}
    assert report["config"]["sparsity"] == 0.25  # the structured share, not the pattern's
    assert report["structured"]["sparsity"] > 0


def test_compact_output_densifies_to_the_dense_output(models_dir, tmp_path):
    name, structure = CASES[0]
    dense, _ = _prune(models_dir, tmp_path, name, structure, "--pattern", "2:4",
                      out="dense.onnx")
    compact, status = _prune(models_dir, tmp_path, name, structure, "--pattern", "2:4",
                             "--format", "compact", out="compact.onnx")
    assert status == 0 and compact.stat().st_size < 0.7 * dense.stat().st_size
    restored = tmp_path / "restored.onnx"
    assert main(["densify", str(compact), "-o", str(restored)]) == 0
    want, got = _weights(dense), _weights(restored)
    assert set(got) == set(want)
    for tensor, values in want.items():
        np.testing.assert_array_equal(got[tensor], values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact.onnx", "dense.onnx",
                                                          "restored.onnx"]


def test_masks_and_provenance_of_both_stages(models_dir, tmp_path):
    name, structure = CASES[0]
    masks_path, report_path = tmp_path / "m.npz", tmp_path / "r.json"
    out, status = _prune(models_dir, tmp_path, name, structure, "--pattern", "2:4",
                         "--save-masks", str(masks_path), "--report", str(report_path))
    assert status == 0
    report = json.loads(report_path.read_text())
    masks = onnxprune.MaskSet.load(masks_path)
    groups = report["structured"]["groups"]
    targets = report["targets"]
    # groups are named by producer outputs, targets by tensor names: no name is both
    assert set(masks) == {g["name"] for g in groups} | {t["name"] for t in targets}
    assert len(masks) == len(groups) + len(targets)
    for group in groups:
        assert int(masks[group["name"]].sum()) == group["kept"]
    weights = _weights(out)
    for target in targets:
        np.testing.assert_array_equal(masks[target["name"]], weights[target["name"]] != 0)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["onnxprune:structure"] == "ffn"
    assert props["onnxprune:structure_method"] == "magnitude"
    assert props["onnxprune:structure_sparsity"] == "0.25"
    assert props["onnxprune:groups"] == " ".join(
        f"{g['name']}:{g['channels']}->{g['kept']}" for g in groups if g["kept"] < g["channels"])
    assert props["onnxprune:pattern"] == "2:4" and props["onnxprune:sparsity"] == "0.5"
    assert props["onnxprune:sparsity_digest"] == report["provenance"][
        "onnxprune:sparsity_digest"]
    assert main(["inspect", str(out)]) == 0


def test_python_api_in_memory_equals_the_written_file(models_dir, tmp_path):
    name = "mlp.onnx"
    options = dict(structure="channels", sparsity=0.25, min_size=0, pattern="2:4")
    model, report = onnxprune.prune(str(models_dir / name), **options)
    written, _ = onnxprune.prune(str(models_dir / name), tmp_path / "o.onnx", **options)
    assert report.structured["then"]["pattern"] == "2:4" and report.targets
    onnx.save(model, str(tmp_path / "in_memory.onnx"))
    in_memory = _weights(tmp_path / "in_memory.onnx")
    for tensor, values in _weights(tmp_path / "o.onnx").items():
        np.testing.assert_array_equal(in_memory[tensor], values)
    source = onnx.load(str(models_dir / name))
    result = onnxprune.PrunePass(**options)(source)  # ensures: every target meets 2:4
    assert result.modified and len(source.graph.initializer[0].dims) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_memory.onnx", "o.onnx"]


def test_format_alone_stores_what_is_left_and_says_it_gains_nothing(models_dir, tmp_path,
                                                                    capsys):
    name, structure = CASES[0]
    shrunk, _ = _prune(models_dir, tmp_path, name, structure, out="shrunk.onnx")
    capsys.readouterr()
    out, status = _prune(models_dir, tmp_path, name, structure, "--format", "compact")
    assert status == 0
    assert "the shrunk model has no zeros" in capsys.readouterr().err
    want, got = _weights(shrunk), _weights(out)
    for tensor, values in want.items():
        np.testing.assert_array_equal(got[tensor], values)


def test_the_n_m_method_follows_the_channel_score():
    assert unstructured_method("magnitude")[0] == "magnitude"
    assert unstructured_method("random")[0] == "random"
    assert unstructured_method("wanda")[0] == "wanda"
    method, why = unstructured_method("flap")
    assert method == "wanda" and "calibrated" in why


def test_flap_then_2_4_is_calibrated_by_wanda(models_dir, tmp_path):
    name, structure = CASES[0]
    report_path = tmp_path / "r.json"
    _, status = _prune(models_dir, tmp_path, name, structure, "--method", "flap",
                       "--pattern", "2:4", "--report", str(report_path))
    assert status == 0
    report = json.loads(report_path.read_text())
    assert report["structured"]["then"]["method"] == "wanda"
    assert all(t["method"] == "wanda" and t["calibration_tokens"] for t in report["targets"])
    assert report["provenance"]["onnxprune:structure_method"] == "flap"


def test_a_recipe_spells_the_combination_and_its_overrides_reach_the_second_stage(
        models_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('structure = "ffn"\nsparsity = 0.25\npattern = "2:4"\n'
                      '[[override]]\nmatch = "lm_head"\nskip = true\n'
                      '[[override]]\nmatch = "attn\\\\.q_proj"\npattern = "4:8"\n')
    out, report_path = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["prune", str(models_dir / "transformer.onnx"), "-o", str(out), "--recipe",
                 str(recipe), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    patterns = {t["name"]: t["pattern"] for t in report["targets"]}
    assert "lm_head.weight" not in patterns and patterns["attn.q_proj.weight"] == "4:8"
    assert patterns["ffn.fc1.weight"] == "2:4"
    assert {g["kept"] for g in report["structured"]["groups"]} == {384}


def test_sparsity_with_a_pattern_is_the_structured_share_not_a_contradiction(
        models_dir, tmp_path, capsys):
    name, structure = CASES[0]
    _, status = _prune(models_dir, tmp_path, name, structure, "--pattern", "2:4")
    assert status == 0 and "is ignored" not in capsys.readouterr().err


def test_a_refused_second_stage_leaves_no_file(models_dir, tmp_path, capsys):
    """--include picks the group by its name, which no tensor has: the shrink succeeds,
    the N:M stage finds no target, and neither OUT nor the shrunk model stays behind."""
    out, status = _prune(models_dir, tmp_path, "transformer.onnx",
                         ["--structure", "ffn", "--include", "/ffn\\.fc1/MatMul"],
                         "--pattern", "2:4")
    err = capsys.readouterr().err
    assert status == 2 and "after --structure, nothing to prune" in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
