"""Unstructured keep-masks, applying a mask to weights, and counting zeros."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import block_range, parallel_blocks
from .flags import NUMBA_CACHE, NUMBA_FASTMATH
from .integer_views import check_float_weights, magnitude_bits_mask, unsigned_view
from .keys import key_of_value, signed_key32

__all__ = ["apply_mask", "count_zeros", "unstructured_keep_mask"]

_TILE = 4096
# Positions of equal scores noted per block in the first pass (see unstructured_keep_mask).
_RECORDED = 256


def unstructured_keep_mask(scores: np.ndarray, value: float, n_equal_to_prune: int) -> np.ndarray:
    """Boolean keep-mask (same shape as ``scores``) for a threshold ``value``.

    Pruned (False): every score whose key is below that of ``value``, and the first
    ``n_equal_to_prune`` scores in flat C order whose key equals it. With
    ``t = kth_smallest_array(scores, k)``, ``unstructured_keep_mask(scores, t.value,
    k - t.n_below)`` prunes exactly ``k`` scores. ``scores`` is C-contiguous float32;
    ``n_equal_to_prune`` must not exceed the number of scores equal to ``value``.
    """
    if not isinstance(scores, np.ndarray):
        raise TypeError(f"scores must be a numpy array, got {type(scores).__name__}")
    if scores.dtype != np.float32:
        raise TypeError(f"scores must be float32, got {scores.dtype}")
    if not scores.flags.c_contiguous:
        raise ValueError("scores must be C-contiguous")
    if isinstance(n_equal_to_prune, (bool, np.bool_)) or not isinstance(
        n_equal_to_prune, (int, np.integer)
    ):
        raise TypeError(f"n_equal_to_prune must be an integer, got {n_equal_to_prune!r}")
    if n_equal_to_prune < 0:
        raise ValueError(f"n_equal_to_prune must be >= 0, got {n_equal_to_prune}")
    keep = np.empty(scores.shape, dtype=np.bool_)
    bits = scores.reshape(-1).view(np.int32)
    flat_keep = keep.reshape(-1)
    key = key_of_value(value)
    with parallel_blocks(bits.size) as n_blocks:
        # The first pass prunes every equal score, counts them per block and notes where
        # the first _RECORDED of each block are; the blocks past the first
        # n_equal_to_prune equal scores then give theirs back. With the usual handful of
        # ties that is a few writes at noted places, not a second pass.
        equal_per_block, equal_positions = _prune_below_and_equal_kernel(
            bits, key, flat_keep, n_blocks, _RECORDED
        )
        n_equal = int(equal_per_block.sum())
        if n_equal_to_prune > n_equal:
            raise ValueError(
                f"n_equal_to_prune={n_equal_to_prune} but only {n_equal} scores equal {value}"
            )
        if n_equal_to_prune < n_equal:
            # How many equal scores each block must still prune; it keeps the rest.
            equal_before = np.cumsum(equal_per_block) - equal_per_block
            to_prune = np.clip(n_equal_to_prune - equal_before, 0, equal_per_block)
            _keep_equal_after_kernel(
                bits, key, flat_keep, to_prune, equal_per_block, equal_positions, n_blocks
            )
    return keep


def apply_mask(weights: np.ndarray, keep: np.ndarray) -> int:
    """Zero ``weights`` in place where ``keep`` is False; return how many are zero after.

    Zeros are written as all-zero bits through an unsigned-integer view, so kept weights
    stay bit-identical. ``weights`` is a writable C-contiguous float16, bfloat16, float32
    or float64 array and ``keep`` a C-contiguous bool array of the same shape. The returned
    count includes weights that were already zero (+0.0 or -0.0).
    """
    check_float_weights(weights, "weights")
    if not weights.flags.c_contiguous:
        raise ValueError("weights must be C-contiguous")
    if not weights.flags.writeable:
        raise ValueError("weights must be writable")
    if not isinstance(keep, np.ndarray) or keep.dtype != np.bool_:
        raise TypeError("keep must be a numpy bool array")
    if keep.shape != weights.shape:
        raise ValueError(f"keep has shape {keep.shape}, weights {weights.shape}")
    if not keep.flags.c_contiguous:
        raise ValueError("keep must be C-contiguous")
    bits = unsigned_view(weights)
    mask = magnitude_bits_mask(bits.dtype)
    with parallel_blocks(bits.size) as n_blocks:
        parts = _apply_mask_kernel(bits, keep.reshape(-1), mask, mask.dtype.type(0), n_blocks)
    return int(parts.sum())


def count_zeros(weights: np.ndarray) -> int:
    """How many elements are zero (+0.0 or -0.0): float16, bfloat16, float32 or float64."""
    check_float_weights(weights, "weights")
    bits = unsigned_view(np.ascontiguousarray(weights))
    mask = magnitude_bits_mask(bits.dtype)
    with parallel_blocks(bits.size) as n_blocks:
        parts = _count_zeros_kernel(bits, mask, mask.dtype.type(0), n_blocks)
    return int(parts.sum())


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _prune_below_and_equal_kernel(bits, key, keep, n_blocks, n_recorded):
    """keep = key(score) > key. Returns per block how many scores equal ``key`` and the
    flat positions of the first ``n_recorded`` of them."""
    n = bits.size
    equal_per_block = np.zeros(n_blocks, np.int64)
    equal_positions = np.empty((n_blocks, n_recorded), np.int64)
    key32 = np.int32(key)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        n_equal = 0
        for tile_start in range(start, stop, _TILE):
            tile_stop = min(tile_start + _TILE, stop)
            tile_bits = bits[tile_start:tile_stop]  # indexed from 0: see blocks.py
            tile_keep = keep[tile_start:tile_stop]
            # int32 counter per tile so the loop keeps 8 lanes (see signed_key32).
            equal_t = np.int32(0)
            for i in range(tile_bits.size):
                element_key = signed_key32(tile_bits[i])
                tile_keep[i] = element_key > key32
                equal_t = np.int32(equal_t + np.int32(element_key == key32))
            if equal_t > 0 and n_equal < n_recorded:
                # Rare (or soon full): the tile is still in L1, find its equal scores.
                noted = n_equal
                for i in range(tile_bits.size):
                    if noted < n_recorded and signed_key32(tile_bits[i]) == key32:
                        equal_positions[block, noted] = tile_start + i
                        noted += 1
            n_equal += equal_t
        equal_per_block[block] = n_equal
    return equal_per_block, equal_positions


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _keep_equal_after_kernel(bits, key, keep, to_prune, equal_per_block, positions, n_blocks):
    """In each block, keep the equal scores after its first ``to_prune[block]``."""
    n = bits.size
    n_recorded = positions.shape[1]
    key32 = np.int32(key)
    for block in prange(n_blocks):
        n_equal = equal_per_block[block]
        n_prune = to_prune[block]
        if n_prune == n_equal:
            continue
        if n_equal <= n_recorded:
            for index in range(n_prune, n_equal):
                keep[positions[block, index]] = True
            continue
        # Heavy ties: find the first equal score to keep, then keep = key >= threshold
        # from there on, in vector loops.
        start, stop = block_range(block, n_blocks, n)
        if n_prune < n_recorded:
            first_kept = positions[block, n_prune]
        else:
            first_kept = _position_of_equal(
                bits, key32, positions[block, n_recorded - 1] + 1, stop, n_prune - n_recorded
            )
        tail_bits = bits[first_kept:stop]
        tail_keep = keep[first_kept:stop]
        for i in range(tail_bits.size):
            tail_keep[i] = signed_key32(tail_bits[i]) >= key32


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH)
def _position_of_equal(bits, key32, start, stop, skip):
    """Position in [start, stop) of the equal score after the first ``skip`` there."""
    seen = 0
    for tile_start in range(start, stop, _TILE):
        tile_bits = bits[tile_start : min(tile_start + _TILE, stop)]
        # Whole tiles are counted in a vector loop and skipped.
        equal_t = np.int32(0)
        for i in range(tile_bits.size):
            equal_t = np.int32(equal_t + np.int32(signed_key32(tile_bits[i]) == key32))
        if seen + equal_t <= skip:
            seen += equal_t
            continue
        for i in range(tile_bits.size):
            if signed_key32(tile_bits[i]) == key32:
                if seen == skip:
                    return tile_start + i
                seen += 1
    return stop


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _apply_mask_kernel(bits, keep, magnitude_mask, zero, n_blocks):
    """bits = 0 where not keep; returns per block how many are zero afterwards.

    ``zero`` comes typed like ``bits``: numba compares unsigned with signed via float64.
    """
    n = bits.size
    zeros_per_block = np.zeros(n_blocks, np.int64)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        block_bits = bits[start:stop]  # indexed from 0: see blocks.py
        block_keep = keep[start:stop]
        n_zero = 0
        for i in range(block_bits.size):
            value = block_bits[i] if block_keep[i] else zero
            block_bits[i] = value
            n_zero += (value & magnitude_mask) == zero
        zeros_per_block[block] = n_zero
    return zeros_per_block


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _count_zeros_kernel(bits, magnitude_mask, zero, n_blocks):
    n = bits.size
    zeros_per_block = np.zeros(n_blocks, np.int64)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        block_bits = bits[start:stop]  # indexed from 0: see blocks.py
        n_zero = 0
        for i in range(block_bits.size):
            n_zero += (block_bits[i] & magnitude_mask) == zero
        zeros_per_block[block] = n_zero
    return zeros_per_block
