"""THE prune loop, for every method, pattern, allocation and format, in memory or file to file.

    plan (allocation) -> per target: read -> gather (nothing, ‖X_j‖², XᵀX) -> method (scores,
    or reconstructed weights) -> pattern (keep-mask, never reviving a masked weight) ->
    apply (kept values bit-identical unless the method reconstructs) -> check -> sink -> report

Targets whose method needs no calibration statistics go first, in target order, one in
memory at a time; those of magnitude/random are masked chunk by chunk. Calibrated targets
follow stage by stage (`calib.ActivationCapture`): in sequential mode a stage's targets are
captured on the model already pruned up to the previous stage, as SparseGPT does block by
block. Where the pruned weights go is the sink's business: into the proto, or straight to
the output file (`io.ModelWriter.put`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from . import formats, kernels, patterns
from .allocation import AllocationContext
from .config import PruneConfig
from .errors import ConfigError, NothingToPruneError
from .inputs import Feed
from .io import LoadedModel, write_array
from .mask_files import MaskSet
from .methods import Job, Method, Needs
from .patterns import (
    audit_2_4,
    implies_2_4,
    layer_keep_mask,
    mask_scores,
    nm_keep_mask,
    pattern_rule,
    prune_count,
    prune_streamed,
    row_keep_mask,
)
from .plan import PlanOrigin, PrunePlan, TargetPlan
from .recipe import apply_overrides, split_skipped
from .registry import ALLOCATIONS, FORMATS, METHODS, REFINES, UPDATES
from .report import SkipReport, TargetReport
from .targets import (
    SELECTION_CAUSES,
    Selection,
    SkipCause,
    SkippedTensor,
    WeightTarget,
    discover_targets,
    iter_weight_chunks,
    read_weights,
    stored_values,
)

if TYPE_CHECKING:
    from onnx import TensorProto

    from .calib.cache import CalibrationCache
    from .quantized import Grid

log = logging.getLogger(__name__)

Progress = Callable[[WeightTarget], None]
DenseWriter: TypeAlias = "Callable[[TensorProto, np.ndarray], None]"
CALIB_MODES = ("sequential", "one-pass")
# XᵀX that one-pass calibration gathers only for the report's errors, at most (bytes)
ONE_PASS_HESSIAN_BUDGET = 256 << 20


@dataclass
class PruneResult:
    """What one run of the loop did: per-target reports, skipped tensors, the plan, and the
    keep-masks (True = non-zero after pruning) when they were asked for."""

    targets: list[TargetReport]
    skipped: list[SkipReport]
    plan: PrunePlan
    masks: MaskSet = field(default_factory=MaskSet)
    permutations: list[dict] = field(default_factory=list)  # --permute-channels, per target


class Sink:
    """Where pruned weights go: into the proto, or through `write_dense` (a file writer)."""

    def __init__(self, loaded: LoadedModel, config: PruneConfig,
                 write_dense: DenseWriter = write_array, streaming: bool = False):
        self.loaded = loaded
        self.format = FORMATS.build(config.format, config.options)
        self.write_dense = write_dense
        # a streaming writer also takes the new tensors of compact forms at once
        self.write_payload = write_dense if streaming else None

    def put(self, target: WeightTarget, weights: np.ndarray, plan: TargetPlan,
            grid: Grid | None = None):
        """Store a target's new values, given in its stored form (`stored_values`);
        `grid`: a quantized target's grid."""
        if (grid is not None and self.format.name != "dense" and not grid.symmetric
                and target.quant is not None and not target.quant.packed):
            blocker = formats.Blocker(formats.DenseCause.ZERO_POINT)
            log.warning("%s: stays dense: %s", target.name, blocker.reason)
            self.write_dense(target.stored_tensor, weights)
            return formats.StoreResult("dense", weights.nbytes, blocker)
        return self.format.store(target, weights, plan.pattern, self.loaded.proto,
                                 self.write_dense, self.write_payload)


def selection_of(config: PruneConfig) -> Selection:
    return Selection(config.include, config.exclude, config.min_size, config.pattern)


