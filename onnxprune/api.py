"""The Python entry points: `prune(...)` and the `PrunePass` object for toolchains."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .config import PruneConfig
from .errors import NothingToPruneError
from .io import (
    LoadedModel,
    ModelWriter,
    check_output_path,
    load_model,
    model_file_bytes,
    model_from_proto,
    save_model,
)
from .mask_files import MaskSet
from .provenance import (
    provenance_entries,
    read_provenance,
    staged_provenance,
    stamp_provenance,
    structured_provenance,
)
from .report import Report, Summary, structured_report, summarize

log = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto


def prune(model: ModelLike, output: str | os.PathLike | None = None, *,
          config: PruneConfig | None = None, base_dir: str | os.PathLike | None = None,
          inplace: bool = False, progress=None, durable: bool = False,
          masks: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
          fixed_masks: bool = True, return_masks: bool = False,
          calibration=None, **options) -> tuple[onnx.ModelProto, Report]:
    """Prune a model given as a path or a ModelProto; optionally write it to `output`.

    Options are PruneConfig fields (sparsity, pattern, method, scope, allocation, format,
    include, exclude, min_size, seed, calib, ...); `config` may be given instead. A
    ModelProto argument is copied first unless `inplace=True`. `progress(target)` is called
    after each target. `output` is written atomically; `durable=True` also fsyncs it before
    the rename. A model path with an `output` is streamed from file to file, one target in
    memory at a time; the model returned then carries no tensor values: its large tensors
    reference their bytes in the written files.

    `masks`: keep-masks by target name (or a path saved by `MaskSet.save`); with
    `fixed_masks` (default) exactly those positions are pruned, otherwise they are an
    existing mask the new one never revives. `return_masks`: the report's `masks` holds the
    keep-masks of the result (a `MaskSet`, True = non-zero). `calibration`: a
    `calib.cache.CalibrationCache` that keeps the calibration samples and one-pass statistics
    for further runs on the same model (unstructured pruning).

    The pruned model's `metadata_props` record how it was made (`provenance.py`); the
    report's `provenance` holds the same entries.

    With `structure="channels"` (or "ffn", "heads"), whole channels are removed instead
    (`structured.run`): the returned model is a new, smaller one (the input is never
    changed) and `report.structured` says what was removed. An N:M `pattern`, a `format`
    other than dense or per-target `overrides` then apply to the shrunk model as a second
    stage (`stages.py`; `sparsity` is the structured share): `report.targets` and
    `report.summary` give its results, `report.structured["then"]` its settings.
    """
    config = (config.replace(**options) if config is not None
              else PruneConfig.from_settings(**options))
    if masks is not None and not isinstance(masks, Mapping):
        masks = MaskSet.load(masks)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if output is not None:
        output = check_output_path(output, input_path)
    if config.structure != "none":
        from .stages import has_second_stage

        if masks is not None:
            from .errors import ConfigError

            raise ConfigError("--apply-masks cannot be combined with --structure yet")
        if has_second_stage(config):
            return _prune_structured_then(model, output, config, base_dir, inplace, durable,
                                          return_masks, progress)
        return _prune_structured(model, output, config, base_dir, inplace, durable,
                                 return_masks)
    return _prune_unstructured(model, output, config, base_dir, inplace, durable, masks,
                               fixed_masks, return_masks, progress, calibration=calibration)


def _prune_unstructured(model: ModelLike, output: Path | None, config: PruneConfig,
                        base_dir, inplace: bool, durable: bool,
                        masks: Mapping[str, np.ndarray] | None, fixed_masks: bool,
                        return_masks: bool, progress, structured_entries: Mapping[str, str]
                        | None = None, calibration=None) -> tuple[onnx.ModelProto, Report]:
    """`prune` without `config.structure`: the pipeline's loop (`pipeline.run`).
    `structured_entries`: the provenance of a structured stage that made `model`, kept
    beside this run's (`provenance.staged_provenance`)."""
    from .pipeline import Sink, run

    def entries(result) -> dict[str, str]:
        own = provenance_entries(config, result.targets, result.permutations)
        return staged_provenance(structured_entries, own) if structured_entries else own

    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    loop = dict(masks=masks, fixed_masks=fixed_masks, want_masks=return_masks,
                progress=progress, calibration=calibration)
    if output is not None and input_path is not None:
        loaded = load_model(input_path, lazy=True)
        # measured before anything is written: a tensor the prune never reads can still be
        # refused here, and a refusal must leave no output behind
        file_bytes_before = model_file_bytes(input_path)
        with ModelWriter(loaded, output, None, durable) as writer:
            sink = Sink(loaded, config, writer.put, streaming=True)
            result = run(loaded, config, sink=sink, **loop)
            # commit serializes the metadata from the proto
            stamp_provenance(loaded.proto, entries(result))
            writer.commit()
        proto = load_model(Path(output), lazy=True).proto
        file_bytes = model_file_bytes(Path(output))
    else:
        # with an output file the proto need not hold the tensors: read them lazily
        loaded = _load(model, base_dir, inplace, lazy=output is not None)
        file_bytes_before = model_file_bytes(input_path) if input_path else loaded.proto.ByteSize()
        result = run(loaded, config, **loop)
        stamp_provenance(loaded.proto, entries(result))
        if output is not None:
            save_model(loaded, output, durable=durable)
            file_bytes = model_file_bytes(Path(output))
        else:
            file_bytes = loaded.proto.ByteSize()
        proto = loaded.proto
    report = Report(model=str(input_path) if input_path else "<ModelProto>",
                    targets=result.targets, skipped=result.skipped,
                    summary=summarize(result.targets, file_bytes, file_bytes_before),
                    output=str(output) if output is not None else None,
                    config=config.describe(), provenance=read_provenance(proto),
                    channel_permutations=result.permutations if config.permute_channels
                    else None)
    report.masks = result.masks if return_masks else None
    _warn_about_session_start(report)
    return proto, report


