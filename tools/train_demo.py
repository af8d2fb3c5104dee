"""Train the shipped demo classifier `models/digits.onnx` and write its held-out test data.

    python tools/train_demo.py              # or: --out DIR

An MLP 64 -> 256 -> 128 -> 10 (MatMul + Add, Relu) trained with numpy SGD on scikit-learn's
bundled digits (8x8 handwritten digits shipped inside the scikit-learn wheel, nothing is
downloaded), with fixed seeds. The trainer, the data split and the ONNX export are the ones
the tests use (`tests/digits_mlp.py`). Writes

- `digits.onnx`: input `pixels` float32 `[batch, 64]` (pixel values / 16, in [0, 1]) ->
  `logits` float32 `[batch, 10]`, opset 17, IR version 8;
- `digits-test.npz`: the held-out split as `{'pixels': float32 [N, 64]}`, the format
  `--data` reads (one array keyed by the graph input name, a batch along its first axis);
- `digits-test-labels.npy`: its labels, int64 `[N]` (a separate file: `--data` refuses keys
  that are not graph inputs);

and prints the dense model's held-out accuracy, measured in onnxruntime.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from digits_mlp import accuracy, digits_split, initial_params, to_onnx, train  # noqa: E402

SIZES = (64, 256, 128, 10)
SEED = 0
EPOCHS = 30
INPUT = "pixels"


def build() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The trained model and the held-out (pixels, labels)."""
    x_train, y_train, x_test, y_test = digits_split()
    params = train(initial_params(seed=SEED, sizes=SIZES), x_train, y_train, epochs=EPOCHS,
                   seed=SEED)
    model = to_onnx(params, input_name=INPUT, graph_name="digits")
    model.ir_version = 8
    model.doc_string = ("Digit classifier (MLP 64-256-128-10) trained on scikit-learn's digits "
                        "by tools/train_demo.py")
    model.graph.doc_string = "pixels: 8x8 digit images, flattened, values / 16 -> logits of 0-9"
    helper.set_model_props(model, {"onnxprune.demo_model": "digits",
                                   "onnxprune.made_by": "tools/train_demo.py",
                                   "onnxprune.seed": str(SEED)})
    onnx.checker.check_model(model, full_check=True)
    return model, x_test, y_test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models",
                        help="folder to write into (default: models/)")
    args = parser.parse_args(argv)
    model, pixels, labels = build()
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "digits.onnx"
    onnx.save(model, model_path)
    np.savez_compressed(args.out / "digits-test.npz", **{INPUT: pixels})
    np.save(args.out / "digits-test-labels.npy", labels)
    dense = accuracy(str(model_path), pixels, labels)
    hits = int(round(dense * len(labels)))
    print(f"wrote {model_path} ({model_path.stat().st_size:,} bytes), "
          f"{args.out / 'digits-test.npz'} and {args.out / 'digits-test-labels.npy'} "
          f"({len(labels)} held-out samples)")
    print(f"held-out accuracy of the dense model: {dense:.4f} ({hits}/{len(labels)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