def run(loaded: LoadedModel, config: PruneConfig, *, sink: Sink | None = None,
        masks: Mapping[str, np.ndarray] | None = None, fixed_masks: bool = False,
        want_masks: bool = False, progress: Progress | None = None,
        feeds: Sequence[Feed] | None = None,
        calibration: CalibrationCache | None = None) -> PruneResult:
    """Prune every target of `loaded` as `config` plans it.

    `masks` (keep-masks by target name, stored shape) are honoured: a weight they remove is
    never kept; with `fixed_masks` they are applied exactly (the method only reconstructs,
    if it does). `want_masks` returns the keep-masks of the result. `feeds`: calibration
    samples already in memory, used instead of `config.calib`. `calibration` keeps the
    samples and one-pass statistics across runs on the same model (a search's trials). With
    `config.permute_channels`, the input channels of N:M targets that allow it are permuted
    in `loaded.proto` after the plan is made and before anything is pruned
    (`channel_permutation.py`).
    """
    if formats.densify_model(loaded.proto, loaded.base_dir):
        log.info("stored sparse/compact tensors turned dense before pruning")
    targets, skipped = discover_targets(loaded.proto, selection_of(config))
    if config.overrides:
        targets, skipped_by_override = split_skipped(targets, config.overrides)
        skipped += skipped_by_override
    dropped = _dropped_by_selection(skipped)
    if not targets:
        causes = "; ".join(f"{count} {words}" for (_, words), count in dropped.items())
        # a quantized model's weights in a form onnxprune cannot prune: name the op
        unsupported = [s for s in skipped if s.cause is SkipCause.QUANTIZED_FORM]
        if unsupported:
            causes = "; ".join(filter(None, [causes, f"{len(unsupported)} quantized form not "
                                                     f"supported, e.g. {unsupported[0].reason}"]))
        raise NothingToPruneError(
            f"nothing to prune: no tensor qualified as a target ({len(skipped)} skipped"
            + (f": {causes}" if causes else "") + "; run `onnxprune inspect` to see why)")
    for (cause, words), count in dropped.items():
        if cause is SkipCause.AXIS_NOT_MULTIPLE:
            log.warning("%d of %d weights skipped: %s", count, count + len(targets), words)
    masks = _checked_masks(masks or {}, targets)
    plan = make_plan(loaded, targets, config, feeds)
    permutations: list[dict] = []
    if config.permute_channels:
        from .channel_permutation import permute_channels

        permutations, feeds = permute_channels(loaded, targets, plan, config, feeds, masks)
    if feeds is None and calibration is not None and config.calib is not None:
        feeds = calibration.feeds(config, loaded.proto)
    loop = _Loop(loaded, config, plan, sink or Sink(loaded, config), masks,
                 fixed_masks, want_masks, progress, feeds, calibration)
    reports = loop.run(targets)
    return PruneResult([reports[t.name] for t in targets], [skip_report(s) for s in skipped],
                       plan, loop.masks_out, permutations)


def _dropped_by_selection(skipped: list[SkippedTensor]) -> dict[tuple[SkipCause, str], int]:
    """Weights that would be targets but for the options (N:M axis, --include, --exclude,
    --min-size), counted by cause (and by pattern, for the N:M axis), with its words."""
    causes: dict[tuple[SkipCause, str], int] = {}
    for item in skipped:
        if item.cause not in SELECTION_CAUSES:
            continue
        if item.cause is SkipCause.AXIS_NOT_MULTIPLE:
            pattern = item.axis_pattern
            words = f"reduction axis not a multiple of {pattern.m} (pattern {pattern})"
        else:
            words = item.summary
        causes[item.cause, words] = causes.get((item.cause, words), 0) + 1
    return causes


