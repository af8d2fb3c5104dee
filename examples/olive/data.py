"""Data of the Olive example: the 597 held-out digits shipped in models/ (`digits-test.npz`,
labels in `digits-test-labels.npy`), as an Olive dataset of ({"pixels": row}, label) pairs.

The workflow calibrates on the first 97 images (`first=0, last=97`) and measures accuracy on
the other 500, so no image it is scored on was seen by calibration.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from olive.data.registry import Registry

MODELS = Path(__file__).resolve().parents[2] / "models"


class DigitsDataset(torch.utils.data.Dataset):
    """Rows `first:last` of the held-out digits: 64 pixels in [0, 1] and the digit."""

    def __init__(self, first: int = 0, last: int | None = None) -> None:
        with np.load(MODELS / "digits-test.npz") as archive:
            self.pixels = archive["pixels"][first:last]
        self.labels = np.load(MODELS / "digits-test-labels.npy")[first:last]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        return {"pixels": torch.from_numpy(self.pixels[index])}, int(self.labels[index])


@Registry.register_dataset()
def digits_dataset(first: int = 0, last: int | None = None) -> DigitsDataset:
    return DigitsDataset(first, last)


@Registry.register_post_process()
def digits_top1(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """The predicted digit of each row of logits."""
    return logits.argmax(dim=-1)
