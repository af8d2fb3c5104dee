"""The one prune loop: plans, masks as data, registered parts, the pass contract."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import example_feeds, plugin_env
from layer_cases import prune_matmul
from onnx import helper, numpy_helper

import onnxprune
from onnxprune import pipeline
from onnxprune.cli import main
from onnxprune.mask_files import MaskSet
from onnxprune.patterns import nm_holds, prune_count
from onnxprune.registry import METHODS
from onnxprune.targets import discover_targets

METHOD_NAMES = ("magnitude", "random", "wanda", "obd", "sparsegpt")


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    targets, _ = discover_targets(model)
    return {t.name: numpy_helper.to_array(t.tensor) for t in targets}


def _calib(path: Path, tmp_path: Path, samples: int = 4) -> Path:
    feeds = [example_feeds(path, seed) for seed in range(samples)]
    file = tmp_path / f"{path.stem}-calib.npz"
    np.savez(file, **{name: np.stack([f[name] for f in feeds]) for name in feeds[0]})
    return file


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("model_name", ["mlp.onnx", "cnn.onnx", "transformer.onnx"])
def test_saved_masks_reproduce_zero_positions_with_any_method(models_dir, tmp_path, model_name,
                                                               pattern):
    path = models_dir / model_name
    calib = _calib(path, tmp_path)
    first, masks_file = tmp_path / "first.onnx", tmp_path / "masks.npz"
    assert main(["prune", str(path), "-o", str(first), "--method", "wanda", "--calib",
                 str(calib), "--pattern", pattern, "--save-masks", str(masks_file), "-q"]) == 0
    masks = MaskSet.load(masks_file)
    pruned = _weights(first)
    assert set(masks) == set(pruned)
    for name, weights in pruned.items():
        np.testing.assert_array_equal(masks[name], weights != 0)
    dense = _weights(path)
    for method in METHOD_NAMES:
        out = tmp_path / f"{method}.onnx"
        assert main(["prune", str(path), "-o", str(out), "--method", method, "--calib",
                     str(calib), "--apply-masks", str(masks_file), "-q"]) == 0
        for name, weights in _weights(out).items():
            np.testing.assert_array_equal(weights == 0, ~masks[name], err_msg=(method, name))
            if method != "sparsegpt":  # no reconstruction: kept values bit-identical
                keep = masks[name]
                assert weights[keep].tobytes() == dense[name][keep].tobytes()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_an_existing_mask_is_never_revived(models_dir, tmp_path, method):
    path = models_dir / "cnn.onnx"
    _, light = onnxprune.prune(str(path), sparsity=0.3, method="random", return_masks=True)
    model, report = onnxprune.prune(str(path), sparsity=0.6, method=method, masks=light.masks,
                                    fixed_masks=False, return_masks=True,
                                    calib=_calib(path, tmp_path))
    for target in report.targets:
        old, new = light.masks[target.name], report.masks[target.name]
        assert not (new & ~old).any(), target.name  # nothing pruned before is kept now
        assert target.meets_plan and target.sparsity >= 0.59  # wanda rounds per row


def test_unknown_mask_name_and_wrong_shape_are_exit_2(models_dir, tmp_path, capsys):
    path = models_dir / "mlp.onnx"
    weights = _weights(path)
    bad_name = tmp_path / "name.npz"
    MaskSet.from_arrays({"no.such.weight": np.ones(4, bool)}).save(bad_name)
    name = next(iter(weights))
    bad_shape = tmp_path / "shape.npz"
    MaskSet.from_arrays({name: np.ones((3, 3), bool)}).save(bad_shape)
    for file, words in ((bad_name, "no such target"), (bad_shape, "has shape")):
        out = tmp_path / "out.onnx"
        assert main(["prune", str(path), "-o", str(out), "--apply-masks", str(file)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and not out.exists()


def test_masks_file_is_bit_packed_with_shapes(models_dir, tmp_path):
    path = models_dir / "transformer.onnx"
    _, report = onnxprune.prune(str(path), sparsity=0.5, return_masks=True)
    file = report.masks.save(tmp_path / "m.npz")
    with np.load(file) as npz:
        index = json.loads(npz["__onnxprune_masks__"].tobytes())
        for target in report.targets:
            packed = npz[target.name]
            assert packed.dtype == np.uint8 and packed.size == (target.numel + 7) // 8
            assert index["shapes"][target.name] == target.shape


def test_float64_kept_values_are_bit_identical_for_calibrated_methods(tmp_path):
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((64, 96))
    w2 = rng.standard_normal((96, 32)) * np.pi
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "f64",
        [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [8, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [8, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "f64.onnx"
    onnx.save(model, str(path))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((4, 8, 64)))
    for method in ("wanda", "obd"):
        out = tmp_path / f"{method}.onnx"
        onnxprune.prune(str(path), str(out), method=method, calib=str(calib), min_size=0)
        for name, before in (("w1", w1), ("w2", w2)):
            after = numpy_helper.to_array(next(t for t in onnx.load(str(out)).graph.initializer
                                               if t.name == name))
            kept = after != 0
            assert kept.mean() == pytest.approx(0.5, abs=0.01)
            assert after[kept].tobytes() == before[kept].tobytes(), (method, name)


def test_report_shows_requested_and_achieved_per_target(models_dir, tmp_path):
    report_file = tmp_path / "r.json"
    assert main(["prune", str(models_dir / "mlp.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--allocation", "global", "--sparsity", "0.7", "--report",
                 str(report_file), "-q"]) == 0
    report = json.loads(report_file.read_text())
    targets = report["targets"]
    assert {t["set_by"] for t in targets} == {"global"}
    assert sum(t["zeros"] for t in targets) == prune_count(sum(t["numel"] for t in targets), 0.7)
    for t in targets:  # the global plan is an exact count per target, met exactly
        assert t["requested_sparsity"] == pytest.approx(t["sparsity"])
        assert t["meets_plan"] is True
    assert report["config"]["allocation"] == "global"


def test_global_allocation_equals_one_threshold_over_all_targets(models_dir):
    path = models_dir / "transformer.onnx"
    dense = _weights(path)
    model, report = onnxprune.prune(str(path), sparsity=0.6, scope="global")
    everything = np.concatenate([np.abs(w).ravel() for w in dense.values()])
    threshold = np.sort(everything)[prune_count(everything.size, 0.6) - 1]
    for target in report.targets:
        pruned = numpy_helper.to_array(next(t for t in model.graph.initializer
                                            if t.name == target.name))
        below = np.abs(dense[target.name]) < threshold
        assert (pruned[below] == 0).all()
        assert (pruned[np.abs(dense[target.name]) > threshold] != 0).all()


def test_prune_pass_contract_and_sequence(models_dir):
    model = onnx.load(str(models_dir / "mlp.onnx"))
    first = onnxprune.PrunePass(sparsity=0.5)
    second = onnxprune.PrunePass(pattern="2:4")
    result = onnxprune.Sequential(first, second)(model)
    assert result.modified
    for target in discover_targets(result.model)[0]:
        assert nm_holds(target, numpy_helper.to_array(target.tensor), 2, 4)
    with pytest.raises(Exception, match="takes an onnx.ModelProto"):
        first("not a model")
    again = onnxprune.PrunePass(sparsity=0.0)(model)
    assert not again.modified


def test_ensures_catches_a_method_that_breaks_the_pattern(models_dir):
    class Cheat(METHODS.part_class("magnitude")):
        name = "cheat-revive"
        reconstructs = True
        needs = METHODS.get("sparsegpt").needs

        def reconstruct(self, job):  # returns the dense weights: pattern not met
            return job.weights.copy()

    METHODS.register(Cheat())
    try:
        with pytest.raises(onnxprune.api.PassError, match="miss their planned pattern"):
            onnxprune.PrunePass(pattern="2:4", method="cheat-revive")(
                onnx.load(str(models_dir / "mlp.onnx")))
    finally:
        METHODS.unregister("cheat-revive")


README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_plugin() -> tuple[str, str, str]:
    """The worked plug-in example of the README: module text, entry point name and value."""
    text = README.read_text()
    section = text[text.index("## Extending"):]
    module = re.search(r"```python\n(# toy_plugin.py\n.*?)```", section, re.S).group(1)
    name, value = re.search(r'^([\w-]+) = "(toy_plugin:\w+)"$', section, re.M).groups()
    return module, name, value


def _install_readme_plugin(folder: Path) -> tuple[str, dict[str, str]]:
    """(its entry point's name, an environment where the README's plug-in is installed)."""
    module, entry_name, entry_value = _readme_plugin()
    return entry_name, plugin_env(folder, "toy_plugin", module,
                                  f"[onnxprune.methods]\n{entry_name} = {entry_value}\n")


@pytest.mark.slow
def test_a_method_from_an_entry_point_runs_from_the_cli(models_dir, tmp_path):
    entry_name, env = _install_readme_plugin(tmp_path)
    out = tmp_path / "out.onnx"
    help_text = subprocess.run([sys.executable, "-m", "onnxprune", "prune", "--help"],
                               capture_output=True, text=True, env=env, check=True).stdout
    assert "toy-largest" in re.sub(r"-\s+", "-", help_text)  # argparse wraps at hyphens
    run = subprocess.run([sys.executable, "-m", "onnxprune", "prune",
                          str(models_dir / "mlp.onnx"), "-o", str(out), "--method",
                          "toy-largest"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    dense = _weights(models_dir / "mlp.onnx")
    for name, weights in _weights(out).items():
        kept = np.abs(dense[name][weights != 0])
        pruned = np.abs(dense[name][weights == 0])
        assert kept.max() <= pruned.min()  # the largest went


@pytest.mark.slow
def test_a_plugins_option_reaches_help_recipes_and_its_constructor(models_dir, tmp_path):
    """The README's plug-in declares `power` once, on itself: nothing else is touched."""
    entry_name, env = _install_readme_plugin(tmp_path)

    def onnxprune_cli(*args):
        return subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True,
                              text=True, env=env)

    help_text = re.sub(r"\s+", " ", onnxprune_cli("prune", "--help").stdout)
    assert "--toy-largest-power POWER toy-largest: exponent of the magnitude (>= 0) [1.0]" \
        in help_text
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'method = "{entry_name}"\ntoy_largest_power = 2.5\n')
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    run = onnxprune_cli("prune", str(models_dir / "mlp.onnx"), "-o", str(out), "--recipe",
                        str(recipe), "--report", str(report))
    assert run.returncode == 0, run.stderr
    assert json.loads(report.read_text())["config"]["toy_largest_power"] == 2.5
    recipe.write_text(f'method = "{entry_name}"\ntoy_largest_power = -1\n')
    run = onnxprune_cli("prune", str(models_dir / "mlp.onnx"), "-o", str(out), "--recipe",
                        str(recipe))
    assert run.returncode == 2
    assert "line 2: toy_largest_power: must be >= 0, got -1" in run.stderr
    built = subprocess.run(
        [sys.executable, "-c", "from onnxprune.config import PruneConfig\n"
         "from onnxprune.registry import METHODS\n"
         f"c = PruneConfig.from_settings(method='{entry_name}', toy_largest_power=3)\n"
         f"print(repr(METHODS.build('{entry_name}', c.options).options))"],
        capture_output=True, text=True, env=env, check=True).stdout
    assert built.strip() == "LargestFirst.Options(power=3.0)"