def make_plan(loaded: LoadedModel, targets: list[WeightTarget], config: PruneConfig,
              feeds: Sequence[Feed] | None = None) -> PrunePlan:
    """The allocation's plan for `targets`; stored scores are streamed from `loaded`."""
    method = METHODS.build(config.method, config.options)

    def score_chunks(target: WeightTarget):
        pieces = iter_weight_chunks(target, loaded.base_dir, patterns.CHUNK_ELEMENTS)
        return method.score_chunks(target, pieces, config.seed)

    plan = ALLOCATIONS.build(config.allocation_name, config.options).plan(
        targets, config, AllocationContext(score_chunks, loaded, feeds))
    missing = [t.name for t in targets if t.name not in plan]
    if missing:
        raise ConfigError(f"allocation {config.allocation!r} planned no entry for "
                          f"{len(missing)} target(s), e.g. {missing[0]}")
    return apply_overrides(plan, targets, config.overrides) if config.overrides else plan


class _Loop:
    """One pass over the targets: everything `run` needs while it goes."""

    def __init__(self, loaded: LoadedModel, config: PruneConfig, plan: PrunePlan, sink: Sink,
                 masks: Mapping[str, np.ndarray], fixed_masks: bool, want_masks: bool,
                 progress: Progress | None, feeds: Sequence[Feed] | None,
                 calibration: CalibrationCache | None = None):
        self.loaded = loaded
        self.calibration = calibration
        self.config = config
        self.plan = plan
        self.sink = sink
        self.masks = masks
        self.fixed_masks = fixed_masks
        self.want_masks = want_masks
        self.progress = progress
        self.feeds = feeds
        self.masks_out = MaskSet()
        # pruned main-graph weights by stored name, for calibration stage sessions built
        # after them: the sink may have written them to a file or into another format
        self.pruned: dict[str, np.ndarray] | None = None
        self.reports: dict[str, TargetReport] = {}
        # rebuilt targets whose XᵀX is singular by count: (name, tokens, inputs)
        self.underdetermined: list[tuple[str, int, int]] = []
        # a weight update / mask refinement after the scores (they need calibration)
        self.update = None if config.update == "none" else UPDATES.build(config.update,
                                                                         config.options)
        self.refine = None if config.refine == "none" else REFINES.build(config.refine,
                                                                         config.options)
        self._methods: dict[str, Method] = {}
        # --float-reference: quantized targets that are rebuilt start from the float weights
        # they were rounded from
        self.reference = None
        if config.float_reference is not None:
            from .float_reference import FloatReference

            self.reference = FloatReference(config.float_reference)
        # --ray-address: a stage's reconstructions run as Ray tasks
        self.remote = None
        if config.ray_address is not None:
            from .remote import RemoteReconstruction

            self.remote = RemoteReconstruction(config.ray_address)

    def run(self, targets: list[WeightTarget]) -> dict[str, TargetReport]:
        set_total = getattr(self.progress, "set_total", None)
        if set_total is not None:  # a progress bar that can show how far along it is
            set_total(len(targets))
        methods = {t.name: self.method(self.plan[t.name].method) for t in targets}
        calibrated = [t for t in targets if self.calibrates(methods[t.name])]
        if self.config.calib is not None and not calibrated:
            log.warning("--calib is ignored: method %s uses no calibration data",
                        self.config.method)
        if not calibrated:
            for target in targets:
                self._prune(target, methods[target.name])
        else:
            self._prune_calibrated(targets, calibrated, methods)
        if self.reference is not None:
            self.reference.summary()
        if self.underdetermined:
            name, tokens, inputs = self.underdetermined[0]
            log.warning("%d rebuilt target(s) saw fewer calibration tokens than they have "
                        "inputs (e.g. %s: %d tokens for %d inputs): their reconstruction can "
                        "fit the calibration data exactly yet generalize worse; more calibration "
                        "samples help", len(self.underdetermined), name, tokens,
                        inputs)
        return self.reports

    def method(self, name: str) -> Method:
        """The method `name`, made once with the run's options."""
        if name not in self._methods:
            self._methods[name] = METHODS.build(name, self.config.options)
        return self._methods[name]

    # ------------------------------------------------------------------ calibration

    def _prune_calibrated(self, targets: list[WeightTarget], calibrated: list[WeightTarget],
                          methods: dict[str, Method]) -> None:
        from .calib import ActivationCapture, GraphIndex, calibration_feeds, target_view

        config = self.config
        index = GraphIndex(self.loaded.proto)
        self.pruned = {}
        views = []
        for target in targets:
            view = target_view(target, index) if target in calibrated else None
            if isinstance(view, str):
                log.warning("%s: cannot calibrate (%s); pruned by magnitude", target.name,
                            view)
                self._prune(target, self.method("magnitude"), note=view)
            elif view is None:
                self._prune(target, methods[target.name])
            else:
                views.append(view)
        if not views:
            return
        mode = self.calibration_mode(views, methods)
        hessian = self._gathers_hessians(views, methods, mode)
        # statistics of the dense model, kept across runs: only where this run's capture
        # would see the dense model too (nothing pruned before it, no channels permuted)
        cache = (self.calibration if mode == "one-pass" and not self.pruned
                 and not config.permute_channels else None)
        if cache is not None:
            kept = {id(view): cache.stats(view, hessian, config) for view in views}
            for view in views:
                stats = kept[id(view)]
                if stats is not None:
                    self._prune_view(view, stats, methods, {})
            views = [view for view in views if kept[id(view)] is None]
            if not views:
                return
        feeds = self.feeds if self.feeds is not None else calibration_feeds(
            config, self.loaded.proto)
        capture = ActivationCapture(self.loaded, index, views, feeds,
                                    sequential=mode == "sequential", hessian=hessian,
                                    weights=self.pruned)
        log.info("%d calibrated targets in %d stage(s) over %d samples (%s)", len(views),
                 capture.levels, len(feeds), mode)
        last_read = capture.last_stage_reading()
        for stage in capture.stages():
            # pruned weights that no later stage reads are not kept for the sessions
            for name in [n for n in self.pruned if last_read.get(n, -1) < stage.number]:
                del self.pruned[name]
            shared: dict = {}  # targets reading the same input share what methods cache
            # remote rebuilds are submitted for the whole stage first (they run meanwhile)
            stats_of = ({id(view): capture.stats_of(view) for view in stage.views}
                        if self.remote is not None else {})
            remote = self._rebuild_remotely(stage.views, methods, stats_of, shared)
            for view in stage.views:
                stats = stats_of.pop(id(view), None) or capture.stats_of(view)
                if cache is not None:
                    cache.keep(view, stats, config)
                capture.release(view)
                self._prune_view(view, stats, methods, shared.setdefault(view.inputs, {}),
                                 remote.get(view.target.name))

    def _prune_view(self, view, stats, methods: dict[str, Method], shared: dict,
                    rebuilt=None) -> None:
        """Prune a calibrated target with its statistics (by magnitude where no token
        reached it)."""
        target = view.target
        if stats.tokens == 0:
            note = "no calibration tokens reached this layer"
            log.warning("%s: %s; pruned by magnitude", target.name, note)
            self._prune(target, self.method("magnitude"), note=note)
            return
        if stats.nonfinite:
            log.warning("%s: %d calibration tokens had NaN/Inf inputs and were left out",
                        target.name, stats.nonfinite)
        self._prune(target, methods[target.name], view, stats, shared, rebuilt=rebuilt)

    def calibrates(self, method: Method) -> bool:
        """Whether a target pruned by `method` gets calibration statistics."""
        return bool(method.needs > Needs.NOTHING or self.config.measure_error or self.update
                    or self.refine)

    def calibration_mode(self, views: list, methods: dict[str, Method]) -> str:
        """The run's calib mode: the one asked for, else sequential if any part wants it
        (an update that rebuilds the weights wants later layers calibrated on them too)."""
        return self.config.calib_mode or max(
            [*(methods[v.target.name].default_calib_mode for v in views),
             getattr(self.update, "default_calib_mode", "one-pass")],
            key=lambda m: m == "sequential")

    def _gathers_hessians(self, views: list, methods: dict[str, Method], mode: str) -> bool:
        """Whether to gather XᵀX: parts that use it need it; otherwise it only serves the
        report's reconstruction errors, which one-pass mode, holding every input's XᵀX at
        once, gives up when they would take more than ONE_PASS_HESSIAN_BUDGET."""
        if (self.update is not None or self.refine is not None or self.config.measure_error
                or any(methods[v.target.name].needs >= Needs.HESSIAN for v in views)):
            return True
        if mode == "sequential":
            return True
        inputs = {key: view.groups * view.features ** 2 for view in views for key in view.inputs}
        size = 8 * sum(inputs.values())  # float64
        if size <= ONE_PASS_HESSIAN_BUDGET:
            return True
        log.warning("reconstruction errors are not measured: in one pass, XᵀX of %d layer "
                    "inputs would take %.0f MiB (--calib-mode sequential or --measure-error "
                    "measures them)",
                    len(inputs), size / 2**20)
        return False

    # ------------------------------------------------------------------ one target

    def _grid(self, target: WeightTarget) -> Grid | None:
        """A quantized target's grid (read once per target), else None."""
        return target.quant.grid(self.loaded.base_dir) if target.quant is not None else None

    def _starting_point(self, target: WeightTarget, weights: np.ndarray, grid: Grid | None,
                        rebuilds: bool) -> np.ndarray:
        """The values a method starts from: the target's `weights` as read, or where a
        quantized target is rebuilt and the float reference holds the float weights its
        integers were rounded from, those (writable)."""
        if self.reference is None or grid is None or not rebuilds:
            return weights
        plan = self.plan[target.name]
        if not (plan.pattern.is_nm or plan.prune_count(target.numel) or
                target.name in self.masks):
            return weights  # loses nothing: its integers stay as they are
        floats = self.reference.weights(target, grid, grid.quantize(weights))
        return weights if floats is None else floats

    def _job(self, target: WeightTarget, method: Method, weights: np.ndarray, view, stats,
             shared: dict | None, grid: Grid | None) -> Job:
        """What `method` gets for `target`: its weights, plan, statistics and masks."""
        plan = self.plan[target.name]
        if method.name != plan.method:
            plan = replace(plan, method=method.name)
        keep = self.masks.get(target.name)
        return Job(target, weights, plan, self.config.seed, view, stats, keep,
                   self.fixed_masks and keep is not None, {} if shared is None else shared,
                   self.config, grid)

    def _rebuild_remotely(self, stage_views, methods: dict[str, Method], stats_of,
                          shared: dict) -> dict:
        """Submit the reconstructions of a stage's targets as Ray tasks, all at once (they
        are independent); handles by target name, collected in target order by `_prune`."""
        handles: dict = {}
        remote = self.remote
        if remote is None:
            return handles
        for view in stage_views:
            stats = stats_of[id(view)]
            method = methods[view.target.name]
            if stats.tokens == 0 or not method.reconstructs:
                continue
            grid = self._grid(view.target)
            weights = self._starting_point(view.target, read_weights(
                view.target, self.loaded.base_dir, writable=True, grid=grid), grid, True)
            job = self._job(view.target, method, weights, view, stats,
                            shared.setdefault(view.inputs, {}), grid)
            handles[view.target.name] = remote.submit(method, job)
        return handles

    def _prune(self, target: WeightTarget, method: Method, view=None, stats=None,
               shared: dict | None = None, note: str = "", rebuilt=None) -> None:
        started = time.perf_counter()
        grid = self._grid(target)
        weights = read_weights(target, self.loaded.base_dir, writable=True, grid=grid)
        zeros_before = kernels.count_zeros(weights)
        calibrated = view is not None and stats is not None
        rebuilds = method.reconstructs or (calibrated and self.update is not None)
        weights = self._starting_point(target, weights, grid, rebuilds)
        original = None
        if stats is not None and stats.hessian is not None:  # before pruning, for the error
            original = view.to_obs(weights)
            if np.shares_memory(original, weights):  # weights are masked in place below
                original = original.copy()
        job = self._job(target, method, weights, view, stats, shared, grid)
        plan, keep, fixed = job.plan, job.keep, job.fixed
        fixed_keep = keep if fixed else None  # the mask to apply exactly, if any
        planned = (int(np.count_nonzero(~fixed_keep)) if fixed_keep is not None
                   else _planned_count(target, plan, method, view))
        if method.reconstructs:
            if view is None and method.needs > Needs.NOTHING:
                raise ConfigError(f"{target.name}: method {method.name} needs calibration "
                                  "statistics")
            weights = (method.reconstruct(job) if rebuilt is None or self.remote is None
                       else self.remote.result(rebuilt))
            zeros = kernels.count_zeros(weights)
        elif fixed_keep is not None:
            zeros = kernels.apply_mask(weights, fixed_keep)
        elif method.streams_scores and keep is None and not (calibrated and (
                self.update or self.refine)):
            zeros = prune_streamed(target, weights, plan.pattern, plan.prune_count(target.numel),
                                   lambda pieces: method.score_chunks(target, pieces,
                                                                      self.config.seed))
        else:
            new_keep = keep_mask(job, method)
            if calibrated and self.refine is not None:
                new_keep = self.refine.refine(job, new_keep)
            if calibrated and self.update is not None:
                weights = self.update.update(job, new_keep)
                zeros = kernels.count_zeros(weights)
            else:
                zeros = kernels.apply_mask(weights, new_keep)
        if grid is not None:  # rebuilt values onto the integer grid (kept ones stay as they are)
            weights = grid.round(weights)
            zeros = kernels.count_zeros(weights)
        error = None
        if original is not None and stats.hessian is not None:
            error = _relative_error(original, view.to_obs(weights), stats.hessian)
        del original
        meets = pattern_rule(plan.pattern).holds(target, weights, plan.pattern, zeros, planned)
        known_2_4 = meets and implies_2_4(plan.pattern) and target.reduction_length % 4 == 0
        report = target_report(target, weights, zeros, "dense", str(plan.pattern),
                               zeros_before, is_2_4=True if known_2_4 else None)
        report.requested_sparsity = plan.sparsity
        report.set_by = "masks" if fixed else plan.set_by
        report.meets_plan = bool(meets)
        if stats is not None or note:
            report.method = method.name
            report.reconstruction_error = error
            report.calibration_tokens = stats.tokens if stats is not None else 0
        if rebuilds and stats is not None and 0 < stats.tokens < target.reduction_length:
            self.underdetermined.append((target.name, stats.tokens, target.reduction_length))
        if note:
            report.note = note
        if plan.origin is PlanOrigin.OVERRIDE:  # an override may have chosen the method
            report.method = method.name
        if self.want_masks:
            self.masks_out.add_packed(target.name, np.packbits(weights.reshape(-1) != 0),
                                      target.shape)
        values = stored_values(target, weights, self.loaded.base_dir, grid)
        if self.pruned is not None and target.graph is self.loaded.proto.graph:
            self.pruned[target.tensor_name] = values
        stored = self.sink.put(target, values, plan, grid)
        if stored is not None:
            report.format, report.bytes, report.format_reason = (stored.format, stored.bytes,
                                                                 stored.reason)
        del weights, values  # before the next target is read: one target in memory at a time
        report.seconds = round(time.perf_counter() - started, 4)
        self.reports[target.name] = report
        log.info("%s %s: %d of %d zero (%s), error %s, %.2f s", method.name, target.name, zeros,
                 target.numel, plan.pattern, "-" if error is None else f"{error:.4g}",
                 time.perf_counter() - started)
        if self.progress:
            self.progress(target)


