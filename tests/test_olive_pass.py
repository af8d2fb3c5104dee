"""The Olive pass `OnnxPrune` in a real Olive workflow: `examples/olive/workflow.json` run with
the shipped package config (wanda at 70 % on calibration batches of the held-out digits,
then Olive's static INT8 quantization with per-channel symmetric weights, then accuracy and
latency), and the pass's options, recipe and calibration data on their own.

Needs the extra (`pip install 'onnxprune[olive]'`); without Olive the module is skipped.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

pytest.importorskip("olive")

from olive.hardware import DEFAULT_CPU_ACCELERATOR  # noqa: E402
from olive.passes.olive_pass import create_pass_from_dict  # noqa: E402
from olive.workflows import run as olive_run  # noqa: E402

from onnxprune.integrations import olive as integration  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "examples" / "olive" / "workflow.json"
SPARSITY = 0.7
PRUNED = ("W1", "W2")  # the digits MLP's targets; W3 (1,280 weights) is below min-size


def workflow_config(tmp: Path, **prune_options) -> dict:
    config = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    config["cache_dir"] = str(tmp / "cache")
    config["output_dir"] = str(tmp / "output")
    config["log_severity_level"] = 3
    config["passes"]["prune"].update(prune_options)
    return config


def run_workflow(config: dict):
    """Olive resolves the workflow's relative paths against the working directory, and
    rewrites the config it is given: it gets a copy."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OLIVE_DISABLE_TELEMETRY", "1")
        patch.chdir(REPO)
        return olive_run(copy.deepcopy(config),
                         package_config=str(integration.package_config_path()))


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The example workflow, run once: (its output, its config)."""
    config = workflow_config(tmp_path_factory.mktemp("olive"))
    assert config["passes"]["prune"]["sparsity"] == SPARSITY
    return run_workflow(config), config


def evaluation_rows(config: dict) -> slice:
    data = next(d for d in config["data_configs"] if d["name"] == "digits_evaluation")
    params = data["load_dataset_config"]["params"]
    return slice(params.get("first"), params.get("last"))


def top1_accuracy(model_path: str | Path, rows: slice) -> float:
    """Top-1 accuracy against the labels, computed here with onnxruntime, not by Olive."""
    with np.load(REPO / "models" / "digits-test.npz") as archive:
        pixels = archive["pixels"][rows]
    labels = np.load(REPO / "models" / "digits-test-labels.npy")[rows]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"pixels": pixels})
    return float(np.mean(logits.argmax(axis=1) == labels))


def model_file(config: dict) -> Path:
    """The .onnx file of a model handler's config (its `model_path` may be the folder)."""
    path = Path(config["model_path"])
    return path / config["onnx_file_name"] if config.get("onnx_file_name") else path


def pruned_model(output) -> Path:
    """The model the OnnxPrune pass wrote (an intermediate of the workflow)."""
    nodes = [n for n in output.footprint.nodes.values() if n.from_pass == "onnxprune"]
    assert len(nodes) == 1
    return model_file(nodes[0].model_config_data["config"])


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_pruned_and_quantized_accuracy_stays_near_the_dense_models(workflow):
    output, config = workflow
    rows = evaluation_rows(config)
    dense = top1_accuracy(REPO / "models" / "digits.onnx", rows)
    assert dense > 0.98  # 496/500 held-out images
    measured = output.get_input_model_metrics()
    assert measured["accuracy-accuracy_score"]["value"] == pytest.approx(dense, abs=1e-6)

    final = output.get_best_candidate()
    accuracy = final.metrics_value["accuracy-accuracy_score"]["value"]
    assert accuracy == pytest.approx(top1_accuracy(model_file(final.model_config), rows),
                                     abs=1e-6)
    # 70 % of the hidden weights gone and 8-bit weights and activations: at most 2 points
    # below the dense model (measured: 99.2 % -> 98.2 %)
    assert accuracy >= dense - 0.02
    assert final.metrics_value["latency-avg"]["value"] > 0


def test_every_pruned_weight_is_zero_as_planned_and_stays_at_its_zero_point(workflow):
    output, _ = workflow
    pruned = initializers(pruned_model(output))
    report = json.loads((pruned_model(output).parent / integration.REPORT_NAME).read_text())
    planned = {t["name"]: t for t in report["targets"]}
    assert sorted(planned) == sorted(PRUNED)

    final = model_file(output.get_best_candidate().model_config)
    quantized = onnx.load(str(final))
    values = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    for name in PRUNED:
        weights = pruned[name]
        fan_in = weights.shape[0]  # MatMul B [K, N]: wanda prunes each output's K inputs
        zeros_per_output = (weights == 0).sum(axis=0)
        assert np.all(zeros_per_output == round(SPARSITY * fan_in))
        assert planned[name]["zeros"] == int((weights == 0).sum())
        assert planned[name]["method"] == "wanda"

        # the INT8 weight (onnxruntime names it <weight>_quantized) and its DequantizeLinear:
        # symmetric per output channel, so every pruned weight is exactly its zero point (0),
        # and no other weight is
        node = next(n for n in quantized.graph.node if n.op_type == "DequantizeLinear"
                    and n.input[0] == f"{name}_quantized")
        integers, zero_point = values[node.input[0]], values[node.input[2]]
        assert integers.dtype == np.int8 and np.all(zero_point == 0)
        np.testing.assert_array_equal(integers == 0, weights == 0)
    assert not np.any(pruned["W3"] == 0)  # skipped, below min-size


