"""Calibration-aware pruning of a loaded model: wanda, obd and sparsegpt (magnitude too, for
comparison on the same footing).

`prune_with_calibration` captures each target's layer inputs through onnxruntime (see
`calib`), prunes the target with the chosen method and writes the new weights into the
model proto (`io.write_array`, original dtype) before the next stage is captured — in
sequential mode later targets therefore see the already pruned model. Targets whose inputs
cannot be captured (weights inside subgraphs, RNN / ConvTranspose consumers, MatMul weights
with batch dimensions) are pruned by magnitude instead, with a warning and a note.

Exactness of the patterns: N:M is exact for every method (at most N non-zeros per group of M
along the reduction axis, exactly M−N pruned positions). Unstructured: wanda prunes
``prune_count(inputs, sparsity)`` weights from every output row (per-row exact count); obd,
magnitude and sparsegpt prune ``prune_count(numel, sparsity)`` weights of the tensor
(per-layer exact count). Weights that were zero already may stay among the kept ones, so the
zero count can exceed the pruned count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import TensorProto

from .calib import (
    ActivationCapture,
    ActivationStats,
    GraphIndex,
    TargetView,
    relative_output_error,
    target_view,
)
from .config import Pattern
from .errors import ConfigError
from .importance import obd_scores, per_row_keep_mask, wanda_scores
from .inputs import Feed
from .io import LoadedModel, read_array, write_array
from .patterns import layer_keep_mask
from .scoring import score
from .sparsegpt import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMP,
    dead_inputs,
    inverse_cholesky_upper,
    sparsegpt_prune,
)
from .targets import WeightTarget

log = logging.getLogger(__name__)

CALIBRATED_METHODS = ("wanda", "obd", "sparsegpt")
METHODS = ("magnitude",) + CALIBRATED_METHODS
CALIB_MODES = ("sequential", "one-pass")

Progress = Callable[[WeightTarget], None]


@dataclass
class CalibResult:
    """What happened to one target. `weights` reads the new values back from the model."""

    name: str
    method: str  # the method applied: "magnitude" where calibration was impossible
    zeros: int
    zeros_before: int
    reconstruction_error: float | None  # ‖W Xᵀ − Ŵ Xᵀ‖² / ‖W Xᵀ‖² on the calibration inputs
    tokens: int  # calibration tokens (rows of X) seen by the layer
    seconds: float
    note: str = ""
    tensor: TensorProto | None = field(default=None, repr=False)
    base_dir: Path = field(default=Path("."), repr=False)

    @property
    def weights(self) -> np.ndarray:
        """The pruned weights in the stored layout and dtype (zeros in place)."""
        return read_array(self.tensor, self.base_dir)

    def to_dict(self) -> dict:
        return {"method": self.method, "reconstruction_error": self.reconstruction_error,
                "calibration_tokens": self.tokens, "seconds": round(self.seconds, 3),
                **({"note": self.note} if self.note else {})}


def default_calib_mode(method: str) -> str:
    """SparseGPT reconstructs layers in order on the pruned model; the scores need no order."""
    return "sequential" if method == "sparsegpt" else "one-pass"


def prune_with_calibration(loaded: LoadedModel, targets: Sequence[WeightTarget],
                           feeds: Sequence[Feed], *, method: str, pattern: Pattern | str,
                           sparsity: float = 0.5, calib_mode: str | None = None,
                           block_size: int = DEFAULT_BLOCK_SIZE, damp: float = DEFAULT_DAMP,
                           measure_error: bool = True, progress: Progress | None = None
                           ) -> dict[str, CalibResult]:
    """Prune `targets` of `loaded.proto` in place with a calibrated method; results by name.

    `feeds` are the calibration samples (`calib.load_calibration`). `sparsity` is ignored by
    N:M patterns. `calib_mode` is "sequential" or "one-pass" (default: `default_calib_mode`).
    With `measure_error` (or for sparsegpt, which needs it anyway) H = XᵀX is accumulated
    for every target and the relative reconstruction error is reported; without it wanda and
    obd keep only ‖X_j‖² per input and report None.
    """
    pattern = Pattern.parse(pattern)
    if method not in METHODS:
        raise ConfigError(f"calibrated pruning takes method {', '.join(METHODS)}; got {method!r}")
    mode = calib_mode or default_calib_mode(method)
    if mode not in CALIB_MODES:
        raise ConfigError(f"calib_mode must be one of {', '.join(CALIB_MODES)}; got {mode!r}")
    if not pattern.is_nm and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    sparsity = pattern.sparsity if pattern.is_nm else float(sparsity)
    for target in targets:
        if pattern.is_nm and target.reduction_length % pattern.m:
            raise ConfigError(f"{target.name}: reduction axis length {target.reduction_length} "
                              f"is not a multiple of {pattern.m} (pattern {pattern})")
    settings = _Settings(method, pattern, sparsity, block_size, damp, loaded.base_dir)

    index = GraphIndex(loaded.proto)
    results: dict[str, CalibResult] = {}
    views: list[TargetView] = []
    for target in targets:
        view = target_view(target, index)
        if method == "magnitude" and not measure_error:
            results[target.name] = _prune_target(target, None, None, settings)
            if progress:
                progress(target)
        elif isinstance(view, str):
            log.warning("%s: cannot calibrate (%s); pruned by magnitude", target.name, view)
            results[target.name] = _prune_target(target, None, None, settings, note=view)
            if progress:
                progress(target)
        else:
            views.append(view)
    if views:
        capture = ActivationCapture(loaded, index, views, feeds, sequential=mode == "sequential",
                                    hessian=method == "sparsegpt" or measure_error)
        log.info("%s: %d targets in %d calibration stage(s) over %d samples (%s)", method,
                 len(views), capture.levels, len(feeds), mode)
        done = len(results)
        for stage in capture.stages():
            factors: dict = {}  # targets reading the same input share H⁻¹'s factor
            for view in stage.views:
                stats = capture.stats_of(view)
                capture.release(view)
                result = _prune_target(view.target, view, stats, settings,
                                       factors=factors.setdefault(view.inputs, {}))
                del stats
                results[view.target.name] = result
                done += 1
                log.info("[%d/%d] %s %s: %d zeros, error %s, %d tokens, %.2f s", done,
                         len(targets), result.method, result.name, result.zeros,
                         "-" if result.reconstruction_error is None
                         else f"{result.reconstruction_error:.4g}", result.tokens,
                         result.seconds)
                if progress:
                    progress(view.target)
    return {target.name: results[target.name] for target in targets}


@dataclass(frozen=True)
class _Settings:
    method: str
    pattern: Pattern
    sparsity: float
    block_size: int
    damp: float
    base_dir: Path


def _prune_target(target: WeightTarget, view: TargetView | None, stats: ActivationStats | None,
                  settings: _Settings, note: str = "", factors: dict | None = None
                  ) -> CalibResult:
    """Prune one target, write it back, and measure the reconstruction error when H is known."""
    started = time.perf_counter()
    stored = read_array(target.tensor, settings.base_dir)
    zeros_before = int(np.count_nonzero(stored == 0))
    method = settings.method
    if view is not None and stats is not None and stats.tokens == 0:
        note = "no calibration tokens reached this layer"
        log.warning("%s: %s; pruned by magnitude", target.name, note)
        view = stats = None
    if stats is not None and stats.nonfinite:
        log.warning("%s: %d calibration tokens had NaN/Inf inputs and were left out",
                    target.name, stats.nonfinite)
    if view is None:
        method = "magnitude"
    pattern, sparsity = settings.pattern, settings.sparsity

    obs = view.to_obs(stored) if view is not None else None
    if method == "sparsegpt":
        updated = np.empty_like(obs)
        per_group = obs.shape[1] * obs.shape[2]
        factors = {} if factors is None else factors
        for group in range(obs.shape[0]):
            hessian = stats.hessian[group]
            if group not in factors:
                factors[group] = inverse_cholesky_upper(
                    hessian, settings.damp, dead_inputs(hessian)).astype(np.float32, order="F")
            updated[group] = sparsegpt_prune(
                obs[group], hessian, sparsity=sparsity, keep_n=pattern.n,
                group_m=pattern.m, block_size=settings.block_size, damp=settings.damp,
                already_counted=group * per_group, upper=factors[group])
        new = view.from_obs(updated)
        del updated
    else:
        if method == "magnitude":
            keep = layer_keep_mask(target, score("magnitude", target, stored), pattern,
                                   sparsity)
        else:
            sq_norms = stats.sq_norms[:, np.newaxis, :]
            if method == "wanda":
                obs_scores = wanda_scores(obs, sq_norms)
            else:
                obs_scores = obd_scores(obs, sq_norms)
            if method == "wanda" and not pattern.is_nm:
                keep = view.from_obs(per_row_keep_mask(obs_scores, sparsity))
            else:
                keep = layer_keep_mask(target, view.from_obs(obs_scores), pattern, sparsity)
        new = np.where(keep, stored.astype(np.float32), np.float32(0))
        del keep
    new = np.ascontiguousarray(new.astype(stored.dtype))

    error = None
    if stats is not None and stats.hessian is not None:
        pruned_obs = view.to_obs(new)
        lost = total = 0.0
        for group in range(obs.shape[0]):
            part_lost, part_total = relative_output_error(obs[group], pruned_obs[group],
                                                          stats.hessian[group])
            lost += part_lost
            total += part_total
        error = lost / total if total > 0 else 0.0
    write_array(target.tensor, new)
    zeros = int(np.count_nonzero(new == 0))
    return CalibResult(target.name, method, zeros, zeros_before, error,
                       stats.tokens if stats is not None else 0,
                       time.perf_counter() - started, note, target.tensor, settings.base_dir)
