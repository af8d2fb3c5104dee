"""The command line: subcommands, exit codes, JSON on stdout, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR

from onnxprune.cli import main

MLP = MODELS_DIR / "mlp.onnx"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "onnxprune.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_user_error(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("onnxprune")


@pytest.fixture
def model_copy(tmp_path) -> Path:
    path = tmp_path / "in" / "mlp.onnx"
    path.parent.mkdir()
    shutil.copy(MLP, path)
    return path


def test_help_does_not_import_numba_or_onnx():
    code = (
        "import sys\nfrom onnxprune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('numba', 'onnx', 'onnxruntime') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "prune" in result.stdout and "inspect" in result.stdout


def test_inspect_json(capsys):
    assert main(["inspect", str(MLP), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"model", "targets", "skipped", "summary"} <= set(report)
    names = {t["name"] for t in report["targets"]}
    assert names == {"fc1.weight", "fc2.weight", "fc3.weight"}
    required = {
        "name",
        "op_type",
        "shape",
        "dtype",
        "axis",
        "numel",
        "zeros",
        "sparsity",
        "pattern",
        "format",
        "source",
        "is_2_4",
        "bytes",
    }
    for target in report["targets"]:
        assert required <= set(target)
        assert target["sparsity"] == 0.0 and target["source"] == "initializer"
    assert {s["reason"] for s in report["skipped"]} == {"bias"}
    assert {"params", "zeros", "sparsity", "file_bytes", "dense_bytes"} <= set(report["summary"])


def test_inspect_table(capsys):
    assert main(["inspect", str(MODELS_DIR / "cnn.onnx")]) == 0
    out = capsys.readouterr().out
    assert "conv4.weight" in out and "constant_node" in out and "below --min-size" in out


def test_prune_report_and_inspect_agree(tmp_path, model_copy, capsys):
    out = tmp_path / "out.onnx"
    report_path = tmp_path / "report.json"
    code = main(
        ["prune", str(model_copy), "-o", str(out), "--pattern", "2:4", "--report", str(report_path)]
    )
    assert code == 0
    summary = capsys.readouterr().out
    assert "sparsity" in summary and "50.00%" in summary
    report = json.loads(report_path.read_text())
    assert report["summary"]["sparsity"] == 0.5
    assert all(t["pattern"] == "2:4" and t["is_2_4"] for t in report["targets"])
    assert report["summary"]["file_bytes"] == out.stat().st_size
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert [t["zeros"] for t in inspected["targets"]] == [t["zeros"] for t in report["targets"]]


def test_prune_validate_passes_and_fails_on_tolerance(tmp_path, model_copy, capsys):
    out = tmp_path / "out.onnx"
    assert (
        main(
            [
                "prune",
                str(model_copy),
                "-o",
                str(out),
                "--sparsity",
                "0.3",
                "--validate",
                "--min-cosine",
                "0.5",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "cosine" in text
    out2 = tmp_path / "out2.onnx"
    assert (
        main(
            [
                "prune",
                str(model_copy),
                "-o",
                str(out2),
                "--sparsity",
                "0.9",
                "--validate",
                "--atol",
                "1e-9",
            ]
        )
        == 1
    )
    assert out2.exists()  # the model is written; only the check failed


def test_validate_identical_models_json(tmp_path, capsys):
    assert main(["validate", str(MLP), str(MLP), "--json", "--atol", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_abs_diff"] == 0 and result["passed"] is True
    assert result["cosine"] == pytest.approx(1.0) and result["top1_agreement"] == 1.0


def test_validate_with_npz_and_dims(tmp_path, capsys):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((3, 2, 256)).astype(np.float32))
    assert main(["validate", str(MLP), str(MLP), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 3
    transformer = MODELS_DIR / "transformer.onnx"
    assert (
        main(
            [
                "validate",
                str(transformer),
                str(transformer),
                "--dim",
                "seq=8",
                "--dim",
                "batch=1",
                "--json",
            ]
        )
        == 0
    )


# --- bad input: one line on stderr, exit 2, input untouched, no output left behind -------


def _bad_model_cases(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(MLP.read_bytes()[: MLP.stat().st_size // 2])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    external_dir = tmp_path / "external"
    external_dir.mkdir()
    external = external_dir / "mlp.onnx"
    onnx.save(
        onnx.load(str(MLP)), str(external), save_as_external_data=True, location="mlp.onnx.data"
    )
    (external_dir / "mlp.onnx.data").unlink()
    return {
        "garbage": garbage,
        "truncated": truncated,
        "empty": empty,
        "missing external data": external,
        "missing": tmp_path / "nope.onnx",
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["garbage", "truncated", "empty", "missing external data", "missing"]
)
def test_bad_model_file(case, tmp_path):
    path = _bad_model_cases(tmp_path)[case]
    digest = _digest(path) if path.exists() else None
    out = tmp_path / "out" / "x.onnx"
    out.parent.mkdir()
    for args in (["prune", path, "-o", out], ["inspect", path], ["validate", path, MLP]):
        result = run_cli(*args)
        _assert_user_error(result)
        assert str(path.name) in result.stderr
    assert not any(out.parent.iterdir())
    if digest:
        assert _digest(path) == digest


@pytest.mark.parametrize(
    "args",
    [
        ["--sparsity", "1.0"],
        ["--sparsity", "-0.1"],
        ["--sparsity", "1.5"],
        ["--sparsity", "nan"],
        ["--pattern", "5:4"],
        ["--pattern", "0:4"],
        ["--pattern", "2-4"],
        ["--method", "nope"],
        ["--scope", "everywhere"],
        ["--min-size", "-1"],
        ["--include", "("],
    ],
)
@pytest.mark.slow
def test_bad_options(args, tmp_path, model_copy):
    digest = _digest(model_copy)
    out = tmp_path / "out.onnx"
    result = run_cli("prune", model_copy, "-o", out, *args)
    _assert_user_error(result)
    assert not out.exists()
    assert _digest(model_copy) == digest
    assert [p.name for p in model_copy.parent.iterdir()] == ["mlp.onnx"]


@pytest.mark.slow
def test_output_equal_to_input(model_copy):
    digest = _digest(model_copy)
    for output in (model_copy, model_copy.parent / "." / "mlp.onnx"):
        result = run_cli("prune", model_copy, "-o", output)
        _assert_user_error(result)
        assert "input" in result.stderr
    assert _digest(model_copy) == digest
    assert [p.name for p in model_copy.parent.iterdir()] == ["mlp.onnx"]


def _unwritable_directory(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores chmod)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, Path("/sys"), Path("/proc/self")):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            return candidate
        os.close(fd)
        os.unlink(probe)
    pytest.skip("no unwritable directory available")


@pytest.mark.slow
def test_unwritable_output_directory(tmp_path, model_copy):
    directory = _unwritable_directory(tmp_path)
    result = run_cli("prune", model_copy, "-o", directory / "out.onnx")
    _assert_user_error(result)
    assert "writable" in result.stderr or "directory" in result.stderr
    result = run_cli("prune", model_copy, "-o", tmp_path / "no-such-dir" / "out.onnx")
    _assert_user_error(result)


def test_nothing_to_prune(tmp_path, model_copy):
    result = run_cli("prune", model_copy, "-o", tmp_path / "o.onnx", "--min-size", "10000000")
    _assert_user_error(result)
    assert "nothing to prune" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_bad_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong_name=np.zeros((1, 256), np.float32))
    result = run_cli("validate", MLP, MLP, "--data", bad)
    _assert_user_error(result)


@pytest.mark.parametrize("fmt", ["sparse", "compact"])
def test_prune_format_then_densify_round_trip(fmt, tmp_path, model_copy, capsys):
    dense, stored, back = (tmp_path / f"{n}.onnx" for n in ("dense", "stored", "back"))
    assert main(["prune", str(model_copy), "-o", str(dense), "--sparsity", "0.9", "-q"]) == 0
    assert (
        main(
            [
                "prune",
                str(model_copy),
                "-o",
                str(stored),
                "--sparsity",
                "0.9",
                "--format",
                fmt,
                "--report",
                str(tmp_path / "r.json"),
                "-q",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(t["format"].startswith(fmt) for t in report["targets"])
    assert stored.stat().st_size < dense.stat().st_size / 2
    capsys.readouterr()
    assert main(["validate", str(dense), str(stored), "--atol", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] == 0
    assert main(["inspect", str(stored), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    zeros = {t["name"]: t["zeros"] for t in inspected["targets"]}
    assert zeros == {t["name"]: t["zeros"] for t in report["targets"]}
    assert all(t["format"].startswith(fmt) for t in inspected["targets"])
    assert main(["densify", str(stored), "-o", str(back)]) == 0
    capsys.readouterr()
    original = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(dense)).graph.initializer
    }
    restored = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(back)).graph.initializer
    }
    assert original.keys() == restored.keys()
    for name, array in original.items():
        assert array.tobytes() == restored[name].tobytes()


def test_prune_sparsegpt_with_npz_calibration(tmp_path, model_copy, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((8, 4, 256)).astype(np.float32))
    out = tmp_path / "sg.onnx"
    report_path = tmp_path / "r.json"
    assert (
        main(
            [
                "prune",
                str(model_copy),
                "-o",
                str(out),
                "--method",
                "sparsegpt",
                "--pattern",
                "2:4",
                "--calib",
                str(calib),
                "--report",
                str(report_path),
                "-q",
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    for target in report["targets"]:
        assert target["method"] == "sparsegpt" and target["is_2_4"]
        assert target["zeros"] == target["numel"] // 2
        assert 0 <= target["reconstruction_error"] < 1
    missing = tmp_path / "bad.npz"
    np.savez(missing, y=np.zeros((2, 256), np.float32))
    result = run_cli(
        "prune", model_copy, "-o", tmp_path / "x.onnx", "--method", "wanda", "--calib", missing
    )
    _assert_user_error(result)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("command", ["prune", "densify"])
def test_fsync_only_when_asked(tmp_path, model_copy, monkeypatch, command):
    import onnxprune.io as io_module

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(io_module.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    for flag, expected in (([], False), (["--fsync"], True)):
        synced.clear()
        out = tmp_path / f"out{len(flag)}.onnx"
        assert main([command, str(model_copy), "-o", str(out), "-q", *flag]) == 0
        assert out.is_file() and bool(synced) == expected


@pytest.mark.slow
def test_prune_skips_numbas_scipy_blas_probe_and_sparsegpt_still_imports_scipy(tmp_path):
    """The CLI keeps numba from importing scipy.linalg (0.3 s) just to probe for BLAS."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "onnxprune", "prune", str(MLP),
         "-o", str(tmp_path / "m.onnx"), "-q"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "numba.np.arraymath" in imported and "scipy.linalg" not in imported
    result = run_cli("prune", MLP, "-o", tmp_path / "s.onnx", "--method", "sparsegpt",
                     "--pattern", "2:4", "-q")
    assert result.returncode == 0, result.stderr


def test_prune_validate_builds_the_reference_session_once(tmp_path, monkeypatch):
    """The reference runs once before pruning (to refuse inputs it cannot run on); that
    session is the one the comparison uses."""
    import onnxprune.validate as validate

    built = []
    real = validate.make_session

    def counting(model, *args, **kwargs):
        built.append(str(model))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(validate, "make_session", counting)
    out = tmp_path / "m.onnx"
    assert main(["prune", str(MLP), "-o", str(out), "--validate", "--min-cosine", "0.5",
                 "-q"]) == 0
    assert built == [str(MLP), str(out)]
