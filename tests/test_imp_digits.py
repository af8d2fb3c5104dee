"""IMP on a real task: an MLP trained with numpy on scikit-learn's digits, pruned to 90 %.

Iterative pruning with a retrain hook keeps the test accuracy (measured in onnxruntime)
within 2 points of the dense model, where one-shot magnitude pruning at 90 % loses far more;
masks persist across rounds even when the hook revives pruned weights; a lottery rewind
gives the survivors their initial values exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from digits_mlp import (  # noqa: E402
    accuracy,
    digits_split,
    from_onnx,
    initial_params,
    to_onnx,
    train,
)

import onnxprune  # noqa: E402
from onnxprune.config import PruneConfig  # noqa: E402
from onnxprune.mask_files import MaskSet  # noqa: E402
from onnxprune.schedule import prune_iterative  # noqa: E402

CONFIG = PruneConfig(sparsity=0.9, min_size=0)  # W1 [64, 128] and W2 [128, 10]


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = digits_split()
    init = initial_params(seed=0)
    dense = to_onnx(train(init, x_train, y_train, epochs=40))
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "init": to_onnx(init), "dense": dense}


def retrain_hook(digits, keep_zeros: bool, calls: list | None = None):
    def retrain(model, round_number):
        params = from_onnx(model)
        if calls is not None:
            calls.append((round_number, {k: v.copy() for k, v in params.items()}))
        trained = train(params, digits["x_train"], digits["y_train"], epochs=10,
                        keep_zeros=keep_zeros, lr=0.05, seed=round_number)
        return to_onnx(trained)
    return retrain


def test_imp_keeps_accuracy_where_one_shot_loses_it(digits):
    x_test, y_test = digits["x_test"], digits["y_test"]
    dense = accuracy(digits["dense"], x_test, y_test)
    one_shot_model, _ = onnxprune.prune(digits["dense"], config=CONFIG)
    one_shot = accuracy(one_shot_model, x_test, y_test)
    imp_model, report = prune_iterative(digits["dense"], config=CONFIG, rounds=3,
                                        retrain=retrain_hook(digits, keep_zeros=True))
    imp = accuracy(imp_model, x_test, y_test)
    print(f"digits test accuracy: dense {dense:.4f}, IMP 90 % {imp:.4f}, "
          f"one-shot 90 % {one_shot:.4f}")
    assert dense > 0.95
    for target in report.targets:
        assert target.zeros == int(np.floor(0.9 * target.numel + 0.5))
    assert imp >= dense - 0.02
    assert one_shot < imp - 0.10  # clearly more lost without the rounds of retraining
    history = report.config["schedule"]["history"]
    assert [round(h["sparsity"], 4) for h in history] == [0.5358, 0.7846, 0.9]


def test_masks_persist_when_retraining_revives_weights(digits, tmp_path):
    calls = []
    model, report = prune_iterative(
        digits["dense"], config=CONFIG, rounds=3, return_masks=True,
        retrain=retrain_hook(digits, keep_zeros=False, calls=calls),
        save_masks=tmp_path / "masks-{round}.npz")
    rounds = [MaskSet.load(tmp_path / f"masks-{r}.npz") for r in (1, 2, 3)]
    final = from_onnx(model)
    for name in ("W1", "W2"):
        for earlier, later in zip(rounds, rounds[1:], strict=False):
            assert not (later[name] & ~earlier[name]).any()  # a pruned weight stays pruned
        assert np.array_equal(report.masks[name], rounds[-1][name])
        assert np.array_equal(final[name] != 0, report.masks[name])
    # the hook did revive pruned weights, and the tool zeroed them again
    assert all(h["revived"] > 0 for h in report.config["schedule"]["history"])
    # each round's hook saw exactly that round's mask applied
    for (round_number, params), mask in zip(calls, rounds, strict=True):
        assert np.array_equal(params["W1"] != 0, mask["W1"]), round_number


def test_rewind_restores_survivors_exactly(digits):
    calls = []
    model, report = prune_iterative(
        digits["dense"], config=CONFIG, rounds=2, rewind=digits["init"], return_masks=True,
        retrain=lambda m, r: calls.append((r, from_onnx(m))) or m)
    init = from_onnx(digits["init"])
    for _, params in calls:  # before each retrain: survivors at their initial values
        for name in ("W1", "W2"):
            alive = params[name] != 0
            assert np.array_equal(params[name][alive], init[name][alive])
    final = from_onnx(model)
    for name in ("W1", "W2"):
        mask = report.masks[name]
        assert np.array_equal(final[name], np.where(mask, init[name], 0))
        assert mask.sum() == report.targets[0 if name == "W1" else 1].numel - \
            report.targets[0 if name == "W1" else 1].zeros