def test_report_lies_beside_the_pruned_model_and_travels_to_the_output(workflow):
    output, config = workflow
    report_path = pruned_model(output).parent / integration.REPORT_NAME
    report = json.loads(report_path.read_text())
    assert report["config"]["method"] == "wanda"
    assert report["config"]["sparsity"] == SPARSITY
    assert report["output"] == str(pruned_model(output))
    carried = Path(config["output_dir"]) / integration.REPORT_NAME
    assert json.loads(carried.read_text()) == report


def test_a_misspelt_option_stops_the_workflow_with_a_suggestion(tmp_path):
    config = workflow_config(tmp_path, sparsty=0.5)
    config["evaluate_input_model"] = False
    with pytest.raises(ValueError, match=r"unknown option 'sparsty' \(did you mean 'sparsity'\?\)"):
        run_workflow(config)


def test_a_bad_combination_stops_the_workflow_with_onnxprunes_message(tmp_path):
    config = workflow_config(tmp_path, structure="channels", method="sparsegpt")
    config["evaluate_input_model"] = False
    with pytest.raises(ValueError, match="OnnxPrune: unknown channel score 'sparsegpt'"):
        run_workflow(config)


def test_pass_config_wins_over_the_recipe_and_overrides_reach_prune(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('sparsity = 0.5\nmethod = "wanda"\nria_alpha = 0.7\n'
                      '[[override]]\nmatch = "W2"\nsparsity = 0.25\n', encoding="utf-8")
    onnx_pass = create_pass_from_dict(integration.OnnxPrune,
                                      {"recipe": str(recipe), "sparsity": 0.6},
                                      disable_search=True)
    settings = integration.prune_settings(onnx_pass.config)
    assert settings == {"sparsity": 0.6, "method": "wanda", "ria_alpha": 0.7,
                        "overrides": [{"match": "W2", "sparsity": 0.25}]}
    assert integration.OnnxPrune.validate_config(onnx_pass.config, DEFAULT_CPU_ACCELERATOR)

    recipe.write_text("steps = 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'steps' is a command-line option"):
        integration.prune_settings(onnx_pass.config)


def test_every_prune_option_is_a_pass_option_or_named_as_command_line_only():
    """A new option of `onnxprune prune` (a recipe key) or of PruneConfig must be taken by
    the pass, or be listed as one it does not take."""
    import dataclasses

    from onnxprune import PruneConfig
    from onnxprune.cli.parser import build_parser

    taken = set(integration.option_names()) | {"calib"}  # calib: data_config, or a recipe's
    recipe_keys = {action.dest for action in build_parser().prune_parser._actions
                   if any(s.startswith("--") for s in action.option_strings)}
    recipe_keys -= {"help", "output", "recipe"}
    assert recipe_keys - taken == set(integration.COMMAND_LINE_ONLY)
    fields = {field.name for field in dataclasses.fields(PruneConfig)}
    assert fields - taken == {"options"}  # the part options, taken one by one


def test_sparsity_and_method_are_searched_by_default():
    _, _, space = integration.OnnxPrune.get_config_params(DEFAULT_CPU_ACCELERATOR, {})
    assert space["sparsity"].get_support() == list(integration.SPARSITY_SEARCH)
    assert space["method"].get_support() == list(integration.METHOD_SEARCH)
    # a list in the pass config is a search over its values
    _, fixed, space = integration.OnnxPrune.get_config_params(
        DEFAULT_CPU_ACCELERATOR, {"sparsity": [0.4, 0.6], "method": "ria"})
    assert space["sparsity"].get_support() == [0.4, 0.6]
    assert fixed["method"] == "ria"


def test_calibration_batches_become_npz_samples_keyed_by_input_name(tmp_path):
    config = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    data = next(d for d in config["data_configs"] if d["name"] == "digits_calibration")
    data["user_script"] = str(REPO / data["user_script"])
    from olive.model import ONNXModelHandler

    model = ONNXModelHandler(str(REPO / "models" / "digits.onnx"))
    folder = integration.write_calibration(data, model, tmp_path / "calib", limit=None)
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 7  # 97 images in batches of 16
    with np.load(files[0]) as first, np.load(files[-1]) as last:
        assert first.files == ["pixels"]
        assert first["pixels"].shape == (16, 64) and last["pixels"].shape == (1, 64)
        assert first["pixels"].dtype == np.float32
    limited = integration.write_calibration(data, model, tmp_path / "three", limit=3)
    assert len(list(limited.glob("*.npz"))) == 3


def test_external_data_is_read_and_written_as_olive_passes_do(tmp_path):
    from olive.model import ONNXModelHandler

    source = tmp_path / "in" / "digits.onnx"
    source.parent.mkdir()
    onnx.save_model(onnx.load(str(REPO / "models" / "digits.onnx")), str(source),
                    save_as_external_data=True, location="weights.bin", size_threshold=1024)
    model = ONNXModelHandler(str(source.parent), onnx_file_name=source.name)
    onnx_pass = create_pass_from_dict(integration.OnnxPrune,
                                      {"sparsity": 0.5, "save_as_external_data": True},
                                      disable_search=True)
    output = onnx_pass.run(model, str(tmp_path / "out"))
    path = Path(output.model_path)
    assert (path.parent / f"{path.name}.data").is_file()  # Olive's name for it
    assert (path.parent / integration.REPORT_NAME).is_file()
    weights = initializers(path)
    assert int((weights["W1"] == 0).sum()) == weights["W1"].size // 2


def test_the_package_config_is_olives_with_onnxprune_added(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = integration.package_config_path()
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written == integration.package_config()
    assert written["passes"]["OnnxPrune"]["module_path"] == "onnxprune.integrations.olive.OnnxPrune"
    assert "OnnxStaticQuantization" in written["passes"]  # Olive's own list is kept
    out = subprocess.run([sys.executable, "-m", "onnxprune.integrations.olive"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(path)