def gather_statistics(loaded: LoadedModel, config: PruneConfig,
                      cache: CalibrationCache) -> int:
    """Capture into `cache` the one-pass statistics that runs of `config` on `loaded` would
    gather (a search does it once for all its trials); how many layer inputs were captured.
    Nothing when the run calibrates sequentially (its statistics depend on what it prunes)."""
    from .calib import ActivationCapture, GraphIndex, target_view

    if config.overrides or config.permute_channels:  # per-target methods, moved channels
        return 0
    targets, _ = discover_targets(loaded.proto, selection_of(config))
    loop = _Loop(loaded, config, {}, Sink(loaded, config), {}, False, False, None, None, cache)
    methods = {t.name: loop.method(config.method) for t in targets}
    index = GraphIndex(loaded.proto)
    found = [target_view(t, index) for t in targets if loop.calibrates(methods[t.name])]
    views = [view for view in found if not isinstance(view, str)]
    # a target that cannot be calibrated is pruned before the capture: the run's
    # statistics are then not the dense model's, and it does not use the cache
    if not views or len(views) < len(found) or \
            loop.calibration_mode(views, methods) != "one-pass":
        return 0
    hessian = loop._gathers_hessians(views, methods, "one-pass")
    views = [view for view in views if cache.stats(view, hessian, config) is None]
    if not views:
        return 0
    capture = ActivationCapture(loaded, index, views, cache.feeds(config, loaded.proto),
                                sequential=False, hessian=hessian, weights={})
    for stage in capture.stages():
        for view in stage.views:
            cache.keep(view, capture.stats_of(view), config)
            capture.release(view)
    return len(views)