def _two_matmuls(path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"],
                                                                         ["y"])], "two",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 96])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 50])],
        [numpy_helper.from_array(rng.standard_normal((96, 64)).astype(np.float32), "a"),
         numpy_helper.from_array(rng.standard_normal((64, 50)).astype(np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_targets_dropped_by_the_pattern_are_warned_about_and_named(tmp_path, capsys):
    path = tmp_path / "two.onnx"
    _two_matmuls(path)
    out = tmp_path / "out.onnx"
    assert main(["prune", str(path), "-o", str(out), "--pattern", "2:3", "--min-size",
                 "0"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 weights skipped: reduction axis not a multiple of 3 (pattern 2:3)" in err
    assert main(["prune", str(path), "-o", str(out), "--pattern", "2:7", "--min-size",
                 "0"]) == 2
    err = capsys.readouterr().err
    assert "2 reduction axis not a multiple of 7" in err and "--min-size" not in err
    assert main(["prune", str(path), "-o", str(out), "--include", "^zz$"]) == 2
    assert "2 not matched by --include" in capsys.readouterr().err


def test_input_shapes_shape_synthetic_calibration(models_dir, tmp_path):
    report_file = tmp_path / "r.json"
    assert main(["prune", str(models_dir / "transformer.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--method", "wanda", "--calib-samples", "3", "--input-shapes",
                 "input_ids:[1,7]", "--report", str(report_file), "-q"]) == 0
    tokens = {t["calibration_tokens"] for t in json.loads(report_file.read_text())["targets"]}
    assert tokens == {3 * 7}


@pytest.mark.parametrize("method, mode, measured", [
    ("wanda", "one-pass", False), ("ria", "one-pass", False), ("sparsegpt", "one-pass", True),
    ("wanda", "sequential", True)])
def test_one_pass_gives_up_errors_beyond_the_hessian_budget(monkeypatch, caplog, method,
                                                              mode, measured):
    # XᵀX of every input at once only for the report's errors would not fit a large model;
    # the mask must not change, and parts that use XᵀX (sparsegpt) still get it
    settings = {"method": method, "calib_mode": mode, "measure_error": False}
    _, unlimited, _, full = prune_matmul(**settings)
    monkeypatch.setattr(pipeline, "ONE_PASS_HESSIAN_BUDGET", 0)
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        _, limited, _, report = prune_matmul(**settings)
    np.testing.assert_array_equal(limited, unlimited)
    assert full.reconstruction_error is not None
    assert (report.reconstruction_error is not None) == measured
    assert ("errors are not measured" in caplog.text) == (not measured)
