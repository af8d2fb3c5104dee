"""Gradual one-shot (`--schedule cubic --steps K`) and iterative pruning (`--rounds`,
`--retrain-cmd`, `--rewind`): schedules, growing masks, retrain commands and their failures."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import numpy_helper

from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.mask_files import MaskSet
from onnxprune.schedule import prune_gradual, prune_iterative, sparsities

MLP = MODELS_DIR / "mlp.onnx"
TARGETS = ("fc1.weight", "fc2.weight", "fc3.weight")


def weights_of(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def assert_nested(masks: list[MaskSet]) -> None:
    """A weight pruned in one pass stays pruned in every later pass."""
    for earlier, later in zip(masks, masks[1:], strict=False):
        for name in earlier:
            assert not (later[name] & ~earlier[name]).any(), name


# ------------------------------------------------------------------------ schedules

def test_cubic_schedule_follows_the_formula():
    levels = sparsities(0.9, 4, "cubic")
    expected = [0.9 + (0.0 - 0.9) * (1 - t / 4) ** 3 for t in range(1, 5)]
    assert levels == pytest.approx(expected, abs=1e-15)
    assert levels[-1] == 0.9
    assert all(a < b for a, b in zip(levels, levels[1:], strict=False))
    assert levels[0] - 0 > levels[-1] - levels[-2]  # large steps first


def test_geometric_schedule_removes_equal_fractions_of_what_remains():
    levels = sparsities(0.9, 3, "geometric")
    density = [1.0] + [1 - s for s in levels]
    ratios = [b / a for a, b in zip(density, density[1:], strict=False)]
    assert ratios == pytest.approx([0.1 ** (1 / 3)] * 3)
    assert levels[-1] == 0.9


@pytest.mark.parametrize("bad", [dict(passes=0), dict(schedule="linear")])
def test_schedule_rejects_bad_settings(bad):
    with pytest.raises(ConfigError):
        sparsities(0.5, **{"passes": 2, "schedule": "cubic", **bad})


# ------------------------------------------------------------------------ gradual

def test_gradual_magnitude_masks_grow_and_end_as_one_shot(tmp_path):
    config = PruneConfig(sparsity=0.8)
    _, report = prune_gradual(MLP, tmp_path / "g.onnx", config=config, steps=3,
                              save_masks=tmp_path / "step-{round}.npz", return_masks=True)
    steps = [MaskSet.load(tmp_path / f"step-{t}.npz") for t in (1, 2, 3)]
    assert_nested(steps)
    levels = sparsities(0.8, 3, "cubic")
    for mask, level in zip(steps, levels, strict=True):
        for name in TARGETS:  # each step reaches its level exactly
            kept = int(mask[name].sum())
            assert mask[name].size - kept == int(np.floor(level * mask[name].size + 0.5))
    # magnitude scores do not change between steps: the nested masks end where one shot does
    main(["prune", str(MLP), "-o", str(tmp_path / "one.onnx"), "--sparsity", "0.8", "-q"])
    gradual, one_shot = weights_of(tmp_path / "g.onnx"), weights_of(tmp_path / "one.onnx")
    for name in gradual:
        assert np.array_equal(gradual[name], one_shot[name]), name
    assert report.config["schedule"]["sparsities"] == levels
    assert report.summary.zeros_before == 0


def test_gradual_l1_composes_like_one_soft_threshold():
    """Soft-thresholds compose, S_a(S_b(w)) = S_(a+b)(w), and each step's threshold is
    measured on the weights shrunk so far: three steps to 60 % end where one step does."""
    gradual, _ = prune_gradual(MLP, config=PruneConfig(sparsity=0.6, method="l1"), steps=3)
    one_step, _ = prune_gradual(MLP, config=PruneConfig(sparsity=0.6, method="l1"), steps=1)
    a = {t.name: numpy_helper.to_array(t) for t in gradual.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in one_step.graph.initializer}
    original = weights_of(MLP)
    for name in TARGETS:
        assert np.array_equal(a[name] != 0, b[name] != 0)
        assert np.allclose(a[name], b[name], atol=1e-6)
        assert np.abs(a[name]).sum() < 0.5 * np.abs(original[name]).sum()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gradual_calibrated_methods_keep_masks_growing(tmp_path, method):
    _, report = prune_gradual(MLP, config=PruneConfig(sparsity=0.7, method=method,
                                                      calib_samples=4),
                              steps=2, save_masks=tmp_path / "s{round}.npz")
    assert_nested([MaskSet.load(tmp_path / f"s{t}.npz") for t in (1, 2)])
    assert all(t.meets_plan for t in report.targets)


def test_cli_gradual(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["prune", str(MLP), "-o", str(out), "--sparsity", "0.75", "--schedule",
                 "cubic", "--steps", "4", "--report", str(report), "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["config"]["schedule"]["steps"] == 4
    assert data["model"] == str(MLP)
    for target in data["targets"]:
        assert target["zeros"] == int(np.floor(0.75 * target["numel"] + 0.5))


@pytest.mark.parametrize("options, message", [
    (["--schedule", "cubic"], "needs --steps"),
    (["--steps", "2", "--rounds", "2"], "--steps is for gradual"),
    (["--steps", "2", "--pattern", "2:4"], "unstructured pattern"),
    (["--steps", "0"], ">= 1"),
    (["--rounds", "2", "--retrain-cmd", "cp {in} x.onnx"], "must contain {out}"),
    (["--rounds", "2", "-o", "/nonexistent/dir/out.onnx"], "does not exist"),
])
def test_cli_rejects_bad_schedules(tmp_path, capsys, options, message):
    out = tmp_path / "out.onnx"
    assert main(["prune", str(MLP), "-o", str(out), *options]) == 2  # a second -o wins
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("onnxprune: error:")
    assert not out.exists()


# ------------------------------------------------------------------------ IMP via the CLI

RETRAIN_SCRIPT = """
import sys
import numpy as np
import onnx
from onnx import numpy_helper

