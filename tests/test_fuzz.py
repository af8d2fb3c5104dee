"""A fast seeded slice of tools/fuzz.py: mutated models never end in an internal error.

Every mutation kind runs on several base models (demo models and the fuzzer's own models
with external data, sparse initializers, Constant nodes, subgraphs, functions and TENSORS
attributes) through `inspect`, `prune` and `densify`; each run must end in exit 0 or a
one-line exit-2 refusal, leave the input untouched and no output behind on failure, open
nothing outside the model's folder and copy no byte of the canary file beside it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import sys
from pathlib import Path

import onnx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "models"
_spec = importlib.util.spec_from_file_location("onnxprune_fuzz", REPO_ROOT / "tools" / "fuzz.py")
fuzz = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fuzz)

CASES = 13 * len(fuzz.MUTATIONS)  # 13 of each mutation kind (>= 500 cases)
pytestmark = pytest.mark.slow  # the slice takes about 40 s on two cores


@pytest.fixture(scope="module")
def summary():
    return fuzz.fuzz(CASES, seed=20261130)


def test_no_internal_errors(summary) -> None:
    sites = collections.Counter(outcome.detail for outcome in summary.internal)
    assert not sites, summary.report()


def test_no_invariant_breaches(summary) -> None:
    assert not summary.breaches, summary.report()


def test_the_slice_exercises_every_mutation_and_outcome(summary) -> None:
    kinds = {outcome.kind for outcome in summary.outcomes if outcome.result != "skipped"}
    assert kinds == set(fuzz.MUTATIONS)
    assert CASES >= 500
    results = collections.Counter(outcome.result for outcome in summary.outcomes)
    assert results["ok"] > 0 and results["refused"] > 0
    refused = {o.kind for o in summary.outcomes if o.result == "refused"}
    for kind in ("ext_symlink_file", "ext_symlink_dir", "ext_escape", "ext_offset",
                 "ext_length", "sparse_indices_range", "sparse_indices_count", "data_type",
                 "no_data", "utf8_name", "utf8_location", "dims_negative", "dims_huge",
                 "constant_no_output", "node_arity"):
        assert kind in refused, kind


def test_the_canary_check_would_see_a_leak(tmp_path: Path) -> None:
    """The invariant is not vacuous: a file holding the canary's bytes is reported."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "leak.bin").write_bytes(b"xx" + fuzz.CANARY_BYTES[:64])
    assert fuzz.CANARY_MARKER in (out / "leak.bin").read_bytes()
    assert not fuzz._allowed_open(str(tmp_path / fuzz.CANARY_NAME), tmp_path / "model", out)


def test_a_file_beside_the_case_folder_is_not_case_data(tmp_path: Path) -> None:
    """A latency table the fuzzer names beside the case folder (`case7-latency.json`, and
    its `.partial` while written) is the run's own output, not a read outside the model
    folder: the name only starts like the case folder's (a string prefix is no parent)."""
    case = tmp_path / "case7"
    (case / "model").mkdir(parents=True)
    (case / "out").mkdir()
    assert fuzz._allowed_open(str(tmp_path / "case7-latency.json.partial"), case / "model",
                              case / "out")
    assert not fuzz._allowed_open(str(case / "secret.bin"), case / "model", case / "out")


def test_arity_mutations_leave_a_node_short(tmp_path: Path) -> None:
    """constant_no_output and node_arity really take outputs or trailing inputs away."""
    import random

    import onnx

    base = next(b for b in fuzz.make_bases() if b.name == "rich")
    for kind in ("constant_no_output", "node_arity"):
        for seed in range(10):
            model_dir = tmp_path / f"{kind}{seed}"
            model_dir.mkdir()
            (model_dir / fuzz.MODEL_NAME).write_bytes(base.files[fuzz.MODEL_NAME])
            folder = fuzz.Folder(tmp_path, model_dir, random.Random(seed))
            before = onnx.load(str(folder.model_path))
            fuzz.MUTATIONS[kind](folder)
            after = onnx.load(str(folder.model_path))
            arity = sorted((n.op_type, len(n.input), len(n.output))
                           for n in fuzz._all_nodes(after))
            was = sorted((n.op_type, len(n.input), len(n.output))
                         for n in fuzz._all_nodes(before))
            if kind == "constant_no_output":
                assert any(n.op_type == "Constant" and not any(n.output)
                           for n in fuzz._all_nodes(after))
            else:
                assert arity != was and sum(i + o for _, i, o in arity) < \
                    sum(i + o for _, i, o in was)


