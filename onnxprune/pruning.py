"""The prune job: discover targets, score, mask, hand the pruned weights to a store.

Each target is read once into memory, the only target-sized buffer: its scores and masks
are computed in chunks of `CHUNK_ELEMENTS` weights and applied in place, so pruning holds
one target plus a few MiB. Where the weights go is the caller's choice (`store`): into the
proto by default, or straight to the output file (`streaming.prune_file`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from . import formats, kernels
from .allocation import GlobalThreshold, ScoreThreshold
from .config import CALIB_METHODS, Pattern, PruneConfig
from .errors import NothingToPruneError
from .io import LoadedModel, iter_chunks, read_array, write_array
from .report import SkipReport, TargetReport
from .scoring import put_zeros_first, random_generator
from .targets import Selection, SkippedTensor, WeightTarget, discover_targets

log = logging.getLogger(__name__)

Progress = Callable[[WeightTarget], None]
# where pruned weights go; returns how they were stored (None: dense, as they are)
Store = Callable[[WeightTarget, np.ndarray], "formats.StoreResult | None"]

# Weights per chunk of scores and masks (8 MiB of float32 scores): few enough kernel calls
# that their parallel start-up stays small (1 Mi-element chunks were ~15 % slower), little
# beside a large target (a 2:4 chunk holds about four chunk-sized buffers at once).
CHUNK_ELEMENTS = 1 << 21
# Weights per block of the 2:4 audit, which usually stops at the first block
AUDIT_ELEMENTS = 1 << 16


def selection_of(config: PruneConfig) -> Selection:
    return Selection(config.include, config.exclude, config.min_size, config.pattern)


def prune_loaded(loaded: LoadedModel, config: PruneConfig,
                 progress: Progress | None = None, store: Store | None = None
                 ) -> tuple[list[TargetReport], list[SkipReport]]:
    """Prune every target of `loaded`. Returns per-target and skipped reports.

    `store(target, weights)` receives each target's pruned weights (stored shape and dtype)
    and owns them from then on; by default they are written into `loaded.proto`.
    """
    # a sparse or compact input is pruned from its dense values
    if formats.densify_model(loaded.proto, loaded.base_dir):
        log.info("stored sparse/compact tensors turned dense before pruning")
    targets, skipped = discover_targets(loaded.proto, selection_of(config))
    if not targets:
        raise NothingToPruneError(
            f"nothing to prune: no tensor qualified as a target ({len(skipped)} skipped; "
            "run `onnxprune inspect` to see why, or lower --min-size)")
    store = store or store_in_proto(loaded, config)
    if config.method in CALIB_METHODS:
        return _prune_calibrated(loaded, targets, skipped, config, progress, store)
    pattern = config.pattern
    global_threshold = None
    if config.scope == "global" and not pattern.is_nm:
        def stored_scores(target: WeightTarget) -> Iterator[np.ndarray]:
            pieces = iter_chunks(target.tensor, loaded.base_dir, CHUNK_ELEMENTS)
            return score_chunks(config.method, target, pieces, config.seed)

        global_threshold = GlobalThreshold(targets, stored_scores, config.target_sparsity)

    reports = []
    for target in targets:
        weights = read_array(target.tensor, loaded.base_dir, writable=True)
        zeros_before = kernels.count_zeros(weights)
        if pattern.is_nm:
            zeros = _prune_nm(target, weights, config)
        else:
            zeros = _prune_unstructured(target, weights, config, global_threshold)
        # the mask just applied is itself 2:4 (or finer): no need to audit the weights
        known_2_4 = _implies_2_4(pattern) and target.reduction_length % 4 == 0
        report = target_report(target, weights, zeros, "dense", str(pattern),
                               zeros_before, is_2_4=True if known_2_4 else None)
        _record_storage(report, store(target, weights))
        reports.append(report)
        del weights  # before the next target is read: one target in memory at a time
        log.info("%s: %d of %d zero (%s)", target.name, zeros, target.numel, pattern)
        if progress:
            progress(target)
    return reports, [skip_report(s) for s in skipped]


def store_in_proto(loaded: LoadedModel, config: PruneConfig, write_dense=write_array) -> Store:
    """A store writing each target into the proto in the configured format."""
    def store(target: WeightTarget, weights: np.ndarray):
        if config.format == "dense":
            write_dense(target.tensor, weights)
            return None
        return formats.store(target, weights, config.format, config.pattern,
                             model=loaded.proto, write_dense=write_dense)
    return store


def _record_storage(report: TargetReport, result) -> None:
    if result is not None:
        report.format, report.bytes, report.format_reason = (result.format, result.bytes,
                                                             result.reason)


def _prune_calibrated(loaded: LoadedModel, targets: list[WeightTarget],
                      skipped: list[SkippedTensor], config: PruneConfig,
                      progress: Progress | None, store: Store
                      ) -> tuple[list[TargetReport], list[SkipReport]]:
    """wanda / obd / sparsegpt: statistics of each target's input from calibration data."""
    from .calib import load_calibration
    from .calibrated import prune_with_calibration

    feeds = load_calibration(config.calib, loaded.proto, config.calib_samples, config.seed)
    results = prune_with_calibration(
        loaded, targets, feeds, method=config.method, pattern=config.pattern,
        sparsity=config.target_sparsity, calib_mode=config.calib_mode, progress=progress)
    reports = []
    for target in targets:
        result = results[target.name]  # already written into loaded.proto
        weights = result.weights
        report = target_report(target, weights, result.zeros, "dense", str(config.pattern),
                               result.zeros_before)
        report.method = result.method
        report.reconstruction_error = result.reconstruction_error
        report.calibration_tokens = result.tokens
        _record_storage(report, store(target, np.array(weights)))
        reports.append(report)
    return reports, [skip_report(s) for s in skipped]


