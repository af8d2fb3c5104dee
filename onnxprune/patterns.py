"""Scores -> keep-mask, and the checks that a pruned target meets its planned pattern.

A keep-mask is a boolean array in the stored layout of the weight, True where the weight
stays. Every mask here honours an *existing* mask: a weight an earlier step removed is never
revived (its score is made the lowest, and the new mask is and-ed with the old one).

Patterns are registered parts (`registry.PATTERNS`, each a `PatternRule`): `unstructured`
prunes an exact count per layer
(or per output row, for methods that compare within rows), `n:m` keeps the N best of every
M consecutive weights along the reduction axis. Each also says whether pruned weights meet
it (`holds`), which `PrunePass.ensures` and the report rely on.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from . import kernels
from .config import Pattern
from .parts import Part
from .targets import WeightTarget

# Weights per chunk of scores and masks (8 MiB of float32 scores): few enough kernel calls
# that their parallel start-up stays small (1 Mi-element chunks were ~15 % slower), little
# beside a large target (a 2:4 chunk holds about four chunk-sized buffers at once).
CHUNK_ELEMENTS = 1 << 21
# Weights per block of the N:M audit, which usually stops at the first block
AUDIT_ELEMENTS = 1 << 16
MASKED_SCORE = np.float32(-np.inf)  # below every real score: masked weights go first


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity removes: round half up, so 0.5 of 3 is 2."""
    return min(numel, int(np.floor(sparsity * numel + 0.5)))


def mask_scores(scores: np.ndarray, existing: np.ndarray | None) -> np.ndarray:
    """Scores with every weight an existing mask removed made the lowest (in place)."""
    if existing is not None:
        scores.reshape(-1)[~existing.reshape(-1)] = MASKED_SCORE
    return scores


# --------------------------------------------------------------------------- whole-array masks

def layer_keep_mask(scores: np.ndarray, count: int) -> np.ndarray:
    """Prune exactly the `count` lowest scores of the tensor (ties: lower flat index first)."""
    if count == 0:
        return np.ones(scores.shape, dtype=bool)
    threshold = kernels.kth_smallest_array(scores, count)
    return kernels.unstructured_keep_mask(scores, threshold.value, count - threshold.n_below)


def row_keep_mask(matrix_scores: np.ndarray, sparsity: float,
                  count: int | None = None) -> np.ndarray:
    """Prune ``prune_count(inputs, sparsity)`` from every row of [..., rows, inputs] scores.

    With `count` (an allocation's exact count for the whole target), exactly `count` are
    pruned: q = count // rows from every row, and one more from the `count % rows` rows
    whose next-lowest score is lowest (ties: lower row first).
    """
    from .kernels.obs_sweep import row_keep_mask as rows_kernel

    scores = np.asarray(matrix_scores, dtype=np.float32)
    matrix = scores.reshape(-1, scores.shape[-1])
    if count is None:
        return rows_kernel(matrix, prune_count(matrix.shape[1], sparsity)).reshape(scores.shape)
    rows = matrix.shape[0]
    per_row, extra = divmod(count, rows) if rows else (0, 0)
    keep = rows_kernel(matrix, per_row)
    if extra:
        more = rows_kernel(matrix, per_row + 1)
        next_lowest = np.where(keep & ~more, matrix, np.inf).min(axis=1)
        chosen = np.argsort(next_lowest, kind="stable")[:extra]
        keep[chosen] = more[chosen]
    return keep.reshape(scores.shape)


