"""Parts declare their options once (`parts.option`); the typed registry builds them with
those options, names what cannot be loaded, and the command line refuses bad arguments
before the heavy imports."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
from conftest import plugin_env

from onnxprune.cli import main
from onnxprune.config import PruneConfig
from onnxprune.errors import ConfigError
from onnxprune.methods import Method, WeightUpdate
from onnxprune.parts import Part, option, option_specs
from onnxprune.registry import METHODS, UPDATES, Registry, all_option_specs


class _Toy(Method):
    name = "toy-options"
    description = "a toy with every kind of option"

    @dataclass(frozen=True)
    class Options:
        count: int = option(3, minimum=1, help="a count")
        share: float = option(0.5, minimum=0.0, maximum=1.0, help="a share")
        mode: str = option("fast", choices=("fast", "slow"), help="a mode")
        strict: bool = option(False, help="a switch")


def test_specs_come_from_the_declaration():
    specs = {s.field: s for s in option_specs(_Toy, "method")}
    assert [s.flag for s in specs.values()] == ["toy-options-count", "toy-options-share",
                                                "toy-options-mode", "toy-options-strict"]
    assert specs["count"].dest == "toy_options_count" and specs["count"].default == 3
    assert specs["share"].type is float and specs["strict"].type is bool
    assert specs["count"].check("7") == 7 and specs["share"].check(1) == 1.0
    for spec, bad in ((specs["count"], 0), (specs["count"], 2.5), (specs["share"], 1.5),
                      (specs["share"], float("nan")), (specs["mode"], "medium"),
                      (specs["strict"], "yes"), (specs["count"], True)):
        with pytest.raises(ConfigError, match="--toy-options-"):
            spec.check(bad)


def test_the_registry_builds_a_part_with_its_options():
    METHODS.register(_Toy)
    try:
        config = PruneConfig.from_settings(method="toy-options", toy_options_count=5,
                                           toy_options_mode="slow")
        part = METHODS.build("toy-options", config.options)
        assert part.options == _Toy.Options(count=5, share=0.5, mode="slow", strict=False)
        assert METHODS.build("toy-options").options == _Toy.Options()
        with pytest.raises(ConfigError, match="must be >= 1"):
            PruneConfig.from_settings(method="toy-options", toy_options_count=0)
    finally:
        METHODS.unregister("toy-options")
    with pytest.raises(ConfigError, match="unknown option 'toy_options_count'"):
        PruneConfig.from_settings(toy_options_count=5)


def test_built_in_options_keep_their_names_and_defaults():
    specs = {s.dest: s for s in all_option_specs()}
    expected = {"ria_alpha": 0.5, "admm_iters": 20, "admm_rho": 1.0, "admm_fixed_mask": False,
                "dsnot_iters": 50, "owl_threshold": 5.0, "owl_lambda": 0.08,
                "sparsegpt_block_size": 128, "sparsegpt_damp": 0.01, "max_error": None,
                "sensitivity": None}
    assert {dest: specs[dest].default for dest in expected} == expected
    assert METHODS.build("sparsegpt", {"sparsegpt_damp": 0.05}).options.damp == 0.05
    # admm is a method and an update: one declaration, the same options either way
    assert UPDATES.build("admm", {"admm_iters": 4}).options.iters == 4
    assert isinstance(UPDATES.build("admm"), WeightUpdate)


def test_a_part_must_subclass_its_kind_and_declare_options_with_option():
    class NotAMethod(Part):
        name = "not-a-method"

    class BadOptions(Method):
        name = "bad-options"

        @dataclass(frozen=True)
        class Options:
            plain: int = 3  # not made with option(): no help, no checks

    with pytest.raises(TypeError, match="must subclass"):
        METHODS.register(NotAMethod)
    with pytest.raises(TypeError, match="option"):
        METHODS.register(BadOptions)
    assert "not-a-method" not in METHODS and "bad-options" not in METHODS


def test_a_built_in_that_cannot_be_imported_is_named_with_its_error():
    registry = Registry("method", None, ".methods.base:Method",
                        {"good": ".methods.magnitude:Magnitude",
                         "broken": "onnxprune.no_such_module:Broken"})
    for _ in range(2):  # asked again, it is still there and still says why
        with pytest.raises(ConfigError, match=r"method 'broken' cannot be loaded .*"
                                              r"ModuleNotFoundError.*no_such_module"):
            registry.get("broken")
        assert registry.names() == ["good", "broken"]


def test_a_broken_plugin_is_named_with_its_import_error(models_dir, tmp_path):
    env = plugin_env(tmp_path, "toy_broken", "import no_such_dependency\n",
                     "[onnxprune.methods]\ntoy-broken = toy_broken:Method\n")
    run = subprocess.run([sys.executable, "-m", "onnxprune", "prune",
                          str(models_dir / "mlp.onnx"), "-o", str(tmp_path / "o.onnx"),
                          "--method", "toy-broken"], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("onnxprune: error: method plug-in 'toy-broken' (toy_broken:Method) "
                           "cannot be loaded: ModuleNotFoundError"), run.stderr
    assert "no_such_dependency" in last
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "2"], "argument --sparsity: must be in [0, 1), got 2"),
    (["--min-size", "-1"], "argument --min-size: must be >= 0, got -1"),
    (["--calib-samples", "0"], "argument --calib-samples: must be >= 1, got 0"),
    (["--admm-rho", "0"], "argument --admm-rho: must be > 0, got 0"),
    (["--ria-alpha", "x"], "argument --ria-alpha: expected a number, got 'x'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_arguments_are_one_line_errors(models_dir, tmp_path, capsys, args, message):
    out = tmp_path / "o.onnx"
    with pytest.raises(SystemExit) as ended:
        main(["prune", str(models_dir / "mlp.onnx"), "-o", str(out), *args])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not out.exists()


def test_a_bad_argument_is_refused_before_numba_and_onnx_are_imported(models_dir):
    code = ("import sys\nfrom onnxprune.cli import main\n"
            "try:\n    main(['prune', 'm.onnx', '-o', 'o.onnx', '--sparsity', '1.5'])\n"
            "except SystemExit as e:\n    print(e.code)\n"
            "print(sorted(m for m in ('numba', 'onnx', 'onnxruntime', 'scipy') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.split("\n")[:2] == ["2", "[]"], run.stdout + run.stderr


def test_help_explains_arguments_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for expected in ("the .onnx file to prune", "where the pruned model is written",
                     "examples:", "exit status: 0 success, 1 validation failed, 2 user error",
                     "options of method ria", "--ria-alpha A"):
        assert expected in text
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    text = capsys.readouterr().out
    assert "the model whose outputs are taken as right" in text and "exit status" in text


def test_an_option_of_a_part_the_run_does_not_use_is_named_in_a_warning(models_dir, tmp_path,
                                                                         capsys):
    assert main(["prune", str(models_dir / "mlp.onnx"), "-o", str(tmp_path / "o.onnx"),
                 "--ria-alpha", "2", "--owl-lambda", "0.1", "--method", "ria"]) == 0
    err = capsys.readouterr().err
    assert "--owl-lambda ignored: the run uses method ria, allocation uniform" in err
    assert "--ria-alpha" not in err


def test_a_plugin_is_imported_only_when_asked_for(models_dir, tmp_path):
    marker = tmp_path / "imported"
    env = plugin_env(tmp_path, "toy_lazy",
                     f"open({str(marker)!r}, 'w').close()\n"
                     "import numpy as np\n"
                     "from onnxprune.methods import Method\n"
                     "class Toy(Method):\n    name = 'toy-lazy'\n"
                     "    def scores(self, job):\n"
                     "        return np.abs(job.weights.astype(np.float32))\n",
                     "[onnxprune.methods]\ntoy-lazy = toy_lazy:Toy\n")

    def onnxprune_cli(*args):
        return subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True,
                              text=True, env=env)

    out = str(tmp_path / "o.onnx")
    assert onnxprune_cli("prune", str(models_dir / "mlp.onnx"), "-o", out,
                         "--sparsity", "2").returncode == 2
    assert onnxprune_cli("--help").returncode == 0
    assert not marker.exists()
    assert onnxprune_cli("prune", str(models_dir / "mlp.onnx"), "-o", out,
                         "--method", "toy-lazy").returncode == 0
    assert marker.exists()