def _prune_unstructured(target: WeightTarget, weights: np.ndarray, config: PruneConfig,
                        threshold: ScoreThreshold | None) -> int:
    """Zero the lowest-scored weights in place (the layer's own count unless a global
    threshold is given); returns the zeros after."""
    flat = weights.reshape(-1)

    def chunks() -> Iterator[np.ndarray]:
        return score_chunks(config.method, target, _pieces(flat), config.seed)

    if threshold is None:
        threshold = ScoreThreshold(chunks, flat.size, config.target_sparsity)
    zeros = start = 0
    for scores in chunks():  # scores of a chunk are taken before the chunk is masked
        keep = threshold.keep_mask(scores)
        zeros += kernels.apply_mask(flat[start:start + scores.size], keep)
        start += scores.size
    return zeros


def _prune_nm(target: WeightTarget, weights: np.ndarray, config: PruneConfig) -> int:
    """Keep the N best of every M weights along the reduction axis, block by block."""
    pattern = config.pattern
    blocks = list(_reduction_blocks(target, weights, pattern.m, CHUNK_ELEMENTS))
    scores_of_blocks = score_chunks(config.method, target, (b.reshape(-1) for b in blocks),
                                    config.seed)
    zeros = 0
    for block, scores in zip(blocks, scores_of_blocks, strict=True):
        keep = _in_block_layout(kernels.nm_keep_mask(_as_matrix(scores.reshape(block.shape)),
                                                     pattern.n, pattern.m), block.shape)
        zeros += kernels.apply_mask(block, keep)
    return zeros


def _reduction_blocks(target: WeightTarget, weights: np.ndarray, m: int,
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


def score_chunks(method: str, target: WeightTarget, pieces: Iterable[np.ndarray],
                 seed: int = 0) -> Iterator[np.ndarray]:
    """Scores (flat float32) of consecutive flat pieces of the target's weights, in order.

    Together they equal `scoring.score` of the whole target, piece by piece, made into one
    reused buffer: a chunk is valid until the next is asked for.
    """
    if method not in ("magnitude", "random"):
        raise ValueError(f"no scorer for method {method!r}")
    buffer = np.empty(0, np.float32)
    # one generator run through the pieces gives the same stream as one call for all
    generator = random_generator(target, seed)
    for piece in pieces:
        if buffer.size < piece.size:
            buffer = np.empty(piece.size, np.float32)
        scores = buffer[:piece.size]
        if method == "random":
            generator.random(piece.size, dtype=np.float32, out=scores)
            put_zeros_first(scores, piece)
        else:
            kernels.magnitude_scores(piece, out=scores)
        yield scores


def _implies_2_4(pattern: Pattern) -> bool:
    """N:M patterns whose groups tile every aligned group of 4 with at most 2 non-zeros."""
    return pattern.is_nm and 4 % pattern.m == 0 and pattern.n * (4 // pattern.m) <= 2


def audit_2_4(target: WeightTarget, weights: np.ndarray) -> bool:
    """Whether every group of 4 along the reduction axis has at most 2 non-zeros.

    Checked block by block (no transposed copy of the whole target); stops at the first
    violation.
    """
    if target.reduction_length % 4:
        return False
    for block in _reduction_blocks(target, np.ascontiguousarray(weights), 4, AUDIT_ELEMENTS):
        if kernels.nm_violations(_as_matrix(block), 2, 4):
            return False
    return True


def target_report(target: WeightTarget, weights: np.ndarray, zeros: int, fmt: str,
                  pattern: str, zeros_before: int | None = None,
                  is_2_4: bool | None = None) -> TargetReport:
    """The report of one target; `is_2_4` is audited from the weights unless given."""
    if is_2_4 is None:
        is_2_4 = audit_2_4(target, weights)
    return TargetReport(
        name=target.name, op_type=target.op_type, shape=list(target.shape), dtype=target.dtype,
        axis=target.reduction_axis, numel=target.numel, zeros=int(zeros),
        sparsity=zeros / target.numel if target.numel else 0.0, pattern=pattern, format=fmt,
        source=target.source, bytes=target.nbytes, is_2_4=is_2_4,
        zeros_before=zeros_before,
        consumers=[f"{c.node}:{c.slot}" for c in target.consumers])


def skip_report(skipped: SkippedTensor) -> SkipReport:
    return SkipReport(skipped.name, skipped.reason, list(skipped.shape), skipped.dtype,
                      skipped.source)