def _prune_structured(model: ModelLike, output: Path | None, config: PruneConfig,
                      base_dir, inplace: bool, durable: bool, return_masks: bool
                      ) -> tuple[onnx.ModelProto, Report]:
    """`prune` with `config.structure`: whole channels removed (`structured.run`)."""
    from .structured.run import prune_structured
    from .structured.shapes import macs_input_shapes
    from .structured.surgery import SurgeryError, check_shrunk, check_shrunk_file

    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    loaded = _load(model, base_dir, inplace, lazy=output is not None)
    file_bytes_before = model_file_bytes(input_path) if input_path else loaded.proto.ByteSize()
    try:
        # with an output file the cut tensors go from the input to the output one at a time
        result = prune_structured(loaded, config, stream=output is not None)
        stamp_provenance(result.model, structured_provenance(config, result))
        if result.shrinking is not None and output is not None:
            shrunk = LoadedModel(result.model, loaded.path, loaded.base_dir,
                                 loaded.uses_external_data, loaded.lazy)
            with ModelWriter(shrunk, output, durable=durable,
                             expect=result.shrinking.tensors) as writer:
                for stored, values in result.shrinking.values():
                    writer.put(stored.tensor, values)
                    del values  # one tensor in memory at a time
                writer.commit(verify=check_shrunk_file)  # checked before the rename
        else:
            check_shrunk(result.model)
    except SurgeryError as exc:
        _refuse_if_input_invalid(input_path, loaded, exc)
        raise
    if output is not None:
        proto = load_model(Path(output), lazy=True).proto
        file_bytes = model_file_bytes(Path(output))
    else:
        proto, file_bytes = result.model, result.model.ByteSize()
    if result.latency is not None:  # --latency-budget: the output timed against dense
        result.latency.update(_measured_latency(loaded, input_path, output, result.model,
                                                config))
    summary = Summary(params=result.params_before, zeros=0, sparsity=0.0,
                      file_bytes=file_bytes, dense_bytes=file_bytes,
                      file_bytes_before=file_bytes_before)
    report = Report(model=str(input_path) if input_path else "<ModelProto>", targets=[],
                    skipped=[], summary=summary,
                    output=str(output) if output is not None else None,
                    config=config.describe(), provenance=read_provenance(proto),
                    structured=structured_report(result) | {"macs_at": {
                        name: list(shape) for name, shape in
                        macs_input_shapes(loaded.proto, config.synthetic_dims,
                                          config.synthetic_shapes).items()}})
    if return_masks:
        report.masks = MaskSet.from_arrays(_group_masks(result))
    return proto, report


