"""Threshold selection: the k-th smallest score over one array or a stream of arrays.

Global pruning needs the k-th smallest score of a whole model without building a
model-sized array, so :func:`kth_smallest` reads the scores as a stream of chunks and
finds the answer in two reads of the stream:

1. *Sample.* A stratified sample (one element at a hashed position in every stratum of
   ``_STRATUM`` consecutive elements of the stream) estimates how many elements lie below
   any key. From it come two keys ``lo`` and ``hi`` that bracket the k-th smallest with a
   margin of several standard deviations of that estimate. Small streams are copied whole
   instead and answered exactly, in this one read.
2. *Bracket.* One parallel pass counts the elements below ``lo``, equal to ``lo`` and equal
   to ``hi``, and collects the few (about 0.5 % of 100 M) strictly between them; the answer
   is then selected among those.

If the bracket misses (the sample was unlucky, or ``chunks`` changed between reads) the
answer comes from an exact two-pass radix select on the high and low 16 key bits, so the
result never depends on luck, only the time does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from .blocks import block_range, parallel_blocks
from .flags import NUMBA_CACHE, NUMBA_FASTMATH
from .keys import (
    KEY_MAX,
    KEY_MIN,
    key_of_value,
    keys_of,
    signed_key,
    signed_key32,
    value_of_key,
)

__all__ = ["Threshold", "count_below_equal", "kth_smallest", "kth_smallest_array"]

logger = logging.getLogger(__name__)

# One sample per stratum of this many stream elements: 390 k samples per 100 M scores,
# enough to bracket the answer within about 0.6 % of the stream.
_STRATUM = 256
# Streams up to this many elements are copied whole during the sampling read and
# answered exactly: cheaper than a second read, and only 4 MiB of keys.
_EXACT_LIMIT = 1 << 20
# Bracket half-width, in standard deviations of the sample's rank estimate.
_MARGIN_SIGMAS = 5.0
# Elements per tile of the bracket pass: the flags of one tile stay in L1.
_TILE = 4096
_SEED = 0x9E3779B97F4A7C15
_NOT_SAMPLED = -(2**62)  # outside the range of keys


@dataclass(frozen=True)
class Threshold:
    """The k-th smallest score and where it sits among all scores (in key order).

    ``value`` is the float32 score (exactly representable as a Python float), ``n_below``
    counts scores strictly below it and ``n_equal`` scores with the same key, so
    ``n_below < k <= n_below + n_equal``.
    """

    value: float
    n_below: int
    n_equal: int


def kth_smallest(chunks: Callable[[], Iterable[np.ndarray]], k: int) -> Threshold:
    """The k-th smallest (1-based) of all float32 scores yielded by ``chunks()``.

    ``chunks`` must yield the same C-contiguous float32 arrays (any shapes), in the same
    order, every time it is called: once for streams of at most 2**20 scores, otherwise
    twice, and four times in the rare fallback. Scores are ordered by sortable key (NaN
    largest, -0.0 below +0.0). Nothing model-sized is allocated: the memory used is a
    sample of 1/256 of the stream plus about 1 % of the largest chunk.
    Raises ValueError unless ``1 <= k <= total``, TypeError for non-float32 chunks.
    """
    k = _as_count(k, "k")
    sampled = _sample_stream(chunks)
    if not 1 <= k <= sampled.total:
        raise ValueError(f"k must be in [1, {sampled.total}], got {k}")
    if sampled.exact_keys is not None:
        return _select_in_keys(sampled.exact_keys, k, n_before=0)
    answer = _bracket_select(chunks, k, sampled)
    if answer is None:
        logger.debug("sample bracket missed the %d-th smallest; radix select instead", k)
        answer = _radix_select(chunks, k, sampled.sizes)
    return answer


def kth_smallest_array(scores: np.ndarray, k: int) -> Threshold:
    """The k-th smallest (1-based) of one C-contiguous float32 array, in key order."""
    _check_scores(scores, "scores")
    return kth_smallest(lambda: (scores,), k)


def count_below_equal(scores: np.ndarray, value: float) -> tuple[int, int]:
    """How many scores have a key below that of ``value``, and how many the same key."""
    _check_scores(scores, "scores")
    with parallel_blocks(scores.size) as n_blocks:
        parts = _count_below_equal_kernel(_as_bits(scores), key_of_value(value), n_blocks)
    below, equal = parts.sum(axis=0)
    return int(below), int(equal)


# ---------------------------------------------------------------------------------------
# Pass 1: stratified sample (or an exact copy of a small stream)


@dataclass
class _Sample:
    total: int
    sizes: list[int]
    sample_counts: list[int]  # samples taken from each chunk, in order
    keys: np.ndarray  # one signed key per stratum that landed on an element
    exact_keys: np.ndarray | None  # every key, when the stream is small


def _sample_stream(chunks: Callable[[], Iterable[np.ndarray]]) -> _Sample:
    sizes: list[int] = []
    samples: list[np.ndarray] = []
    exact: list[np.ndarray] | None = []
    offset = 0
    for chunk in chunks():
        _check_scores(chunk, "each chunk")
        bits = _as_bits(chunk)
        sizes.append(bits.size)
        if bits.size:
            with parallel_blocks(bits.size // _STRATUM, 1 << 12) as n_blocks:
                keys = _stratified_sample_kernel(bits, offset, _STRATUM, _SEED, n_blocks)
            samples.append(keys[keys != _NOT_SAMPLED])
        else:
            samples.append(np.empty(0, np.int64))
        offset += bits.size
        if exact is not None and offset <= _EXACT_LIMIT:
            # Keys, not the chunk itself: a generator may reuse its buffer.
            exact.append(keys_of(chunk))
        else:
            exact = None
    keys = np.concatenate(samples) if samples else np.empty(0, np.int64)
    exact_keys = None
    if exact is not None:
        exact_keys = np.concatenate(exact) if exact else np.empty(0, np.int64)
    return _Sample(offset, sizes, [part.size for part in samples], keys, exact_keys)


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _stratified_sample_kernel(bits, offset, stratum, seed, n_blocks):
    """Keys at the hashed position of every stratum that starts or ends in this chunk.

    Strata are counted over the whole stream (``offset`` is the chunk's first position),
    so each sample stands for exactly ``stratum`` elements whichever chunk it falls in.
    The first and last strata may place their sample outside the chunk: those entries
    are ``_NOT_SAMPLED``. The loads are random, so two threads halve the latency.
    """
    n = bits.size
    first = offset // stratum
    n_strata = (offset + n - 1) // stratum - first + 1
    keys = np.empty(n_strata, np.int64)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n_strata)
        for index in range(start, stop):
            stratum_index = first + index
            position = stratum_index * stratum + _hash_below(stratum_index, seed, stratum)
            position -= offset
            in_chunk = 0 <= position < n
            keys[index] = signed_key(bits[position]) if in_chunk else _NOT_SAMPLED
    return keys


@njit(inline="always")
def _hash_below(index, seed, bound):
    """splitmix64 of ``index``, reduced to [0, bound): a reproducible, well-mixed offset."""
    z = np.uint64(index) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.int64(z % np.uint64(bound))


# ---------------------------------------------------------------------------------------
# Pass 2: count around the bracket and collect what lies inside it


def _bracket(sample: np.ndarray, total: int, k: int) -> tuple[int, int]:
    """Keys ``lo <= k-th smallest <= hi`` with high probability, from the sample."""
    # Each sample stands for _STRATUM elements; the variance of the estimated count below
    # any key is at most _STRATUM**2 * n_strata * p * (1 - p) with p its fraction (Jensen).
    p = min(max(k / total, 1.0 / total), 1.0)
    sigma = _STRATUM * math.sqrt(max(sample.size, 1) * p * (1.0 - p) + 1.0)
    margin = _MARGIN_SIGMAS * sigma + 2 * _STRATUM
    lo_index = math.floor((k - margin) / _STRATUM) - 1
    hi_index = math.ceil((k + margin) / _STRATUM)
    wanted = [i for i in (lo_index, hi_index) if 0 <= i < sample.size]
    ordered = np.partition(sample, wanted) if wanted else sample
    # KEY_MIN is no element's key (it would be a NaN's), so as ``lo`` nothing is below or
    # equal to it; KEY_MAX is NaN's key, and as ``hi`` nothing is above it.
    lo = int(ordered[lo_index]) if 0 <= lo_index < sample.size else KEY_MIN
    hi = int(ordered[hi_index]) if 0 <= hi_index < sample.size else KEY_MAX
    if lo >= hi:
        # One tie across the whole bracket: widen it by one key, so none is counted twice.
        lo, hi = (lo, lo + 1) if lo < KEY_MAX else (hi - 1, hi)
    return lo, hi


def _bracket_select(
    chunks: Callable[[], Iterable[np.ndarray]], k: int, sampled: _Sample
) -> Threshold | None:
    lo, hi = _bracket(sampled.keys, sampled.total, k)
    sample_inside = (sampled.keys > lo) & (sampled.keys < hi)
    inside_so_far = np.concatenate(([0], np.cumsum(sample_inside)))
    sample_ends = np.cumsum(sampled.sample_counts)
    inside_per_chunk = np.diff(inside_so_far[np.concatenate(([0], sample_ends))])
    n_below = n_equal_lo = n_equal_hi = 0
    inside: list[np.ndarray] = []
    sizes: list[int] = []
    for chunk in chunks():
        _check_scores(chunk, "each chunk")
        bits = _as_bits(chunk)
        if len(sizes) == len(sampled.sizes) or bits.size != sampled.sizes[len(sizes)]:
            return None
        # Room for twice the count inside the bracket that the chunk's sample predicts,
        # plus slack; each block gets it all, as the chunk may be sorted.
        expected = int(inside_per_chunk[len(sizes)]) * _STRATUM
        sizes.append(bits.size)
        if bits.size == 0:
            continue
        capacity = min(bits.size, 2 * expected + 8 * _STRATUM + 4096)
        with parallel_blocks(bits.size) as n_blocks:
            counts, collected = _bracket_kernel(bits, lo, hi, capacity, _TILE, n_blocks)
        if (counts[:, 2] > capacity).any():
            return None
        n_below += int(counts[:, 0].sum())
        n_equal_lo += int(counts[:, 1].sum())
        n_equal_hi += int(counts[:, 3].sum())
        inside.extend(collected[block, : counts[block, 2]].copy() for block in range(len(counts)))
    if sizes != sampled.sizes:
        return None
    if k <= n_below:
        return None
    if k <= n_below + n_equal_lo:
        return Threshold(value_of_key(lo), n_below, n_equal_lo)
    n_before = n_below + n_equal_lo
    n_inside = sum(part.size for part in inside)
    if k <= n_before + n_inside:
        return _select_in_keys(np.concatenate(inside), k - n_before, n_before)
    if k <= n_before + n_inside + n_equal_hi:
        return Threshold(value_of_key(hi), n_before + n_inside, n_equal_hi)
    return None


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _bracket_kernel(bits, lo, hi, capacity, tile, n_blocks):
    """Per block: counts (below lo, equal lo, inside, equal hi) and the keys inside.

    The counting loop is branch-free int32 work so it vectorizes; it also writes one flag
    byte per element, and a second loop over the (L1-resident) flags, eight at a time,
    copies out the rare elements inside the bracket.
    """
    n = bits.size
    counts = np.zeros((n_blocks, 4), np.int64)
    collected = np.empty((n_blocks, capacity), np.int32)
    lo32 = np.int32(lo)
    hi32 = np.int32(hi)
    # lo < key < hi as one signed compare: shift (lo, hi) onto [KEY_MIN, ...) with
    # wrapping int32 arithmetic, where the open interval becomes key + shift < width.
    shift = np.int32(KEY_MIN - lo - 1)
    width = np.int32(KEY_MIN + (hi - lo - 1))
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        flags = np.zeros(tile, np.uint8)
        flag_words = flags.view(np.uint64)
        n_below = 0
        n_equal_lo = 0
        n_equal_hi = 0
        n_inside = 0
        for tile_start in range(start, stop, tile):
            tile_bits = bits[tile_start : min(tile_start + tile, stop)]  # see blocks.py
            # int32 counters (see signed_key32), flushed to int64 once per tile.
            below_t = np.int32(0)
            equal_lo_t = np.int32(0)
            equal_hi_t = np.int32(0)
            for i in range(tile_bits.size):
                key = signed_key32(tile_bits[i])
                below_t = np.int32(below_t + np.int32(key < lo32))
                equal_lo_t = np.int32(equal_lo_t + np.int32(key == lo32))
                equal_hi_t = np.int32(equal_hi_t + np.int32(key == hi32))
                flags[i] = np.int32(key + shift) < width
            n_below += below_t
            n_equal_lo += equal_lo_t
            n_equal_hi += equal_hi_t
            flags[tile_bits.size :] = 0
            for word in range((tile_bits.size + 7) // 8):
                if flag_words[word] != 0:
                    for j in range(word * 8, word * 8 + 8):
                        if flags[j]:
                            if n_inside < capacity:
                                collected[block, n_inside] = signed_key32(tile_bits[j])
                            n_inside += 1
        counts[block, 0] = n_below
        counts[block, 1] = n_equal_lo
        counts[block, 2] = n_inside
        counts[block, 3] = n_equal_hi
    return counts, collected


def _select_in_keys(keys: np.ndarray, k: int, n_before: int) -> Threshold:
    """The k-th smallest of a small array of keys, offset by ``n_before`` elements."""
    key = np.partition(keys, k - 1)[k - 1]
    n_below = int(np.count_nonzero(keys < key))
    n_equal = int(np.count_nonzero(keys == key))
    return Threshold(value_of_key(int(key)), n_before + n_below, n_equal)


# ---------------------------------------------------------------------------------------
# Fallback: exact radix select, high 16 key bits then low 16 bits


def _radix_select(
    chunks: Callable[[], Iterable[np.ndarray]], k: int, sizes: list[int]
) -> Threshold:
    high = np.zeros(1 << 16, np.int64)
    for chunk in _same_chunks(chunks, sizes):
        with parallel_blocks(chunk.size) as n_blocks:
            high += _histogram_kernel(_as_bits(chunk), -1, n_blocks).sum(axis=0)
    high_bin, n_before = _bin_of_rank(high, k)
    low = np.zeros(1 << 16, np.int64)
    for chunk in _same_chunks(chunks, sizes):
        with parallel_blocks(chunk.size) as n_blocks:
            low += _histogram_kernel(_as_bits(chunk), high_bin, n_blocks).sum(axis=0)
    low_bin, n_before_low = _bin_of_rank(low, k - n_before)
    key = ((high_bin << 16) | low_bin) + KEY_MIN
    return Threshold(value_of_key(key), n_before + n_before_low, int(low[low_bin]))


def _same_chunks(chunks: Callable[[], Iterable[np.ndarray]], sizes: list[int]):
    seen = []
    for chunk in chunks():
        _check_scores(chunk, "each chunk")
        seen.append(chunk.size)
        yield chunk
    if seen != sizes:
        raise ValueError("chunks() must yield the same arrays every time it is called")


def _bin_of_rank(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th smallest (1-based) and the count in bins before it."""
    cumulative = np.cumsum(histogram)
    bin_index = int(np.searchsorted(cumulative, rank))
    return bin_index, int(cumulative[bin_index] - histogram[bin_index])


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _histogram_kernel(bits, high_bin, n_blocks):
    """Per-block histograms of unsigned keys: high 16 bits (``high_bin`` < 0), or the low
    16 bits of the keys whose high 16 bits are ``high_bin``."""
    n = bits.size
    histograms = np.zeros((n_blocks, 1 << 16), np.int64)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        block_bits = bits[start:stop]  # indexed from 0: see blocks.py
        for i in range(block_bits.size):
            unsigned_key = signed_key(block_bits[i]) - KEY_MIN
            if high_bin < 0:
                histograms[block, unsigned_key >> 16] += 1
            elif unsigned_key >> 16 == high_bin:
                histograms[block, unsigned_key & 0xFFFF] += 1
    return histograms


# ---------------------------------------------------------------------------------------
# Counting


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH, parallel=True)
def _count_below_equal_kernel(bits, key, n_blocks):
    n = bits.size
    counts = np.zeros((n_blocks, 2), np.int64)
    key32 = np.int32(key)
    for block in prange(n_blocks):
        start, stop = block_range(block, n_blocks, n)
        below = 0
        equal = 0
        for tile_start in range(start, stop, _TILE):
            tile_bits = bits[tile_start : min(tile_start + _TILE, stop)]  # see blocks.py
            below_t = np.int32(0)
            equal_t = np.int32(0)
            for i in range(tile_bits.size):
                element_key = signed_key32(tile_bits[i])
                below_t = np.int32(below_t + np.int32(element_key < key32))
                equal_t = np.int32(equal_t + np.int32(element_key == key32))
            below += below_t
            equal += equal_t
        counts[block, 0] = below
        counts[block, 1] = equal
    return counts


# ---------------------------------------------------------------------------------------
# Validation


def _check_scores(scores: np.ndarray, name: str) -> None:
    if not isinstance(scores, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(scores).__name__}")
    if scores.dtype != np.float32:
        raise TypeError(f"{name} must be float32 scores, got {scores.dtype}")
    if not scores.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _as_bits(scores: np.ndarray) -> np.ndarray:
    """The float32 bits as a flat int32 view (no copy)."""
    return scores.reshape(-1).view(np.int32)


def _as_count(value: int, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)
