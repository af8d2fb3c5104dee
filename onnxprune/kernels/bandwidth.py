"""A memory-read probe: how fast this machine streams a float32 array through the cores."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import block_range, parallel_blocks
from .flags import NUMBA_CACHE

__all__ = ["read_bandwidth_probe"]

_TILE = 4096


def read_bandwidth_probe(array: np.ndarray) -> float:
    """Sum of a C-contiguous float32 array, read in parallel at full memory bandwidth.

    Benchmarks time it to learn the read bandwidth that other kernels are compared to.
    The sum is reassociated (per-thread, vector-lane partial sums), so it can differ from
    ``array.sum()`` in the last bits.
    """
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise TypeError("array must be a float32 numpy array")
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    flat = array.reshape(-1)
    with parallel_blocks(flat.size) as n_blocks:
        partial_sums = _sum_kernel(flat, n_blocks)
    return float(partial_sums.sum())


# Only reassociation is allowed (no "nnan"/"ninf"): without it LLVM must add in order, one
# add per cycle-latency, which is slower than memory; with it the loop uses vector lanes.
@njit(cache=NUMBA_CACHE, fastmath={"reassoc"}, parallel=True)
def _sum_kernel(values, n_blocks):
    n = values.size
    partial_sums = np.zeros(n_blocks, np.float64)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        total = 0.0
        for tile_start in range(start, stop, _TILE):
            tile = values[tile_start : min(tile_start + _TILE, stop)]  # see blocks.py
            # float32 lanes within a tile (fast), float64 across tiles (accurate).
            tile_total = np.float32(0.0)
            for i in range(tile.size):
                tile_total += tile[i]
            total += tile_total
        partial_sums[block] = total
    return partial_sums