def nm_keep_mask(target: WeightTarget, scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Keep the N best of every M along the target's reduction axis (stored layout)."""
    matrix = np.ascontiguousarray(target.to_matrix(scores))
    keep = kernels.nm_keep_mask(matrix, pattern.n, pattern.m)
    return target.from_matrix(keep)


# --------------------------------------------------------------------------- streamed masks

ScoreChunks = Callable[[Iterable[np.ndarray]], Iterator[np.ndarray]]


class ScoreThreshold:
    """Prunes exactly `count` of a stream of scores: the lowest, under one threshold.

    `chunks()` yields the scores (flat float32 arrays) in a fixed order and is read twice to
    find the threshold, so nothing stream-sized is built. Afterwards `keep_mask` is called
    on the same scores again, chunk by chunk in the same order (chunk boundaries may differ):
    ties at the threshold are pruned in stream order, so the total is exact and
    deterministic.
    """

    def __init__(self, chunks: Callable[[], Iterable[np.ndarray]], count: int):
        self.k = count
        self.value = 0.0
        self.n_below = 0
        self.equal_budget = 0
        if self.k:
            threshold = kernels.kth_smallest(chunks, self.k)
            self.value = threshold.value
            self.n_below = threshold.n_below
            self.equal_budget = self.k - threshold.n_below

    def keep_mask(self, scores: np.ndarray) -> np.ndarray:
        """The keep mask of the next scores of the stream."""
        if self.k == 0:
            return np.ones(scores.shape, dtype=bool)
        take = 0
        if self.equal_budget:  # usually spent in the first chunk: ties are rare
            _, equal = kernels.count_below_equal(scores, self.value)
            take = min(equal, self.equal_budget)
            self.equal_budget -= take
        return kernels.unstructured_keep_mask(scores, self.value, take)


def prune_streamed(target: WeightTarget, weights: np.ndarray, pattern: Pattern, count: int,
                   score_chunks: ScoreChunks) -> int:
    """Mask `weights` in place chunk by chunk (one target + a few MiB); returns the zeros.

    Unstructured: the `count` lowest scores of the tensor. N:M: blocks of whole groups
    along the reduction axis. `score_chunks(pieces)` scores flat pieces of the weights.
    """
    if pattern.is_nm:
        blocks = list(reduction_blocks(target, weights, pattern.m, CHUNK_ELEMENTS))
        zeros = 0
        for block, scores in zip(blocks, score_chunks(b.reshape(-1) for b in blocks),
                                 strict=True):
            matrix = _as_matrix(scores.reshape(block.shape))
            keep = _in_block_layout(kernels.nm_keep_mask(matrix, pattern.n, pattern.m),
                                    block.shape)
            zeros += kernels.apply_mask(block, keep)
        return zeros
    flat = weights.reshape(-1)
    threshold = ScoreThreshold(lambda: score_chunks(_pieces(flat)), count)
    zeros = start = 0
    for scores in score_chunks(_pieces(flat)):  # scores are taken before the chunk is masked
        keep = threshold.keep_mask(scores)
        zeros += kernels.apply_mask(flat[start:start + scores.size], keep)
        start += scores.size
    return zeros


def reduction_blocks(target: WeightTarget, weights: np.ndarray, m: int,
                     max_elements: int) -> Iterator[np.ndarray]:
    """C-contiguous [a, r, b] views of the weights, in flat order, with whole groups of m.

    The stored tensor is seen as [A, R, B] with R the reduction axis; a block holds whole
    [R, B] slabs, or, where one slab is larger than `max_elements`, rows r0:r1 of one slab
    with r0 a multiple of m, so no group of m along R is cut.
    """
    shape = tuple(target.shape)
    axis = target.reduction_axis
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    length = shape[axis]
    if weights.size == 0:
        return
    view = weights.reshape(outer, length, inner)
    slab = length * inner
    if slab <= max_elements or length <= m:
        per_block = max(1, max_elements // slab)
        for a0 in range(0, outer, per_block):
            yield view[a0:a0 + per_block]
        return
    rows = max(m, max_elements // inner // m * m)
    for a in range(outer):
        for r0 in range(0, length, rows):
            yield view[a:a + 1, r0:r0 + rows]


def _as_matrix(block: np.ndarray) -> np.ndarray:
    """[a, r, b] -> C-contiguous [a*b, r]: the reduction axis last, as `to_matrix` does."""
    a, r, b = block.shape
    return np.ascontiguousarray(np.moveaxis(block, 1, -1)).reshape(a * b, r)


def _in_block_layout(matrix: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    a, r, b = shape
    return np.ascontiguousarray(np.moveaxis(matrix.reshape(a, b, r), -1, 1))


def _pieces(flat: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, flat.size, CHUNK_ELEMENTS):
        yield flat[start:start + CHUNK_ELEMENTS]


# --------------------------------------------------------------------------- pattern checks

def nm_holds(target: WeightTarget, weights: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of m along the reduction axis has at most n non-zeros.

    Checked block by block (no transposed copy of the whole target); stops at the first
    violation.
    """
    if target.reduction_length % m:
        return False
    for block in reduction_blocks(target, np.ascontiguousarray(weights), m, AUDIT_ELEMENTS):
        if kernels.nm_violations(_as_matrix(block), n, m):
            return False
    return True


def audit_2_4(target: WeightTarget, weights: np.ndarray) -> bool:
    """Whether the weights are 2:4 sparse along the reduction axis (what sparse tensor cores
    accelerate), whatever pattern they were pruned with."""
    return nm_holds(target, weights, 2, 4)


def implies_2_4(pattern: Pattern) -> bool:
    """N:M patterns whose groups tile every aligned group of 4 with at most 2 non-zeros."""
    return pattern.is_nm and 4 % pattern.m == 0 and pattern.n * (4 // pattern.m) <= 2


class PatternRule(Part):
    """Which positions a pattern lets a pruned target have zeros in."""

    @abstractmethod
    def holds(self, target: WeightTarget, weights: np.ndarray, pattern: Pattern, zeros: int,
              planned: int) -> bool:
        """Whether `weights` (with `zeros` zeros, `planned` of them planned) meet `pattern`."""


class UnstructuredRule(PatternRule):
    """Any positions; the planned count is a floor on the zeros (zeros already there count)."""

    name = "unstructured"
    description = "an exact count of weights anywhere in the target"

    def holds(self, target: WeightTarget, weights: np.ndarray, pattern: Pattern, zeros: int,
              planned: int) -> bool:
        return zeros >= planned


class NMRule(PatternRule):
    """At most N non-zeros in every group of M along the reduction axis."""

    name = "n:m"
    description = "N kept of every M consecutive weights along the reduction axis"

    def holds(self, target: WeightTarget, weights: np.ndarray, pattern: Pattern, zeros: int,
              planned: int) -> bool:
        return nm_holds(target, weights, pattern.n, pattern.m)


def pattern_rule(pattern: Pattern) -> PatternRule:
    """The registered check of a pattern: `n:m` for every N:M, else `unstructured`."""
    from .registry import PATTERNS

    return PATTERNS.build(NMRule.name if pattern.is_nm else UnstructuredRule.name)
