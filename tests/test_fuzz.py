"""A fast seeded slice of tools/fuzz.py: mutated models never end in an internal error.

Every mutation kind runs on several base models (demo models and the fuzzer's own models
with external data, sparse initializers, Constant nodes, subgraphs, functions and TENSORS
attributes) through `inspect`, `prune` and `densify`; each run must end in exit 0 or a
one-line exit-2 refusal, leave the input untouched and no output behind on failure, open
nothing outside the model's folder and copy no byte of the canary file beside it.
"""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
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
