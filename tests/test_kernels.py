"""onnxprune.kernels against their slow twins in tests/naive.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import naive
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxprune import kernels
from onnxprune.kernels import keys, select

REPO_ROOT = Path(__file__).resolve().parent.parent
WEIGHT_DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
FAST = settings(max_examples=40, deadline=None)

# float32 bit patterns that break careless code: signed zeros and infinities, NaNs of both
# signs and several payloads, subnormals, the extremes, and plain ones that tie.
SPECIAL_BITS = [
    0x00000000,  # +0.0
    0x80000000,  # -0.0
    0x7F800000,  # +inf
    0xFF800000,  # -inf
    0x7FC00000,  # NaN
    0xFFC00000,  # -NaN
    0x7F800001,  # signalling NaN
    0xFFFFFFFF,  # -NaN, all payload bits
    0x00000001,  # smallest subnormal
    0x80000001,
    0x7F7FFFFF,  # largest finite
    0xFF7FFFFF,
    0x3F800000,  # 1.0
    0xBF800000,  # -1.0
    0x3F000000,  # 0.5
]


def float32_arrays(shape) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays of any bit patterns, often special ones and often tied."""
    elements = st.one_of(
        st.sampled_from(SPECIAL_BITS),
        st.integers(0, 2**32 - 1),
        st.integers(0x3F800000, 0x3F800004),
    )
    return hnp.arrays(np.uint32, shape, elements=elements).map(lambda bits: bits.view(np.float32))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def same_threshold(threshold: kernels.Threshold, expected: tuple[float, int, int]) -> bool:
    value, n_below, n_equal = expected
    return (
        naive.same_float32(threshold.value, value)
        and threshold.n_below == n_below
        and threshold.n_equal == n_equal
    )


