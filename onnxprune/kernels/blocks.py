"""How a flat index range is cut into one contiguous block per thread.

Every parallel kernel writes per-block partial results (counts, histograms) inside its
``prange`` loop and leaves the reduction to the caller: numba fused a ``prange`` loop with
a reduction that followed it in the same function and ran the whole thing on one thread.
The block count is chosen in Python and passed in, because a kernel that calls
``numba.get_num_threads()`` itself cannot be cached.

Inner loops index a slice of the block (or of a tile of it) from 0, never ``a[start + i]``:
numba wraps negative indices, and unless LLVM can prove an index non-negative every load
gets a conditional fix-up that stops vectorization (measured: 2x slower counting).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
from numba import njit

# Below this many items per block, a thread costs more to wake than it saves.
MIN_BLOCK_ITEMS = 1 << 15


@contextmanager
def parallel_blocks(n_items: int, min_items: int = MIN_BLOCK_ITEMS) -> Iterator[int]:
    """Yield the block count for ``n_items``: one per thread, none below ``min_items``.

    With a single block the kernel runs with numba limited to this thread: waking the pool
    for nothing cost up to 48 ms per call on a machine busy with other work (measured on
    2 cores under load: 200 tiny calls took 470 ms with 2 threads, 32 ms with 1).
    """
    n_threads = numba.get_num_threads()
    n_blocks = max(1, min(n_threads, n_items // max(1, min_items)))
    if n_blocks > 1 or n_threads == 1:
        yield n_blocks
        return
    with numba_single_thread():
        yield n_blocks


@contextmanager
def numba_single_thread() -> Iterator[None]:
    """Run the numba kernels called inside on this thread only (thread-local setting).

    For loops that alternate kernels with OpenBLAS GEMMs: numba's pool and BLAS's spinning
    threads then compete for the cores, and both get slower (ADMM on a 1536 x 576 layer,
    2 cores: 20 iterations took about 320 ms with parallel kernels, 160 ms without).
    """
    n_threads = numba.get_num_threads()
    if n_threads == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n_threads)


@njit(inline="always")
def block_range(block, n_blocks, n_items):
    """The half-open item range ``[start, stop)`` of ``block``: sizes differ by at most 1."""
    return block * n_items // n_blocks, (block + 1) * n_items // n_blocks