def _prune_structured_then(model: ModelLike, output: Path | None, config: PruneConfig,
                           base_dir, inplace: bool, durable: bool, return_masks: bool,
                           progress) -> tuple[onnx.ModelProto, Report]:
    """`prune` with `config.structure` and a second stage (`stages.py`): the shrunk model,
    then its N:M prune and storage format. With an output file the shrunk model is written
    to a temporary folder beside it (removed on every path) and the second stage streams
    from there to `output`, which appears only when both stages succeed; without one both
    stages run in memory."""
    import shutil
    import tempfile

    from .stages import second_stage, structured_stage

    then = second_stage(config)
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    stage_dir = None
    try:
        if output is None:
            shrunk, first = _prune_structured(model, None, structured_stage(config), base_dir,
                                              inplace, durable, return_masks)
            folder = input_path.parent if input_path is not None else (base_dir or ".")
            source: ModelLike = shrunk
        else:
            stage_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".shrunk",
                                              dir=output.parent if str(output.parent)
                                              else "."))
            source = stage_dir / output.name
            _, first = _prune_structured(model, source, structured_stage(config), base_dir,
                                         inplace, False, return_masks)
            folder = None
        try:
            proto, report = _prune_unstructured(source, output, then, folder, True, durable,
                                                None, False, return_masks, progress,
                                                first.provenance or {})
        except NothingToPruneError as exc:  # the shrink alone would have found targets
            raise NothingToPruneError(f"after --structure, {exc}") from exc
    finally:
        if stage_dir is not None:
            shutil.rmtree(stage_dir, ignore_errors=True)
    if not config.pattern.is_nm and report.summary.zeros == 0:
        log.warning("--format %s after --structure: the shrunk model has no zeros, so every "
                    "tensor stays dense (an N:M --pattern gives the format zeros to drop)",
                    config.format)
    report.model = first.model
    report.summary.file_bytes_before = first.summary.file_bytes_before  # the input's
    report.config = config.describe()
    # what ran on the shrunk model: `targets` and `summary` give its results
    report.structured = (first.structured or {}) | {"then": {
        "method": then.method, "pattern": str(then.pattern), "format": then.format,
        "sparsity": then.target_sparsity}}
    if isinstance(first.masks, MaskSet) and isinstance(report.masks, MaskSet):
        report.masks = first.masks.merged(report.masks)  # groups and targets: no name in both
    return proto, report


def _measured_latency(loaded: LoadedModel, input_path: Path | None, output: Path | None,
                      shrunk: onnx.ModelProto, config: PruneConfig) -> dict:
    """The pruned model's onnxruntime latency against the dense one's, measured in this
    process on the timing feed (interleaved rounds, medians), as report entries."""
    from .structured.latency import measure_ratio, timing_feeds

    feed = timing_feeds(loaded.proto, config.synthetic_dims, config.synthetic_shapes,
                        config.seed)
    dense = str(input_path) if input_path is not None else loaded.proto.SerializeToString()
    pruned = str(output) if output is not None else shrunk.SerializeToString()
    timed = measure_ratio(dense, pruned, feed, threads=config.latency_threads,
                          data_folder=loaded.base_dir)
    log.info("latency: %.2f ms -> %.2f ms (%.3f x dense)", timed["dense_ms"],
             timed["pruned_ms"], timed["ratio"])
    return {"measured_dense_ms": timed["dense_ms"], "measured_ms": timed["pruned_ms"],
            "measured_ratio": timed["ratio"], "measured_fastest_ratio": timed["fastest_ratio"],
            "measured_rounds": timed["rounds"]}