source, target = sys.argv[1], sys.argv[2]
fail_round = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if fail_round and f"round{fail_round}-" in source:
    print("loading data...", file=sys.stderr)
    print("RuntimeError: boom in round", fail_round, file=sys.stderr)
    sys.exit(7)
model = onnx.load(source)
rng = np.random.default_rng(0)
for tensor in model.graph.initializer:
    values = numpy_helper.to_array(tensor)
    # "training" that revives every pruned weight
    values = values + rng.normal(0, 1e-3, values.shape).astype(values.dtype)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
onnx.save(model, target)
"""


@pytest.fixture
def retrain_script(tmp_path):
    path = tmp_path / "retrain.py"
    path.write_text(RETRAIN_SCRIPT)
    return f"{sys.executable} {path} {{in}} {{out}}"


@pytest.mark.slow
def test_cli_imp_reapplies_masks_after_each_retrain(tmp_path, capsys, retrain_script):
    out = tmp_path / "out.onnx"
    assert main(["prune", str(MLP), "-o", str(out), "--sparsity", "0.8", "--rounds", "3",
                 "--retrain-cmd", retrain_script, "--save-masks",
                 str(tmp_path / "m{round}.npz"), "--report", str(tmp_path / "r.json"),
                 "-q"]) == 0
    rounds = [MaskSet.load(tmp_path / f"m{r}.npz") for r in (1, 2, 3)]
    assert_nested(rounds)
    final = weights_of(out)
    for name in TARGETS:
        assert np.array_equal(final[name] != 0, rounds[-1][name])
        assert final[name].size - np.count_nonzero(final[name]) == \
            int(np.floor(0.8 * final[name].size + 0.5))
    history = json.loads((tmp_path / "r.json").read_text())["config"]["schedule"]["history"]
    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(h["revived"] > 0 for h in history)  # the script revived them; zeroed again
    assert list(tmp_path.glob(".onnxprune-rounds-*")) == []  # the work folder is gone


def test_cli_failing_retrain_stops_with_its_exit_code(tmp_path, capsys, retrain_script):
    out = tmp_path / "out.onnx"
    status = main(["prune", str(MLP), "-o", str(out), "--rounds", "2",
                   "--retrain-cmd", retrain_script + " 1"])
    err = capsys.readouterr().err
    assert status == 7
    assert err.count("\n") == 1 and "exit code 7" in err and "boom in round 1" in err
    assert "loading data" in err  # the stderr tail, on one line
    assert not out.exists()


@pytest.mark.slow
def test_cli_keep_last_good_writes_the_last_completed_round(tmp_path, capsys, retrain_script):
    out = tmp_path / "out.onnx"
    status = main(["prune", str(MLP), "-o", str(out), "--rounds", "3", "--sparsity", "0.8",
                   "--retrain-cmd", retrain_script + " 3", "--keep-last-good",
                   "--save-masks", str(tmp_path / "m{round}.npz")])
    err = capsys.readouterr().err
    assert status == 7 and "model of round 2 is kept" in err
    kept = weights_of(out)
    round2 = MaskSet.load(tmp_path / "m2.npz")
    for name in TARGETS:
        assert np.array_equal(kept[name] != 0, round2[name])


def test_retrain_command_that_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["prune", str(MLP), "-o", str(out), "--retrain-cmd", "true {in} {out}"]) == 2
    assert "wrote no model" in capsys.readouterr().err and not out.exists()


def test_rewind_must_fit_the_model(tmp_path, capsys):
    other = MODELS_DIR / "cnn.onnx"
    assert main(["prune", str(MLP), "-o", str(tmp_path / "o.onnx"), "--rewind",
                 str(other)]) == 2
    assert "--rewind" in capsys.readouterr().err


def test_imp_without_retraining_prunes_further_each_round():
    config = PruneConfig(sparsity=0.9, method="l1")
    model, report = prune_iterative(MLP, config=config, rounds=2, return_masks=True)
    assert [round(h["sparsity"], 6) for h in report.config["schedule"]["history"]] == \
        [round(1 - 0.1 ** 0.5, 6), 0.9]
    assert all(t.zeros == int(np.floor(0.9 * t.numel + 0.5)) for t in report.targets)
