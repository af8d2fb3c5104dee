"""Keep-masks as data: saved to and loaded from `.npz` files, bit-packed, keyed by target name.

A mask is True where a weight is kept (non-zero after pruning). On disk each target's mask
is ``np.packbits`` of the flat mask (big bit order) under the target's name, and one JSON
entry, ``__onnxprune_masks__``, records the format version and every mask's shape. Plain
boolean arrays keyed by target name (hand-made files) are read too.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .io import write_file_atomically

INDEX_KEY = "__onnxprune_masks__"
VERSION = 1


class MaskSet(Mapping):
    """Keep-masks by target name; packed in memory, unpacked on access."""

    def __init__(self, packed: Mapping[str, np.ndarray] | None = None,
                 shapes: Mapping[str, tuple[int, ...]] | None = None):
        self._packed = dict(packed or {})
        self._shapes = {name: tuple(int(d) for d in shape) for name, shape in
                        (shapes or {}).items()}

    @classmethod
    def from_arrays(cls, masks: Mapping[str, np.ndarray]) -> MaskSet:
        packed = {name: np.packbits(np.asarray(m, dtype=bool).reshape(-1))
                  for name, m in masks.items()}
        return cls(packed, {name: np.shape(m) for name, m in masks.items()})

    def add_packed(self, name: str, packed: np.ndarray, shape: tuple[int, ...]) -> None:
        self._packed[name] = packed
        self._shapes[name] = tuple(shape)

    def merged(self, other: MaskSet) -> MaskSet:
        """Both sets' masks in one (a structured stage's group masks and the N:M stage's
        target masks); a ValueError when a name is in both."""
        both = sorted(set(self._packed) & set(other._packed))
        if both:
            raise ValueError(f"mask {both[0]!r} is in both sets")
        return MaskSet({**self._packed, **other._packed}, {**self._shapes, **other._shapes})

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self._shapes[name]
        count = int(np.prod(shape, dtype=np.int64))
        return np.unpackbits(self._packed[name], count=count).astype(bool).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the masks to `path` (.npz) atomically."""
        path = Path(path)
        index = {"version": VERSION, "bit_order": "big", "kept": True,
                 "shapes": {name: list(shape) for name, shape in self._shapes.items()}}
        arrays = {INDEX_KEY: np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)}
        arrays.update(self._packed)
        # allow_pickle given: the packed masks are uint8 (and a mask named "allow_pickle" is
        # a TypeError here, not an array silently taken as the option)
        write_file_atomically(path, lambda fh: np.savez(fh, allow_pickle=False, **arrays))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MaskSet:
        """Read masks saved by `save`, or plain boolean arrays keyed by target name."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such mask file") from exc
        except (OSError, ValueError, zipfile.BadZipFile, io.UnsupportedOperation) as exc:
            raise ConfigError(f"{path}: not a mask .npz file ({exc})") from exc
        if INDEX_KEY not in arrays:
            masks = {}
            for name, array in arrays.items():
                if array.dtype != np.bool_:
                    raise ConfigError(f"{path}: mask {name!r} is {array.dtype}, not boolean")
                masks[name] = array
            return cls.from_arrays(masks)
        try:
            index = json.loads(arrays.pop(INDEX_KEY).tobytes().decode())
            shapes = {name: tuple(shape) for name, shape in index["shapes"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: damaged mask index") from exc
        if index.get("version") != VERSION or set(shapes) != set(arrays):
            raise ConfigError(f"{path}: mask index does not match its arrays")
        for name, packed in arrays.items():
            count = int(np.prod(shapes[name], dtype=np.int64))
            if packed.dtype != np.uint8 or packed.size != (count + 7) // 8:
                raise ConfigError(f"{path}: mask {name!r} does not hold {count} bits")
        return cls(arrays, shapes)
