"""Slow, obviously-correct twins of onnxprune.kernels, for comparison in tests.

Each twin follows the written rule literally (Python loops, stable sorts), with no
blocking, no int32 tricks and no sampling, so that a disagreement points at the kernel.
"""

from __future__ import annotations

import numpy as np

NAN_KEY = 0xFFFFFFFF


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """Unsigned sortable key (as int64) of each float32, flat: the spec's definition.

    bits ^ 0x80000000 when the sign bit is clear, ~bits when set, 0xFFFFFFFF for any NaN.
    """
    values = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1)
    bits = values.view(np.uint32).astype(np.int64)
    sign_clear = (bits & 0x80000000) == 0
    keys = np.where(sign_clear, bits ^ 0x80000000, ~bits & 0xFFFFFFFF)
    return np.where(np.isnan(values), NAN_KEY, keys)


def value_of_key(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def same_float32(a: float, b: float) -> bool:
    """Equal as the kernels see it: same key (so NaN == NaN and -0.0 != +0.0)."""
    pair = np.array([a, b], dtype=np.float32)
    keys = sortable_keys(pair)
    return bool(keys[0] == keys[1])


def magnitude_scores(weights: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(weights).astype(np.float32))


def kth_smallest(arrays: list[np.ndarray], k: int) -> tuple[float, int, int]:
    """(value, n_below, n_equal) of the k-th smallest key over all arrays."""
    keys = np.sort(np.concatenate([sortable_keys(a) for a in arrays]), kind="stable")
    key = int(keys[k - 1])
    return value_of_key(key), int(np.sum(keys < key)), int(np.sum(keys == key))


def count_below_equal(scores: np.ndarray, value: float) -> tuple[int, int]:
    keys = sortable_keys(scores)
    key = int(sortable_keys(np.array([value], dtype=np.float32))[0])
    return int(np.sum(keys < key)), int(np.sum(keys == key))


def unstructured_keep_mask(scores: np.ndarray, value: float, n_equal_to_prune: int) -> np.ndarray:
    keys = sortable_keys(scores)
    key = int(sortable_keys(np.array([value], dtype=np.float32))[0])
    keep = np.ones(keys.size, dtype=bool)
    pruned_equal = 0
    for i, element_key in enumerate(keys.tolist()):
        if element_key < key:
            keep[i] = False
        elif element_key == key and pruned_equal < n_equal_to_prune:
            keep[i] = False
            pruned_equal += 1
    return keep.reshape(scores.shape)


def nm_keep_mask(scores2d: np.ndarray, n: int, m: int) -> np.ndarray:
    """Sort every group by (largest key first, lower column first); keep its first n."""
    rows, cols = scores2d.shape
    keys = sortable_keys(scores2d)
    column = np.arange(keys.size) % cols
    group = np.arange(keys.size) // m
    order = np.lexsort((column, -keys, group))  # by group, then key down, then column up
    place_in_group = np.empty(keys.size, dtype=np.int64)
    place_in_group[order] = np.arange(keys.size) % m
    return (place_in_group < n).reshape(rows, cols)


def apply_mask(weights: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """(masked copy, number of zeros in it)."""
    masked = weights.copy()
    bits = masked.view(f"u{masked.dtype.itemsize}")
    bits[~keep] = 0
    return masked, count_zeros(masked)


def count_zeros(weights: np.ndarray) -> int:
    return int(np.sum(np.asarray(weights).astype(np.float64) == 0.0))


def nm_violations(weights2d: np.ndarray, n: int, m: int) -> int:
    values = np.asarray(weights2d).astype(np.float64)
    violations = 0
    for row in values:
        for start in range(0, row.size, m):
            non_zero = sum(1 for v in row[start : start + m] if v != 0.0)
            violations += non_zero > n
    return violations