def _refuse_if_input_invalid(input_path: Path | None, loaded: LoadedModel,
                             error: Exception) -> None:
    """Say so when the model given already fails the ONNX checker (the rewrite needs one
    that passes it); otherwise the shrunk model's failure stands."""
    from .errors import ConfigError

    try:
        onnx.checker.check_model(str(input_path) if input_path else loaded.proto,
                                 full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()),
                     type(exc).__name__)
        name = input_path or "the model"
        raise ConfigError(f"{name} fails the ONNX checker ({first}); structured pruning "
                          "rewrites shapes and needs a model that passes it") from error


def _group_masks(result) -> dict[str, np.ndarray]:
    """A keep-mask per pruned group: True for every kept channel."""
    masks = {}
    for group in result.groups:
        mask = np.ones(group.channels, dtype=bool)
        if group.name in result.keep:
            mask[:] = False
            mask[result.keep[group.name]] = True
        masks[group.name] = mask
    return masks


# Compact forms whose rebuild writes several times the tensor at session start (measured by
# tools/bench_formats.py on a 50 M-parameter model: 2:4 ~3x, 50 % bitmask ~5.5x the dense
# session creation; the gap codes of sparser tensors stay under 2x).
_SLOW_TO_START = ("compact-bitmask", "compact-nm")
SLOW_START_PARAMS = 1 << 20  # below this the rebuild takes milliseconds: not worth a warning


def _warn_about_session_start(report: Report) -> None:
    slow = [t for t in report.targets if t.format in _SLOW_TO_START]
    params = sum(t.numel for t in slow)
    if params >= SLOW_START_PARAMS:
        log.warning("%d compact tensors (%s parameters, %s) are rebuilt by onnxruntime at "
                    "session start: session creation takes several times longer than for "
                    "the dense model (about 3x at 2:4, 5x at 50 %%, measured)", len(slow),
                    f"{params:,}", ", ".join(sorted({t.format for t in slow})))


def inspect(model: ModelLike, *, config: PruneConfig | None = None,
            base_dir: str | os.PathLike | None = None) -> Report:
    """Report the targets (with their current sparsity) and skipped tensors; changes nothing."""
    from . import formats, kernels
    from .io import read_array
    from .pipeline import selection_of, skip_report, target_report
    from .targets import discover_targets, read_weights

    config = config or PruneConfig()
    input_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    loaded = _load(model, base_dir, inplace=True)
    stored = formats.stored_formats(loaded.proto, loaded.base_dir)
    if stored:  # discover on a dense copy; the caller's model is never changed
        dense = onnx.ModelProto()
        dense.CopyFrom(loaded.proto)
        formats.densify_model(dense, loaded.base_dir)
        loaded = model_from_proto(dense, loaded.base_dir)
    targets, skipped = discover_targets(loaded.proto, selection_of(config))
    reports = []
    for target in targets:
        weights = read_weights(target, loaded.base_dir)
        info = stored.get(target.name) or stored.get(target.tensor_name)
        report = target_report(target, weights, kernels.count_zeros(weights),
                               info.format if info else "dense", str(config.pattern))
        if info:
            report.bytes = info.bytes
        # sizes of what is stored: a quantized weight's integers (int4/uint4 ones with
        # 4-bit values; MatMulNBits blocks stay dense)
        quant = target.quant
        stored_ints = quant is not None and not quant.bits
        ints = read_array(target.stored_tensor, loaded.base_dir) if stored_ints else weights
        value_bits = 0
        if quant is not None and quant.packed and not quant.bits:
            # ml_dtypes int4/uint4, one value per byte: as the int8/uint8 compact rebuilds
            ints = ints.astype(np.int8 if quant.stored_type == onnx.TensorProto.INT4 else
                               np.uint8)
            value_bits = 4
        sizes = formats.format_bytes_table(ints, pattern=config.pattern,
                                           reduction_axis=target.reduction_axis,
                                           value_bits=value_bits)
        if quant is not None and quant.bits:
            nnz = int(np.count_nonzero(weights))
            sizes.update(dense=target.nbytes, sparse=None, compact=None, compact_format=None,
                         entropy_bound=formats.entropy_bound_bytes(weights.size, nnz,
                                                                   quant.bits / 8))
        report.format_bytes = {key: sizes[key] for key in ("dense", "sparse", "compact",
                                                           "compact_format")}
        report.format_bytes["entropy_bound"] = round(sizes["entropy_bound"])
        reports.append(report)
    file_bytes = model_file_bytes(input_path) if input_path else loaded.proto.ByteSize()
    return Report(model=str(input_path) if input_path else "<ModelProto>", targets=reports,
                  skipped=[skip_report(s) for s in skipped],
                  summary=summarize(reports, file_bytes),
                  provenance=read_provenance(loaded.proto) or None)


