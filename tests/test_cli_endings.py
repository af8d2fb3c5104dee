"""How a CLI run ends when it does not end normally: Ctrl-C, a closed stdout pipe; and the
mode of the files it writes besides the model."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cli, pipeline
from onnxprune.cli import main

MLP = MODELS_DIR / "mlp.onnx"


@pytest.fixture
def model_copy(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    shutil.copy(MLP, path)
    return path


def _interrupt_in_compiled_code() -> None:
    """What a Ctrl-C inside a numba kernel raises: a SystemError whose context is the
    KeyboardInterrupt the signal handler set while the kernel ran."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise SystemError("<numba.core.registry.CPUDispatcher object> returned a result "
                          "with an exception set") from None


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt", [_interrupt_in_compiled_code, _raise_keyboard_interrupt],
                         ids=["inside-compiled-code", "plain"])
def test_ctrl_c_is_interrupted_130(interrupt, monkeypatch, capsys, model_copy):
    monkeypatch.setitem(cli.COMMANDS, "inspect", lambda args: interrupt())
    assert main(["inspect", str(model_copy)]) == 130
    captured = capsys.readouterr()
    assert captured.err == "onnxprune: interrupted\n"
    assert captured.out == ""


def test_ctrl_c_while_the_output_is_written_leaves_nothing(monkeypatch, capsys, model_copy):
    real_put = pipeline.Sink.put
    calls = []

    def put_then_interrupt(self, *args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 2:  # the first target's bytes are already in the temporary file
            _interrupt_in_compiled_code()
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Sink, "put", put_then_interrupt)
    before = model_copy.read_bytes()
    out = model_copy.parent / "out.onnx"
    status = main(["prune", str(model_copy), "-o", str(out), "--report",
                   str(model_copy.parent / "r.json")])
    assert status == 130
    assert capsys.readouterr().err == "onnxprune: interrupted\n"
    assert len(calls) == 2
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["mlp.onnx"]
    assert model_copy.read_bytes() == before


def test_interrupt_chain_is_not_confused_with_other_errors(monkeypatch, capsys, model_copy):
    def plain_bug(args):
        try:
            raise ValueError("inner")
        except ValueError:
            raise SystemError("outer") from None

    monkeypatch.setitem(cli.COMMANDS, "inspect", plain_bug)
    assert main(["inspect", str(model_copy)]) == 3
    assert capsys.readouterr().err.startswith("onnxprune: internal error: SystemError: outer")


def _model_with_many_tensors(path: Path, count: int = 600) -> Path:
    """A valid model whose `inspect --json` runs to well over a pipe's buffer."""
    nodes, inits = [], []
    previous = "x"
    for i in range(count):
        name = f"a_rather_long_name_for_bias_number_{i:04d}"
        inits.append(numpy_helper.from_array(np.full(4, i, np.float32), name))
        nodes.append(helper.make_node("Add", [previous, name], [f"y{i}"]))
        previous = f"y{i}"
    graph = helper.make_graph(nodes, "many", [helper.make_tensor_value_info("x", 1, [4])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [4])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    model = _model_with_many_tensors(tmp_path / "many.onnx")
    process = subprocess.Popen([sys.executable, "-m", "onnxprune", "inspect", "--json",
                                str(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first write (`| head -0`)
    _, err = process.communicate(timeout=300)
    assert process.returncode in (0, 141), err
    assert err.decode() == ""


def test_closed_stdout_pipe_after_one_line(tmp_path):
    model = _model_with_many_tensors(tmp_path / "many.onnx")
    shell = (f"{sys.executable} -m onnxprune inspect --json {model} 2>{tmp_path / 'err'}"
             " | head -1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True,
                            text=True, timeout=300)
    assert result.stdout == "{\n"
    assert (tmp_path / "err").read_text() == ""
    assert result.returncode in (0, 141)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_report_has_the_output_models_mode(umask, tmp_path, model_copy, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    previous = os.umask(umask)
    try:
        assert main(["prune", str(model_copy), "-o", str(out), "--report", str(report)]) == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(out.stat().st_mode) == expected
    assert stat.S_IMODE(report.stat().st_mode) == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [1.5, 2.5])
def test_real_sigint_during_a_calibrated_prune(delay, tmp_path):
    """A real SIGINT at some point of a run: "interrupted" and exit 130 (or, if the run was
    already done, success); never a traceback or an internal error, never a partial file."""
    import signal
    import time

    model = tmp_path / "transformer.onnx"
    shutil.copy(MODELS_DIR / "transformer.onnx", model)
    out = tmp_path / "out.onnx"
    process = subprocess.Popen([sys.executable, "-m", "onnxprune", "prune", str(model), "-o",
                                str(out), "--method", "sparsegpt"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert "Traceback" not in err and "internal error" not in err, err
    if process.returncode == 0:
        assert out.is_file()
    else:
        assert process.returncode == 130, err
        assert err.splitlines()[-1] == "onnxprune: interrupted"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer.onnx"]


# --- options given but not used: one warning line each group ------------------------------

def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("WARNING:")]


@pytest.mark.parametrize("options,warning", [
    (["--atol", "0.1", "--min-cosine", "0.9"],
     "WARNING: --atol, --min-cosine are ignored without --validate"),
    (["--samples", "3"], "WARNING: --samples is ignored without --validate"),
    (["--input-shapes", "x:[2,256]"], "WARNING: --input-shapes is ignored: no --validate and "
                                      "no synthetic calibration inputs"),
    (["--calib-samples", "4", "--calib-mode", "one-pass"],
     "WARNING: --calib-samples, --calib-mode are ignored: method magnitude uses no "
     "calibration data"),
], ids=["tolerances", "samples", "shapes", "calibration"])
def test_ignored_options_get_one_warning(options, warning, tmp_path, model_copy, capsys):
    assert main(["prune", str(model_copy), "-o", str(tmp_path / "o.onnx"), *options]) == 0
    assert _warnings(capsys.readouterr().err) == [warning]


@pytest.mark.parametrize("options", [
    ["--validate", "--atol", "10", "--samples", "2"],
    ["--method", "wanda", "--calib-samples", "2", "--input-shapes", "x:[2,256]"],
    ["--measure-error", "--calib-mode", "one-pass", "--calib-samples", "2"],
], ids=["validate", "calibrated", "measure-error"])
def test_used_options_get_no_ignored_warning(options, tmp_path, model_copy, capsys):
    assert main(["prune", str(model_copy), "-o", str(tmp_path / "o.onnx"), *options]) == 0
    assert not [w for w in _warnings(capsys.readouterr().err) if "ignored" in w]