def keep_mask(job: Job, method: Method) -> np.ndarray:
    """Scores -> keep-mask by the plan's pattern, and-ed with any existing mask."""
    target, plan = job.target, job.plan
    scores = mask_scores(np.asarray(method.scores(job), dtype=np.float32), job.keep)
    if plan.pattern.is_nm:
        keep = nm_keep_mask(target, scores, plan.pattern)
    elif method.compare == "row":
        # rows of the calibration matrices where there are some, else of the stored matrix
        to_rows = job.view.to_obs if job.view is not None else target.to_matrix
        from_rows = job.view.from_obs if job.view is not None else target.from_matrix
        keep = from_rows(row_keep_mask(to_rows(scores), plan.sparsity, plan.count))
    else:
        keep = layer_keep_mask(scores, plan.prune_count(target.numel))
    if job.keep is not None:
        keep &= job.keep
    return keep


def _planned_count(target: WeightTarget, plan: TargetPlan, method: Method, view) -> int:
    """The fewest zeros the plan asks for (N:M is checked group by group instead)."""
    if method.compare == "row" and not plan.pattern.is_nm and plan.count is None:
        features = view.features if view is not None else target.reduction_length
        return target.numel // features * prune_count(features, plan.sparsity)
    return plan.prune_count(target.numel)