def weights_with_zeros(dtype, shape, seed=0) -> np.ndarray:
    """Random weights of ``dtype`` with some +0.0, -0.0, NaN and inf sprinkled in."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape)
    specials = rng.integers(0, 8, shape)
    values[specials == 0] = 0.0
    values[specials == 1] = -0.0
    values[(specials == 2) & (rng.random(shape) < 0.2)] = np.nan
    values[(specials == 3) & (rng.random(shape) < 0.2)] = -np.inf
    return values.astype(dtype)


# --- keys and scores ---------------------------------------------------------------------


def test_key_order_puts_minus_zero_below_zero_and_nan_on_top():
    ordered = np.array(
        [-np.inf, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, np.inf, np.nan], dtype=np.float32
    )
    signed = keys.keys_of(ordered)
    assert np.all(np.diff(signed) > 0)
    negative_nan = np.array([0xFFC00000], dtype=np.uint32).view(np.float32)
    assert keys.keys_of(negative_nan)[0] == signed[-1]
    # The kernels' signed key is the spec's unsigned key shifted down by 2**31.
    assert np.array_equal(signed + 2**31, naive.sortable_keys(ordered))
    for value in ordered:
        assert keys.value_of_key(keys.key_of_value(float(value))) == value or np.isnan(value)


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_magnitude_scores_match_abs_for_every_dtype(dtype):
    weights = weights_with_zeros(dtype, (37, 23))
    for layout in (weights, weights.T, weights[:, ::3]):
        expected = naive.magnitude_scores(layout)
        nan = np.isnan(expected)
        buffer = np.full(layout.shape, 7.0, np.float32)
        for scores in (kernels.magnitude_scores(layout),
                       kernels.magnitude_scores(layout, out=buffer)):
            assert scores.dtype == np.float32 and scores.flags.c_contiguous
            assert np.array_equal(np.isnan(scores), nan)
            assert same_bits(scores[~nan], expected[~nan])
        assert kernels.magnitude_scores(layout, out=buffer) is buffer


def test_magnitude_scores_rejects_a_wrong_out_buffer():
    weights = np.ones((4, 6), np.float32)
    for out in (np.empty((4, 5), np.float32), np.empty((4, 6), np.float64),
                np.empty((6, 4), np.float32).T):
        with pytest.raises(ValueError):
            kernels.magnitude_scores(weights, out=out)


def test_magnitude_scores_of_bfloat16_widen_exactly():
    bits = np.arange(0, 2**16, dtype=np.uint32).astype(np.uint16)
    weights = bits.view(ml_dtypes.bfloat16)
    scores = kernels.magnitude_scores(weights)
    expected = (bits.astype(np.uint32) & 0x7FFF) << 16
    assert np.array_equal(scores.view(np.uint32), expected)


def test_magnitude_scores_rejects_non_float():
    with pytest.raises(TypeError):
        kernels.magnitude_scores(np.arange(4))


def test_random_scores_are_seeded_uniform_float32():
    first = kernels.random_scores((30, 40), seed=7)
    assert first.dtype == np.float32 and first.shape == (30, 40)
    assert np.array_equal(first, kernels.random_scores((30, 40), seed=7))
    assert not np.array_equal(first, kernels.random_scores((30, 40), seed=8))
    assert 0.0 <= first.min() and first.max() < 1.0


@pytest.mark.slow
def test_read_bandwidth_probe_sums():
    values = np.random.default_rng(0).random(300_001, dtype=np.float32)
    assert kernels.read_bandwidth_probe(values) == pytest.approx(float(values.sum()), rel=1e-4)
    with pytest.raises(TypeError):
        kernels.read_bandwidth_probe(values.astype(np.float64))


# --- threshold selection -----------------------------------------------------------------


@FAST
@given(data=st.data(), scores=float32_arrays(st.integers(1, 300)))
def test_kth_smallest_array_matches_sort(data, scores):
    k = data.draw(st.integers(1, scores.size))
    threshold = kernels.kth_smallest_array(scores, k)
    assert same_threshold(threshold, naive.kth_smallest([scores], k))
    assert threshold.n_below < k <= threshold.n_below + threshold.n_equal


@FAST
@given(data=st.data(), parts=st.lists(float32_arrays(st.integers(0, 50)), min_size=1, max_size=6))
def test_kth_smallest_over_chunks_equals_whole_array(data, parts):
    whole = np.concatenate(parts)
    if whole.size == 0:
        with pytest.raises(ValueError):
            kernels.kth_smallest(lambda: iter(parts), 1)
        return
    k = data.draw(st.integers(1, whole.size))
    over_chunks = kernels.kth_smallest(lambda: iter(parts), k)
    whole_array = kernels.kth_smallest_array(whole, k)
    assert same_threshold(over_chunks, tuple(vars(whole_array).values()))


def large_scores(kind: str, size: int) -> np.ndarray:
    """Streams big enough (> 1 Mi elements) to take the sampled-bracket path."""
    rng = np.random.default_rng(len(kind))
    if kind == "normal":
        return rng.standard_normal(size).astype(np.float32)
    if kind == "few_values":  # huge ties, the answer sits inside a tie
        return rng.integers(0, 5, size).astype(np.float32)
    if kind == "zeros":
        return np.zeros(size, np.float32)
    if kind == "nan_and_signed_zeros":
        scores = rng.choice(np.array([np.nan, -0.0, 0.0, 1.0], np.float32), size)
        scores[: size // 3] = rng.random(size // 3)
        return scores
    if kind == "sorted":  # every chunk lies wholly below or above the answer
        return np.sort(np.abs(rng.standard_normal(size).astype(np.float32)))
    raise ValueError(kind)


def kth_of_sorted_keys(keys: np.ndarray, k: int) -> tuple[float, int, int]:
    """naive.kth_smallest for big inputs: the same rule on keys sorted once."""
    key = keys[k - 1]
    first, stop = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
    return naive.value_of_key(int(key)), int(first), int(stop - first)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["normal", "few_values", "zeros", "nan_and_signed_zeros", "sorted"]
)
def test_kth_smallest_large_stream_matches_sort(kind):
    size = 1_300_003
    scores = large_scores(kind, size)
    parts = np.array_split(scores, 7)
    calls = []

    def chunks():
        calls.append(1)
        return iter(parts)

    sorted_keys = np.sort(naive.sortable_keys(scores))
    for k in (1, 2, size // 10, size // 2, size * 9 // 10, size - 1, size):
        calls.clear()
        expected = kth_of_sorted_keys(sorted_keys, k)
        assert same_threshold(kernels.kth_smallest(chunks, k), expected), k
        assert len(calls) == 2  # one sampling read, one bracket read: no fallback needed


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["normal", "few_values", "nan_and_signed_zeros"])
def test_radix_fallback_matches_sort(kind, monkeypatch):
    scores = large_scores(kind, 1_100_000)
    parts = np.array_split(scores, 3)
    monkeypatch.setattr(select, "_bracket_select", lambda *args: None)
    sorted_keys = np.sort(naive.sortable_keys(scores))
    for k in (1, 77_777, 1_000_000, scores.size):
        expected = kth_of_sorted_keys(sorted_keys, k)
        assert same_threshold(kernels.kth_smallest(lambda: iter(parts), k), expected)


def test_bracket_miss_is_detected():
    scores = large_scores("normal", 1_100_000)
    sampled = select._sample_stream(lambda: iter([scores]))
    # A sample that claims every score is tiny puts the bracket far below the answer.
    misleading = select._Sample(
        sampled.total, sampled.sizes, sampled.sample_counts, sampled.keys * 0 - 2**31 + 1, None
    )
    assert select._bracket_select(lambda: iter([scores]), 900_000, misleading) is None


def test_kth_smallest_rejects_bad_arguments():
    scores = np.arange(10, dtype=np.float32)
    for k in (0, 11, -1):
        with pytest.raises(ValueError):
            kernels.kth_smallest_array(scores, k)
    with pytest.raises(TypeError):
        kernels.kth_smallest_array(scores, 2.0)
    with pytest.raises(TypeError):
        kernels.kth_smallest_array(scores.astype(np.float64), 1)
    with pytest.raises(ValueError):
        kernels.kth_smallest_array(scores[::2], 1)
    with pytest.raises(TypeError):
        kernels.kth_smallest(lambda: [scores, scores.astype(np.float16)], 1)


def test_kth_smallest_rejects_a_stream_that_changes():
    big = large_scores("normal", 1_100_000)
    streams = iter([[big], [big[:-1]], [big[:-1]], [big[:-1]]])
    with pytest.raises(ValueError, match="same arrays"):
        kernels.kth_smallest(lambda: next(streams), 5)


@FAST
@given(data=st.data(), scores=float32_arrays(st.integers(0, 200)))
def test_count_below_equal_matches_naive(data, scores):
    pool = [float(v) for v in scores[:5]] + [0.0, -0.0, float("nan"), float("inf"), 1.0]
    value = data.draw(st.sampled_from(pool))
    assert kernels.count_below_equal(scores, value) == naive.count_below_equal(scores, value)


# --- unstructured masks ------------------------------------------------------------------


@FAST
@given(data=st.data(), scores=float32_arrays(hnp.array_shapes(min_dims=1, max_dims=3, max_side=9)))
def test_unstructured_keep_mask_prunes_exactly_k(data, scores):
    k = data.draw(st.integers(1, scores.size))
    threshold = kernels.kth_smallest_array(scores, k)
    keep = kernels.unstructured_keep_mask(scores, threshold.value, k - threshold.n_below)
    assert keep.shape == scores.shape and keep.dtype == np.bool_
    assert np.count_nonzero(~keep) == k
    expected = naive.unstructured_keep_mask(scores, threshold.value, k - threshold.n_below)
    assert np.array_equal(keep, expected)


@pytest.mark.parametrize("k", [1, 123_456, 250_000, 399_999, 400_000])
def test_unstructured_keep_mask_ties_across_blocks(k):
    # Few distinct values: the threshold ties with ~80 k scores spread over every block,
    # so the blocks after the first k - n_below equal scores must give theirs back.
    scores = np.random.default_rng(3).integers(0, 5, 400_000).astype(np.float32)
    scores[::7] = -0.0
    threshold = kernels.kth_smallest_array(scores, k)
    n_equal_to_prune = k - threshold.n_below
    keep = kernels.unstructured_keep_mask(scores, threshold.value, n_equal_to_prune)
    assert np.count_nonzero(~keep) == k
    expected = naive.unstructured_keep_mask(scores, threshold.value, n_equal_to_prune)
    assert np.array_equal(keep, expected)


@pytest.mark.parametrize("n_ties", [300, 600, 5000])
@pytest.mark.parametrize("where", ["first", "around_256", "last"])
def test_unstructured_keep_mask_noted_and_scanned_ties(n_ties, where):
    # Each block notes the positions of its first 256 equal scores; past that it scans.
    # Cover quotas inside, at and beyond the noted ones, in two blocks.
    rng = np.random.default_rng(n_ties)
    scores = rng.random(300_000, dtype=np.float32) + 1.0
    scores[rng.choice(scores.size, n_ties, replace=False)] = 0.5
    n_equal_to_prune = {"first": 1, "around_256": 256, "last": n_ties - 1}[where]
    keep = kernels.unstructured_keep_mask(scores, 0.5, n_equal_to_prune)
    assert np.count_nonzero(~keep) == n_equal_to_prune
    assert np.array_equal(keep, naive.unstructured_keep_mask(scores, 0.5, n_equal_to_prune))


def test_unstructured_keep_mask_rejects_bad_arguments():
    scores = np.array([1.0, 2.0, 2.0, 3.0], np.float32)
    with pytest.raises(ValueError):
        kernels.unstructured_keep_mask(scores, 2.0, 3)  # only two scores equal 2.0
    with pytest.raises(ValueError):
        kernels.unstructured_keep_mask(scores, 2.0, -1)
    with pytest.raises(TypeError):
        kernels.unstructured_keep_mask(scores.astype(np.float64), 2.0, 0)
    with pytest.raises(ValueError):
        kernels.unstructured_keep_mask(scores[::2], 2.0, 0)
    assert kernels.unstructured_keep_mask(np.zeros((0, 3), np.float32), 1.0, 0).shape == (0, 3)


# --- N:M masks ---------------------------------------------------------------------------

PATTERNS = [(1, 4), (2, 4), (3, 4), (1, 2), (2, 8), (5, 16), (3, 32), (7, 64), (1, 256), (255, 256)]


@pytest.mark.slow
@FAST
@given(
    data=st.data(),
    pattern=st.sampled_from(PATTERNS),
    rows=st.integers(1, 3),
    groups=st.integers(1, 3),
)
def test_nm_keep_mask_matches_naive(data, pattern, rows, groups):
    n, m = pattern
    scores = data.draw(float32_arrays((rows, groups * m)))
    keep = kernels.nm_keep_mask(scores, n, m)
    assert np.all(keep.reshape(-1, m).sum(axis=1) == n)
    assert np.array_equal(keep, naive.nm_keep_mask(scores, n, m))


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (4, 8), (100, 128)])
def test_nm_keep_mask_many_blocks_with_ties(pattern):
    n, m = pattern
    # 21 525 groups whatever m: a block per thread, and an odd number in one of them.
    rng = np.random.default_rng(m)
    scores = rng.integers(0, 3, (21, 1025 * m)).astype(np.float32)
    scores[:, ::5] = -0.0
    scores[::3, ::11] = np.nan
    keep = kernels.nm_keep_mask(scores, n, m)
    assert np.all(keep.reshape(-1, m).sum(axis=1) == n)
    assert np.array_equal(keep, naive.nm_keep_mask(scores, n, m))


def test_nm_keep_mask_keeps_lower_column_among_ties():
    scores = np.array([[1, 1, 1, 1, 0, 2, 2, 0]], np.float32)
    keep = kernels.nm_keep_mask(scores, 2, 4)
    assert keep.tolist() == [[True, True, False, False, False, True, True, False]]
    single = kernels.nm_keep_mask(np.array([[-0.0, 0.0, np.nan, np.inf]], np.float32), 1, 4)
    assert single.tolist() == [[False, False, True, False]]


def test_nm_keep_mask_rejects_bad_arguments():
    scores = np.zeros((2, 8), np.float32)
    for n, m in ((0, 4), (4, 4), (2, 3), (1, 512)):
        with pytest.raises(ValueError):
            kernels.nm_keep_mask(scores, n, m)
    with pytest.raises(ValueError):
        kernels.nm_keep_mask(np.zeros(8, np.float32), 2, 4)
    with pytest.raises(ValueError):
        kernels.nm_keep_mask(np.zeros((8, 2), np.float32).T, 2, 4)
    with pytest.raises(TypeError):
        kernels.nm_keep_mask(scores.astype(np.float64), 2, 4)
    assert kernels.nm_keep_mask(np.zeros((0, 8), np.float32), 2, 4).shape == (0, 8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pattern", [(2, 4), (1, 4), (3, 8)])
def test_nm_violations_match_naive(dtype, pattern):
    n, m = pattern
    weights = weights_with_zeros(dtype, (17, 8 * m), seed=m)
    assert kernels.nm_violations(weights, n, m) == naive.nm_violations(weights, n, m)
    keep = kernels.nm_keep_mask(kernels.magnitude_scores(weights), n, m)
    kernels.apply_mask(weights, keep)
    assert kernels.nm_violations(weights, n, m) == 0


# --- applying masks and counting zeros ---------------------------------------------------


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (70_001,), (2, 3, 4)])
def test_apply_mask_zeros_pruned_and_keeps_bits(dtype, shape):
    weights = weights_with_zeros(dtype, shape, seed=len(shape))
    keep = np.random.default_rng(1).random(shape) < 0.6
    expected, expected_zeros = naive.apply_mask(weights, keep)
    before = weights.copy()
    n_zero = kernels.apply_mask(weights, keep)
    bits = f"u{weights.dtype.itemsize}"
    assert np.array_equal(weights.view(bits), expected.view(bits))
    assert np.array_equal(weights.view(bits)[keep], before.view(bits)[keep])
    assert np.all(weights.view(bits)[~keep] == 0)
    assert n_zero == expected_zeros == kernels.count_zeros(weights)


def test_apply_mask_rejects_bad_arguments():
    weights = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError):
        kernels.apply_mask(weights, np.ones((4, 3), bool))
    with pytest.raises(TypeError):
        kernels.apply_mask(weights, np.ones((4, 4), np.uint8))
    with pytest.raises(ValueError):
        kernels.apply_mask(np.ones((4, 4), np.float32).T[:, :2], np.ones((4, 2), bool))
    read_only = np.ones((4, 4), np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        kernels.apply_mask(read_only, np.ones((4, 4), bool))
    with pytest.raises(TypeError):
        kernels.apply_mask(np.ones((4, 4), np.int32), np.ones((4, 4), bool))


@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_count_zeros_counts_both_signs(dtype):
    weights = weights_with_zeros(dtype, (123, 45), seed=5)
    assert kernels.count_zeros(weights) == naive.count_zeros(weights)
    assert kernels.count_zeros(weights.T) == naive.count_zeros(weights)
    tiny = np.array([0.0, -0.0, np.nan, 1e-30], dtype=dtype)
    assert kernels.count_zeros(tiny) == (3 if dtype == np.float16 else 2)  # float16 underflows


# --- disk cache --------------------------------------------------------------------------

CACHE_PROBE = textwrap.dedent(
    """
    import json
    import numpy as np
    from onnxprune.kernels import count_zeros
    from onnxprune.kernels.unstructured import _count_zeros_kernel

    count_zeros(np.zeros(10, np.float32))
    stats = _count_zeros_kernel.stats
    print(json.dumps({"hits": sum(stats.cache_hits.values()),
                      "misses": sum(stats.cache_misses.values())}))
    """
)


@pytest.mark.slow
def test_kernels_load_from_disk_cache_on_second_run(tmp_path):
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=python_path)
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", CACHE_PROBE],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"hits": 0, "misses": 1}  # compiled and saved
    assert runs[1] == {"hits": 1, "misses": 0}  # loaded, nothing compiled
    assert any(tmp_path.rglob("*.nbi"))
