"""The README's first set-up command on the trained demo model `models/digits.onnx`.

The command's `onnxprune prune ...` part is read from README.md and run in-process: it must
exit 0 and print PASSED (a real tolerance on real held-out digits), and a far more aggressive
sparsity must fail the same tolerance. The accuracies that `models/README.md` states are
measured again on `models/digits-test.npz` and its labels.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
from conftest import MODELS_DIR, REPO_ROOT
from digits_mlp import accuracy

from onnxprune.cli import main

README = REPO_ROOT / "README.md"
MODELS_README = MODELS_DIR / "README.md"
TEST_PIXELS = MODELS_DIR / "digits-test.npz"
TEST_LABELS = MODELS_DIR / "digits-test-labels.npy"


def readme_prune_args() -> list[str]:
    """The arguments after `onnxprune prune` in the README's first set-up command."""
    text = README.read_text(encoding="utf-8")
    setup = text.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2, "the set-up section shows exactly two commands"
    parts = [shlex.split(part) for part in commands[0].split("&&")]
    prune = [p for p in parts if p[:2] == ["onnxprune", "prune"]]
    assert len(prune) == 1, commands[0]
    return prune[0][2:]


def run_readme_command(tmp_path: Path, **overrides: str) -> list[str]:
    """The README's prune arguments with paths made absolute (inputs from the repository,
    the output in tmp_path) and `--option value` pairs replaced by `overrides`."""
    args = readme_prune_args()
    out = args.index("-o") + 1
    args[out] = str(tmp_path / Path(args[out]).name)
    for i, arg in enumerate(args):
        if arg.startswith("models/"):
            args[i] = str(REPO_ROOT / arg)
    for option, value in overrides.items():
        args[args.index(option) + 1] = value
    return args


def stated_accuracy(label: str) -> tuple[int, int]:
    """`hits/total` that models/README.md states in bold after `label`."""
    text = " ".join(MODELS_README.read_text(encoding="utf-8").split())
    match = re.search(re.escape(label) + r"[^*]*\*\*(\d+)/(\d+) = ([\d.]+) %\*\*", text)
    assert match, f"models/README.md states no accuracy after {label!r}"
    hits, total, percent = int(match[1]), int(match[2]), float(match[3])
    assert round(100 * hits / total, 2) == percent
    return hits, total


def hits(model: Path) -> tuple[int, int]:
    pixels, labels = np.load(TEST_PIXELS)["pixels"], np.load(TEST_LABELS)
    return round(accuracy(str(model), pixels, labels) * len(labels)), len(labels)


def test_readme_command_prunes_the_digits_model(tmp_path, capsys):
    args = run_readme_command(tmp_path)
    assert args[:1] == [str(MODELS_DIR / "digits.onnx")]
    assert "--validate" in args and "--data" in args and "--min-top1" in args
    assert main(["prune", *args]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^PASSED \(min_top1=0\.97\)$", out, re.M), out
    assert "NOT CHECKED" not in out
    pruned = Path(args[args.index("-o") + 1])
    assert hits(pruned) == stated_accuracy("--sparsity 0.7")


def test_too_aggressive_sparsity_fails_the_same_check(tmp_path, capsys):
    args = run_readme_command(tmp_path, **{"--sparsity": "0.9"})
    assert main(["prune", *args]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAILED \(min_top1=0\.97\)$", out, re.M), out


def test_dense_accuracy_is_what_models_readme_says():
    assert hits(MODELS_DIR / "digits.onnx") == stated_accuracy(
        "Held-out accuracy of the dense model:")


def test_test_data_matches_the_model():
    import onnx

    model = onnx.load(str(MODELS_DIR / "digits.onnx"))
    assert [i.name for i in model.graph.input] == ["pixels"]
    with np.load(TEST_PIXELS) as data:
        assert data.files == ["pixels"]
        pixels = data["pixels"]
    labels = np.load(TEST_LABELS)
    assert pixels.dtype == np.float32 and pixels.shape == (len(labels), 64)
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert pixels.min() >= 0 and pixels.max() <= 1