def _relative_error(original: np.ndarray, pruned: np.ndarray, hessians: np.ndarray) -> float:
    """‖ΔW Xᵀ‖² / ‖W Xᵀ‖² summed over the groups of the calibration matrices."""
    from .calib import relative_output_error

    lost = total = 0.0
    for group in range(original.shape[0]):
        part_lost, part_total = relative_output_error(original[group], pruned[group],
                                                      hessians[group])
        lost += part_lost
        total += part_total
    return lost / total if total > 0 else 0.0


def _checked_masks(masks: Mapping[str, np.ndarray], targets: list[WeightTarget]
                   ) -> dict[str, np.ndarray]:
    """Keep-masks by target name as boolean arrays of the stored shapes; exit-2 errors."""
    by_name = {t.name: t for t in targets}
    checked = {}
    for name, mask in masks.items():
        target = by_name.get(name)
        if target is None:
            raise ConfigError(f"mask for {name!r}: no such target in this model "
                              f"({len(targets)} targets; see `onnxprune inspect`)")
        mask = np.asarray(mask)
        if tuple(mask.shape) != tuple(target.shape):
            raise ConfigError(f"mask for {name!r} has shape {list(mask.shape)}, the target "
                              f"has {list(target.shape)}")
        checked[name] = np.ascontiguousarray(mask, dtype=bool)
    return checked


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
                      skipped.source, skipped.cause.value, skipped.summary)
