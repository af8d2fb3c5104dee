"""N:M masks: keep the N largest scores of every M consecutive columns, and audit them.

Within a group, score j beats score i when its key is larger, or equal with a lower
column (so among ties the lower column is kept). Group ``g`` of a C-contiguous
``[rows, cols]`` matrix with ``cols % m == 0`` is simply the flat range ``[g*m, g*m + m)``,
so every kernel walks flat groups and ignores rows.
"""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .blocks import block_range, parallel_blocks
from .flags import NUMBA_CACHE, NUMBA_FASTMATH
from .integer_views import check_float_weights, magnitude_bits_mask, unsigned_view
from .keys import signed_key, signed_key32

__all__ = ["nm_keep_mask", "nm_violations"]

MAX_M = 256
# Up to this group size the O(m^2) rank count (vectorized compares) beats a quickselect
# per group (measured: 152 vs 178 ms per 8 M scores at m = 32, 262 vs 164 at m = 64).
_RANK_COUNT_MAX_M = 32
# A group is a few bytes, so blocks are counted in groups with a smaller minimum.
_MIN_BLOCK_GROUPS = 1 << 13


def nm_keep_mask(scores2d: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean keep-mask keeping exactly the ``n`` largest of every ``m`` consecutive columns.

    ``scores2d`` is a C-contiguous float32 ``[rows, cols]`` matrix with ``cols % m == 0``
    and ``0 < n < m <= 256``. Largest means largest key (NaN above +inf, +0.0 above -0.0);
    among equal scores the lower column is kept.
    """
    _check_matrix(scores2d, "scores2d")
    if scores2d.dtype != np.float32:
        raise TypeError(f"scores2d must be float32, got {scores2d.dtype}")
    _check_pattern(scores2d.shape[1], n, m)
    keep = np.empty(scores2d.shape, dtype=np.bool_)
    bits = scores2d.reshape(-1).view(np.int32)
    n_groups = bits.size // m
    with parallel_blocks(n_groups, _MIN_BLOCK_GROUPS) as n_blocks:
        if m == 4 and sys.byteorder == "little":
            # Each group's four bools are written as one little-endian integer.
            _keep_n_of_4_kernel(bits, n, keep.reshape(-1).view(np.uint32), n_blocks)
        elif m <= _RANK_COUNT_MAX_M:
            _keep_by_rank_kernel(bits, n, m, keep.reshape(-1), n_blocks)
        else:
            _keep_by_partition_kernel(bits, n, m, keep.reshape(-1), n_blocks)
    return keep


def nm_violations(weights2d: np.ndarray, n: int, m: int) -> int:
    """How many groups of ``m`` consecutive columns (per row) hold more than ``n`` non-zeros.

    ``weights2d`` is a C-contiguous ``[rows, cols]`` float matrix (float16, bfloat16,
    float32 or float64) with ``cols % m == 0``; -0.0 counts as zero, NaN as non-zero.
    """
    _check_matrix(weights2d, "weights2d")
    check_float_weights(weights2d, "weights2d")
    _check_pattern(weights2d.shape[1], n, m)
    bits = unsigned_view(weights2d)
    n_groups = bits.size // m
    mask = magnitude_bits_mask(bits.dtype)
    with parallel_blocks(n_groups, _MIN_BLOCK_GROUPS) as n_blocks:
        parts = _violations_kernel(bits, mask, mask.dtype.type(0), n, m, n_blocks)
    return int(parts.sum())


def _check_matrix(matrix: np.ndarray, name: str) -> None:
    if not isinstance(matrix, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(matrix).__name__}")
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {matrix.shape}")
    if not matrix.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _check_pattern(cols: int, n: int, m: int) -> None:
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if not 0 < n < m <= MAX_M:
        raise ValueError(f"N:M pattern needs 0 < n < m <= {MAX_M}, got {n}:{m}")
    if cols % m:
        raise ValueError(f"the number of columns ({cols}) must be a multiple of m ({m})")


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _keep_n_of_4_kernel(bits, n, keep_words, n_blocks):
    """m = 4 (2:4 and friends): two groups per step in LLVM vector code, one 8-byte store."""
    n_groups = keep_words.size
    n32 = np.int32(n)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n_groups)
        block_bits = bits[4 * start : 4 * stop]  # indexed from 0: see blocks.py
        block_words = keep_words[start:stop]
        pairs = block_words[: block_words.size // 2 * 2].view(np.uint64)
        for pair in range(pairs.size):
            pairs[pair] = _keep_bytes_of_2_groups(block_bits, 8 * pair, n32)
        if block_words.size % 2:
            last = block_words.size - 1
            block_words[last] = _keep_bytes_of_1_group(block_bits, 4 * last, n32)


def _make_keep_bytes_intrinsic(lanes: int):
    """An intrinsic ``(bits int32[:], start, n) -> uint`` for the ``lanes // 4`` groups of 4
    at ``bits[start:start + lanes]``: byte j of the result is 1 if that score is kept.

    Written in LLVM IR (llvmlite, numba's own code generator) because numba's loop
    vectorizer turns the plain-Python version into a 4-way de-interleave across vector
    registers, with cross-lane shuffles and spills, while the ranks of a group only need
    rotations within 128-bit lanes: 89 -> 63 ms per 100 M scores on one Zen 1 core.
    Per lane i and rotation d, partner p = i + d mod 4 beats i if key[p] > key[i], or
    equal and p < i (ties keep the lower column): key[p] > key[i] - (p < i), as no key is
    the int32 minimum. The key is the one of signed_key32.
    """
    vector = ir.VectorType(_I32, lanes)

    def splat(value: int) -> ir.Constant:
        return ir.Constant(vector, [ir.Constant(_I32, value)] * lanes)

    def lane_constant(values: list[int]) -> ir.Constant:
        return ir.Constant(vector, [ir.Constant(_I32, value) for value in values])

    @intrinsic
    def keep_bytes(typingctx, bits_type, start_type, n_type):
        if not (isinstance(bits_type, types.Array) and bits_type.dtype == types.int32):
            return None
        result_type = types.uint32 if lanes == 4 else types.uint64
        signature = result_type(bits_type, types.int64, types.int32)

        def codegen(context, builder, signature, args):
            bits, start, n = args
            array = context.make_array(signature.args[0])(context, builder, bits)
            address = builder.bitcast(builder.gep(array.data, [start]), vector.as_pointer())
            raw = builder.load(address, align=4)
            flip = builder.and_(builder.ashr(raw, splat(31)), splat(0x7FFFFFFF))
            key = builder.xor(raw, flip)
            is_nan = builder.icmp_signed(
                ">", builder.and_(raw, splat(0x7FFFFFFF)), splat(0x7F800000)
            )
            key = builder.select(is_nan, splat(0x7FFFFFFF), key)
            minus_rank = None  # -(number of partners that beat each lane), from -1/0 masks
            for d in (1, 2, 3):
                partner = [4 * (i // 4) + (i + d) % 4 for i in range(lanes)]
                partner_is_lower = [int((i + d) % 4 < i % 4) for i in range(lanes)]
                rotated = builder.shuffle_vector(
                    key, ir.Constant(vector, ir.Undefined), lane_constant(partner)
                )
                beats = builder.icmp_signed(
                    ">", rotated, builder.sub(key, lane_constant(partner_is_lower))
                )
                beats = builder.sext(beats, vector)
                minus_rank = beats if minus_rank is None else builder.add(minus_rank, beats)
            # Kept: rank < n, i.e. -rank > -n.
            minus_n = builder.sub(ir.Constant(_I32, 0), n)
            minus_n = builder.insert_element(
                ir.Constant(vector, ir.Undefined), minus_n, ir.Constant(_I32, 0)
            )
            minus_n = builder.shuffle_vector(
                minus_n, ir.Constant(vector, ir.Undefined), lane_constant([0] * lanes)
            )
            kept = builder.icmp_signed(">", minus_rank, minus_n)
            kept_bytes = builder.zext(kept, ir.VectorType(ir.IntType(8), lanes))
            # Lane 0 is the lowest byte: the bools' memory order on little-endian machines.
            return builder.bitcast(kept_bytes, ir.IntType(8 * lanes))

        return signature, codegen

    return keep_bytes


_I32 = ir.IntType(32)
_keep_bytes_of_1_group = _make_keep_bytes_intrinsic(4)
_keep_bytes_of_2_groups = _make_keep_bytes_intrinsic(8)


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _keep_by_rank_kernel(bits, n, m, keep, n_blocks):
    """Small m: count, for each column, the columns of its group that beat it."""
    n_groups = keep.size // m
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n_groups)
        block_bits = bits[start * m : stop * m]  # indexed from 0: see blocks.py
        block_keep = keep[start * m : stop * m]
        keys = np.empty(m, np.int32)
        for group in range(stop - start):
            base = group * m
            for j in range(m):
                keys[j] = signed_key32(block_bits[base + j])
            for i in range(m):
                key = keys[i]
                rank = np.int32(0)
                for j in range(i):
                    rank = np.int32(rank + np.int32(keys[j] >= key))
                for j in range(i + 1, m):
                    rank = np.int32(rank + np.int32(keys[j] > key))
                block_keep[base + i] = rank < n


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _keep_by_partition_kernel(bits, n, m, keep, n_blocks):
    """Large m: unique composite keys (key, then lower column) and a quickselect per group."""
    n_groups = keep.size // m
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n_groups)
        block_bits = bits[start * m : stop * m]  # indexed from 0: see blocks.py
        block_keep = keep[start * m : stop * m]
        composite = np.empty(m, np.int64)
        scratch = np.empty(m, np.int64)
        for group in range(stop - start):
            base = group * m
            for j in range(m):
                composite[j] = signed_key(block_bits[base + j]) * MAX_M + (MAX_M - 1 - j)
                scratch[j] = composite[j]
            # The (m - n)-th smallest composite (0-based) is the smallest one kept.
            smallest_kept = _select_in_place(scratch, m - n)
            for j in range(m):
                block_keep[base + j] = composite[j] >= smallest_kept


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH)
def _select_in_place(values, rank):
    """The rank-th smallest (0-based) of distinct ``values``, reordering them (quickselect).

    Hand-written because ``np.partition`` inside a parallel kernel took 25 s to compile.
    """
    lo = 0
    hi = values.size - 1
    while lo < hi:
        # Median of three as pivot, so sorted groups do not make it quadratic.
        mid = (lo + hi) // 2
        a, b, c = values[lo], values[mid], values[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i = lo
        j = hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if rank <= j:
            hi = j
        elif rank >= i:
            lo = i
        else:
            return values[rank]
    return values[rank]


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _violations_kernel(bits, magnitude_mask, zero, n, m, n_blocks):
    n_groups = bits.size // m
    parts = np.zeros(n_blocks, np.int64)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n_groups)
        block_bits = bits[start * m : stop * m]  # indexed from 0: see blocks.py
        violations = 0
        for group in range(stop - start):
            non_zero = 0
            for j in range(group * m, group * m + m):
                non_zero += (block_bits[j] & magnitude_mask) != zero
            violations += non_zero > n
        parts[block] = violations
    return parts