# --- structured mode (--structured, issue #18) ----------------------------------------------

STRUCTURED_CASES = len(fuzz.MUTATIONS)  # one of each mutation kind


@pytest.fixture(scope="module")
def structured_summary():
    """Only the structured commands (the others run in the slice above)."""
    return fuzz.fuzz(STRUCTURED_CASES, seed=20261130, commands=(), structured=True)


def test_structured_no_internal_errors(structured_summary) -> None:
    sites = collections.Counter(o.detail for o in structured_summary.internal)
    assert not sites, structured_summary.report()


def test_structured_outputs_pass_the_checker_and_run(structured_summary) -> None:
    """Every structured prune that exits 0 writes a model that passes the full checker,
    keeps the graph outputs and runs where its input runs; no other invariant breaks."""
    assert not structured_summary.breaches, structured_summary.report()


def test_structured_slice_runs_both_commands(structured_summary) -> None:
    commands = collections.Counter(o.command.split(" --")[0] for o in structured_summary.outcomes
                                   if o.result != "skipped")
    assert set(commands) == {"inspect", "prune"}
    results = collections.Counter(o.result for o in structured_summary.outcomes
                                  if o.command.startswith("prune --structure"))
    assert results["ok"] > 0 and results["refused"] > 0, structured_summary.report()
    assert {o.command for o in structured_summary.outcomes if o.command != "-"} <= {
        "inspect --structured", *("prune " + " ".join(s) for s in fuzz.STRUCTURES)}


@pytest.fixture(scope="module")
def checker():
    with contextlib.closing(fuzz.OutputChecker()) as checker:
        yield checker


def _structured_output(tmp_path: Path, corrupt=None) -> Path:
    from onnxprune.cli import main

    out = tmp_path / "out.onnx"
    assert main(["prune", str(MODELS_DIR / "mlp.onnx"), "-o", str(out), "--structure",
                 "channels", "-q"]) == 0
    if corrupt is not None:
        model = onnx.load(str(out))
        corrupt(model)
        onnx.save(model, str(out))
    return out


def test_output_checker_passes_a_good_output(tmp_path: Path, checker) -> None:
    assert checker.problems(MODELS_DIR / "mlp.onnx", _structured_output(tmp_path)) == []


def test_output_checker_sees_a_full_check_failure(tmp_path: Path, checker) -> None:
    def corrupt(model):  # only the full check (shape inference) sees the contradiction
        model.graph.value_info.append(onnx.helper.make_tensor_value_info(
            "stale", onnx.TensorProto.FLOAT, [3]))
        model.graph.node.append(onnx.helper.make_node("Shape", [model.graph.output[0].name],
                                                      ["stale"]))

    problems = checker.problems(MODELS_DIR / "mlp.onnx", _structured_output(tmp_path, corrupt))
    assert problems and problems[0].startswith("bad output: onnx.checker (full_check)")


def test_output_checker_sees_other_outputs(tmp_path: Path, checker) -> None:
    def corrupt(model):  # one more graph output, which onnxruntime computes
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            model.graph.input[0].name, onnx.TensorProto.FLOAT, None))

    problems = checker.problems(MODELS_DIR / "mlp.onnx", _structured_output(tmp_path, corrupt))
    assert any("graph outputs" in p for p in problems), problems
    assert any(p.startswith("bad output: outputs ") for p in problems), problems


