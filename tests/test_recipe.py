"""Recipes (`--recipe FILE.toml`): defaults from the file under the command line, per-target
overrides recorded in the report, and errors that name the line and the key."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import ConfigError

MLP = MODELS_DIR / "mlp.onnx"


def prune_with(tmp_path, recipe: str, *options: str) -> tuple[int, dict]:
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)
    report = tmp_path / "report.json"
    status = main(["prune", str(MLP), "-o", str(tmp_path / "out.onnx"), "--recipe", str(path),
                   "--report", str(report), "-q", *options])
    return status, json.loads(report.read_text()) if status == 0 else {}


def by_name(report: dict) -> dict[str, dict]:
    return {t["name"]: t for t in report["targets"]}


def test_top_level_keys_are_defaults_and_options_win(tmp_path):
    recipe = 'sparsity = 0.7\nmethod = "l1"\nmin_size = 5000\n'
    status, report = prune_with(tmp_path, recipe)
    assert status == 0
    assert report["config"]["method"] == "l1" and report["config"]["min_size"] == 5000
    assert set(by_name(report)) == {"fc1.weight", "fc2.weight"}  # fc3 (4096) below 5000
    assert all(t["requested_sparsity"] == 0.7 for t in report["targets"])
    status, report = prune_with(tmp_path, recipe, "--sparsity", "0.5", "--method",
                                "magnitude")
    assert report["config"]["sparsity"] == 0.5 and report["config"]["method"] == "magnitude"
    assert report["config"]["min_size"] == 5000


def test_overrides_set_targets_and_the_report_says_which(tmp_path):
    recipe = """sparsity = 0.5

[[override]]
match = "^fc1\\\\."
sparsity = 0.3

[[override]]
match = "fc3"
skip = true

[[override]]
match = "fc[12]"
method = "l1"

[[override]]
match = "fc2"
pattern = "2:4"
"""
    status, report = prune_with(tmp_path, recipe)
    assert status == 0
    targets = by_name(report)
    assert set(targets) == {"fc1.weight", "fc2.weight"}
    fc1, fc2 = targets["fc1.weight"], targets["fc2.weight"]
    assert fc1["requested_sparsity"] == 0.3 and fc1["sparsity"] == pytest.approx(0.3, abs=1e-5)
    assert fc1["method"] == "l1" and fc1["pattern"] == "unstructured"
    assert fc1["set_by"] == "override 1 (line 3) + override 3 (line 11)"
    assert fc2["pattern"] == "2:4" and fc2["method"] == "l1" and fc2["is_2_4"]
    assert fc2["set_by"] == "override 3 (line 11) + override 4 (line 15)"
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert skipped["fc3.weight"] == "skipped by override 2 (line 7)"
    weights = {t.name: numpy_helper.to_array(t)
               for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MLP)).graph.initializer}
    assert np.array_equal(weights["fc3.weight"], original["fc3.weight"])  # skipped: untouched
    kept = weights["fc1.weight"] != 0  # l1: survivors shrunk
    assert np.all(np.abs(weights["fc1.weight"][kept]) < np.abs(original["fc1.weight"][kept]))


def test_last_matching_override_wins(tmp_path):
    recipe = ('[[override]]\nmatch = "fc"\nsparsity = 0.2\n\n'
              '[[override]]\nmatch = "fc2"\nsparsity = 0.6\n')
    _, report = prune_with(tmp_path, recipe)
    targets = by_name(report)
    assert targets["fc2.weight"]["requested_sparsity"] == 0.6
    assert targets["fc1.weight"]["requested_sparsity"] == 0.2


def test_include_from_the_command_line_replaces_the_recipes(tmp_path):
    _, report = prune_with(tmp_path, 'include = ["fc1"]\n', "--include", "fc2")
    assert set(by_name(report)) == {"fc2.weight"}
    _, report = prune_with(tmp_path, 'include = ["fc1", "fc3"]\n')
    assert set(by_name(report)) == {"fc1.weight", "fc3.weight"}


@pytest.mark.parametrize("recipe, expected", [
    ('sparsity = 0.5\nsparsty = 0.7\n', "line 2: unknown key 'sparsty'"),
    ('sparsity = 1.5\n', "line 1: sparsity: must be in [0, 1)"),
    ('\n\nmin_size = "big"\n', "line 3: min_size: expected an integer"),
    ('method = "magic"\n', "line 1: method: unknown method 'magic'"),
    ('pattern = "3:2"\n', "line 1: pattern: pattern 3:2"),
    ('validate = "yes"\n', "line 1: validate: expected true or false"),
    ('schedule = "linear"\n', "line 1: schedule: expected one of cubic, geometric"),
    ('output = "x.onnx"\n', "line 1: unknown key 'output'"),
    ('[extras]\nx = 1\n', "line 1: unknown key 'extras'"),
    ('sparsity = 0.5\nextras.x = 1\n', "line 2: unknown key 'extras'"),
    ('sparsity = 0.5\n[[override]]\nmatch = "fc"\nsparsity = 2\n',
     "line 4: sparsity: must be in [0, 1)"),
    ('[[override]]\nmatch = "fc"\n\n[[override]]\nmatch = "x"\nspars = 0.1\n',
     "line 6: unknown key 'spars' in [[override]]"),
    ('[[override]]\nsparsity = 0.1\n', "line 1: [[override]] needs a 'match'"),
    ('[[override]]\nmatch = "fc("\n', "line 2: match: bad regular expression"),
    ('[[override]]\nmatch = "fc"\nskip = 1\n', "line 3: skip: expected true or false"),
    ('sparsity = \n', "not valid TOML"),
])
def test_bad_recipes_name_the_line_and_key(tmp_path, capsys, recipe, expected):
    status, _ = prune_with(tmp_path, recipe)
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("onnxprune: error: ") and err.count("\n") == 1
    assert expected in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_missing_recipe_file(tmp_path, capsys):
    status = main(["prune", str(MLP), "-o", str(tmp_path / "o.onnx"), "--recipe",
                   str(tmp_path / "none.toml")])
    assert status == 2 and "no such recipe file" in capsys.readouterr().err


def test_override_that_does_not_fit_a_target(tmp_path, capsys):
    recipe = '[[override]]\nmatch = "fc3"\npattern = "2:4"\n\n[[override]]\nmatch = "fc3"\n' \
             'sparsity = 0.3\n'
    status, _ = prune_with(tmp_path, recipe)
    assert status == 2
    assert "override 2 (line 5): sparsity 0.3 with pattern 2:4" in capsys.readouterr().err


def test_overrides_in_the_python_api():
    _, report = onnxprune.prune(str(MLP), sparsity=0.5,
                                overrides=[{"match": "fc1", "sparsity": 0.25},
                                           {"match": "fc3", "skip": True}])
    targets = {t.name: t for t in report.targets}
    assert set(targets) == {"fc1.weight", "fc2.weight"}
    assert targets["fc1.weight"].requested_sparsity == 0.25
    assert targets["fc1.weight"].set_by == "override 1"
    assert targets["fc2.weight"].set_by == "uniform"
    with pytest.raises(ConfigError, match="unknown key 'sparsty'"):
        onnxprune.PruneConfig(overrides=[{"match": "x", "sparsty": 0.1}])


def test_recipe_sets_a_gradual_schedule(tmp_path):
    status, report = prune_with(tmp_path, 'sparsity = 0.8\nschedule = "cubic"\nsteps = 3\n')
    assert status == 0
    assert report["config"]["schedule"]["steps"] == 3
    assert report["config"]["schedule"]["sparsities"][-1] == 0.8
