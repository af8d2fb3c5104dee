"""Importance scores that need no calibration data: magnitude and seeded random."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import block_range, parallel_blocks
from .flags import NUMBA_CACHE, NUMBA_FASTMATH
from .integer_views import BFLOAT16, check_float_weights

__all__ = ["magnitude_scores", "random_scores"]


def magnitude_scores(weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``|weights|``, same shape, C-contiguous; NaN stays NaN.

    ``weights`` may be float16, bfloat16, float32 or float64, in any memory layout.
    float16 and bfloat16 convert exactly; float64 rounds to nearest float32 (and values
    beyond float32's range become inf). ``out``: a C-contiguous float32 array of the same
    shape to write into (a reused buffer), returned.
    """
    check_float_weights(weights, "weights")
    if out is not None and (not isinstance(out, np.ndarray) or out.dtype != np.float32
                            or out.shape != weights.shape or not out.flags.c_contiguous
                            or not out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous float32 array of shape "
                         f"{weights.shape}")
    scores = np.empty(weights.shape, np.float32) if out is None else out
    if weights.dtype == np.float32:
        source = np.ascontiguousarray(weights)
        with parallel_blocks(source.size) as n_blocks:
            _abs_float32_kernel(
                source.reshape(-1).view(np.uint32), scores.reshape(-1).view(np.uint32), n_blocks
            )
    elif weights.dtype == BFLOAT16:
        # bfloat16 is the top half of a float32: widening is a shift, exact.
        source = np.ascontiguousarray(weights)
        with parallel_blocks(source.size) as n_blocks:
            _abs_bfloat16_kernel(
                source.reshape(-1).view(np.uint16), scores.reshape(-1).view(np.uint32), n_blocks
            )
    else:
        # float16 and float64: numpy's conversion (hardware F16C, correctly rounded
        # float64), then the sign bit is cleared in place.
        np.copyto(scores, weights, casting="same_kind")
        flat = scores.reshape(-1).view(np.uint32)
        with parallel_blocks(flat.size) as n_blocks:
            _abs_float32_kernel(flat, flat, n_blocks)
    return scores


def random_scores(shape: int | tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded uniform float32 scores in [0, 1): the same for the same shape and seed."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _abs_float32_kernel(source_bits, score_bits, n_blocks):
    """Clear the sign bit: |x| for every float32 including NaN (no float arithmetic)."""
    n = source_bits.size
    magnitude = np.uint32(0x7FFFFFFF)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        # Slices indexed from 0, so the loop vectorizes (see blocks.py).
        source = source_bits[start:stop]
        scores = score_bits[start:stop]
        for i in range(source.size):
            scores[i] = source[i] & magnitude


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _abs_bfloat16_kernel(source_bits, score_bits, n_blocks):
    n = source_bits.size
    magnitude = np.uint16(0x7FFF)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        source = source_bits[start:stop]
        scores = score_bits[start:stop]
        for i in range(source.size):
            scores[i] = np.uint32(source[i] & magnitude) << np.uint32(16)