@dataclass
class PassResult:
    """What a pass returns: the model (same kind as given), the report, whether it changed."""

    model: object
    report: Report | None
    modified: bool


class PassError(Exception):
    """A pass was called on a model it cannot take, or broke its own promise."""


class PrunePass:
    """Pruning as a toolchain pass, after the onnx_ir pass contract.

    Settings go in the constructor; `pass_(model)` runs `requires(model)`, then
    `call(model) -> PassResult(model, report, modified)`, then `ensures(result)`: every target
    meets its planned pattern (an exact count for unstructured plans, at most N of every M
    along the reduction axis for N:M). Accepts an `onnx.ModelProto` or an
    `onnx_graphsurgeon.Graph` and returns the same kind. The input is not mutated unless
    `inplace=True` (ModelProto only). Passes compose with `Sequential`.
    """

    def __init__(self, config: PruneConfig | None = None, *, inplace: bool = False,
                 base_dir: str | os.PathLike | None = None, masks=None,
                 **options):
        self.config = config.replace(**options) if config is not None else \
            PruneConfig.from_settings(**options)
        self.inplace = inplace
        self.base_dir = base_dir
        self.masks = masks

    def __call__(self, model) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result)
        return result

    def requires(self, model) -> None:
        """The model must be a ModelProto (or graphsurgeon Graph) with a main graph."""
        if isinstance(model, onnx.ModelProto):
            if not model.HasField("graph"):
                raise PassError("PrunePass needs a model with a graph")
            return
        if type(model).__name__ == "Graph" and type(model).__module__.startswith(
                "onnx_graphsurgeon"):
            return
        raise PassError(f"PrunePass takes an onnx.ModelProto or onnx_graphsurgeon.Graph, "
                        f"not {type(model).__name__}")

    def call(self, model) -> PassResult:
        options = dict(config=self.config, base_dir=self.base_dir, masks=self.masks,
                       fixed_masks=False)
        if isinstance(model, onnx.ModelProto):
            pruned, report = prune(model, inplace=self.inplace, **options)
            return PassResult(pruned, report, _modified(report))
        import onnx_graphsurgeon as gs

        pruned, report = prune(gs.export_onnx(model), inplace=True, **options)
        return PassResult(gs.import_onnx(pruned), report, _modified(report))

    def ensures(self, result: PassResult) -> None:
        """Every target meets its planned pattern (checked on the pruned weights)."""
        if result.report is None:  # call() always reports; None is only Sequential's, empty
            raise PassError("PrunePass returned no report to check")
        failed = [t.name for t in result.report.targets if t.meets_plan is False]
        if failed:
            raise PassError(f"{len(failed)} target(s) miss their planned pattern, e.g. "
                            f"{failed[0]}")


class Sequential:
    """Passes run one after the other; modified if any of them modified the model."""

    def __init__(self, *passes):
        self.passes = passes

    def __call__(self, model) -> PassResult:
        modified = False
        report = None
        for pass_ in self.passes:
            result = pass_(model)
            model, report = result.model, result.report
            modified = modified or result.modified
        return PassResult(model, report, modified)


def _modified(report: Report) -> bool:
    if report.structured is not None:  # channels removed: the model is smaller
        return report.structured["params_after"] < report.structured["params_before"]
    return any(t.zeros != t.zeros_before for t in report.targets)


def _load(model: ModelLike, base_dir, inplace: bool, lazy: bool = False) -> LoadedModel:
    if isinstance(model, onnx.ModelProto):
        if not inplace:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            model = copy
        return model_from_proto(model, base_dir or ".")
    return load_model(model, lazy=lazy)