def test_output_checker_survives_a_hang(tmp_path: Path, monkeypatch) -> None:
    """A check process that does not answer in time (here: a fresh one, still importing
    onnx, given no time) is killed and reported, and the next check gets a fresh one."""
    out = _structured_output(tmp_path)
    with contextlib.closing(fuzz.OutputChecker()) as checker:
        monkeypatch.setattr(fuzz, "CHECK_TIMEOUT_S", 0.0)
        answer = checker._ask({"op": "run", "model": str(out), "feeds_from": str(out)})
        assert answer == {"crash": "no answer in 0 s"}
        assert checker.process is None
        monkeypatch.setattr(fuzz, "CHECK_TIMEOUT_S", 60.0)
        assert checker.problems(MODELS_DIR / "mlp.onnx", out) == []


# found by `python tools/fuzz.py --structured --cases 600 --seed 3` (each failed before the
# fix: an output left behind after a refusal, or an internal error)

def _bad_const(model) -> None:
    """An unused Constant node with two values: onnx.checker rejects the model."""
    model.graph.node.append(onnx.helper.make_node("Constant", [], ["junk"], value_float=1.0,
                                                  value_int=2))


def _transb_undefined(model) -> None:
    """Gemm's transB attribute with type UNDEFINED (checker: type and data mismatch)."""
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and n.input[1] ==
                "fc2.weight")
    next(a for a in gemm.attribute if a.name == "transB").type = \
        onnx.AttributeProto.UNDEFINED


def _biases_swapped(model) -> None:
    """conv3 given conv4's bias (128 values for 64 channels) and conv4 conv3's; passes the
    full checker, fails in onnxruntime."""
    names = {"conv3.bias": "conv4.bias", "conv4.bias": "conv3.bias"}
    for tensor in model.graph.initializer:
        tensor.name = names.get(tensor.name, tensor.name)


def _bad_perm(model) -> None:
    """A Transpose on the attention's value path with perm [0, 0, 0, 0] (the full check
    rejects it; the plain checker and `inspect` do not)."""
    node = next(n for n in model.graph.node
                if n.op_type == "Transpose" and "v_proj" in n.output[0])
    next(a for a in node.attribute if a.name == "perm").ints[:] = [0, 0, 0, 0]


@pytest.mark.parametrize("base,mutate", [
    ("mlp", _bad_const), ("mlp", _transb_undefined), ("cnn", _biases_swapped),
    ("transformer", _bad_perm),
], ids=["checker-refusal-leaves-output", "gemm-transB-undefined", "conv-bias-length",
        "transpose-perm-not-a-permutation"])
def test_structured_prune_of_an_invalid_model_refuses_cleanly(tmp_path: Path, capsys, base,
                                                              mutate) -> None:
    """`inspect --structured` and a structured prune of a model whose tensors or attributes
    contradict its graph end in exit 0 (the bad part declined) or a one-line exit-2
    refusal, with no output left behind."""
    from onnxprune.cli import main

    model = onnx.load(str(MODELS_DIR / f"{base}.onnx"))
    mutate(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for argv in (["inspect", str(path), "--structured"],
                 ["prune", str(path), "-o", str(out_dir / "out.onnx"), "--structure",
                  "channels", "-q"]):
        code = main(argv)
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("onnxprune:")]
        assert code in (0, 2), (argv[0], errors)
        if code == 2:
            assert len(errors) == 1 and errors[0].startswith("onnxprune: error: "), errors
            assert not list(out_dir.iterdir())


# --- quantized mode (--quantized, issue #20) ------------------------------------------------

@pytest.fixture(scope="module")
def quantized_summary():
    """Quantized bases (every form onnxruntime's tools write) and their mutations, through
    inspect, prune (drawn methods, patterns, formats) and densify."""
    pytest.importorskip("onnxruntime.quantization")
    return fuzz.fuzz(2 * len(fuzz.QUANTIZED_MUTATIONS), seed=20261207, quantized=True)


def test_quantized_no_internal_errors_or_breaches(quantized_summary) -> None:
    sites = collections.Counter(o.detail for o in quantized_summary.internal)
    assert not sites, quantized_summary.report()
    assert not quantized_summary.breaches, quantized_summary.report()
    ran = [o for o in quantized_summary.outcomes if o.result == "ok"]
    assert ran  # the slice prunes some quantized models, not only refusals
