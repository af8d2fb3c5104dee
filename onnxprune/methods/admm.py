"""ADMM weight update (Boža, 2024): reconstruct a pruned layer by ADMM, optionally choosing
the mask gradually inside the iterations.

For one weight matrix W [rows, cols] (cols = input features) and H = XᵀX, the kept weights
Ŵ of a mask M should minimise ‖W Xᵀ − (M ⊙ Ŵ) Xᵀ‖², row by row a least-squares problem
with the constraint that pruned weights are 0. ADMM splits it into an unconstrained
weight W and a masked copy Z, and iterates (U the scaled dual, ρ the penalty)

    Z ← M ⊙ (W + U),   U ← U + W − Z,   W ← (W₀ H + ρ (Z − U)) (H + ρI)⁻¹,

so every iteration costs one GEMM with the inverse, factored once per layer (LAPACK
Cholesky, float32) and shared by the layers that read the same input; the element-wise
part is one numba pass. The result is Z after the last iteration.

As in the official code: the problem is first normalised by D = diag(√H_jj) (W·D and
D⁻¹HD⁻¹, so the ranking |W·D| is Wanda's score), H is damped by 0.1 · mean diag, and ρ is
relative to the mean of the (normalised) diagonal. With gradual selection the mask is
re-chosen from |W + U| in the first three quarters of the iterations while the sparsity
ramps up cubically to the target (per layer; the last ramp step prunes an exact count and
the earlier ones about their share, see MaskRule; for N:M the N largest of every
M are always kept and the others pruned smallest first, so the last ramp step is exactly
N:M). Otherwise the mask is fixed: Wanda's per-layer choice for `--method admm`, the given
mask for `--update admm`.

The returned weights are never worse on the calibration data than the plain masked ones:
if ADMM ends with a larger error ‖ΔW Xᵀ‖² than W ⊙ M (too few iterations for a badly
conditioned layer), W ⊙ M is returned.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from .. import kernels
from ..kernels.admm import admm_split
from ..kernels.blocks import numba_single_thread
from ..parts import option
from ..patterns import MASKED_SCORE, layer_keep_mask
from .base import Job, Method, Needs, WeightUpdate

log = logging.getLogger(__name__)

DEFAULT_ITERS = 20
DEFAULT_RHO = 1.0
DEFAULT_DAMP = 0.1  # the official code's damping for ADMM (SparseGPT uses 0.01)
RAMP_SHARE = 0.75  # the mask is re-chosen during the first 3/4 of the iterations (15 of 20)
SAMPLE_SIZE = 1 << 16  # magnitudes sampled for an intermediate ramp step's threshold


@dataclass
class AdmmFactor:
    """What ADMM needs of one group's H, computed once: D, D⁻¹HD⁻¹ and (D⁻¹HD⁻¹ + cI)⁻¹."""

    scale: np.ndarray  # D: √H_jj, 1 for inputs that never fired; float32 [cols]
    hessian: np.ndarray  # D⁻¹ H D⁻¹, float32 [cols, cols]
    inverse: np.ndarray  # (D⁻¹ H D⁻¹ + (damp + rho) I)⁻¹, float32 [cols, cols]
    damp: float  # absolute damping added to the normalised H
    rho: float  # absolute penalty


def admm_factor(hessian: np.ndarray, rho: float = DEFAULT_RHO,
                damp: float = DEFAULT_DAMP) -> AdmmFactor:
    """Normalise H and factor it once (float32 LAPACK Cholesky and inverse).

    float32 is enough: the normalised H has a unit diagonal and the shift adds damp + ρ
    times that, so XᵀX + ρI is well conditioned (condition number below size · 1/(damp+ρ)).
    """
    diagonal = np.diagonal(hessian).astype(np.float64)
    alive = np.isfinite(diagonal) & (diagonal > 0)
    scale = np.where(alive, np.sqrt(np.where(alive, diagonal, 1.0)), 1.0)
    normal = np.array(hessian, dtype=np.float64, order="C")  # float64 here, float32 below
    normal[~alive, :] = 0.0
    normal[:, ~alive] = 0.0
    normal /= scale[:, np.newaxis]
    normal /= scale[np.newaxis, :]
    size = normal.shape[0]
    mean_diagonal = float(np.mean(np.diagonal(normal))) if size else 0.0
    if not mean_diagonal > 0:
        mean_diagonal = 1.0
    damp_level, rho_level = damp * mean_diagonal, rho * mean_diagonal
    normal32 = normal.astype(np.float32)
    normal.ravel()[::size + 1] += damp_level + rho_level
    shifted = normal.astype(np.float32).T  # symmetric: the transpose is LAPACK's F order
    del normal
    lower, info = lapack.spotrf(shifted, lower=1, clean=0, overwrite_a=1)
    if info == 0:
        lower, info = lapack.spotri(lower, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"ADMM: cannot factor XᵀX + ρI (LAPACK info {info})")
    inverse = _symmetric_from_lower(lower)
    return AdmmFactor(scale.astype(np.float32), normal32, inverse, damp_level, rho_level)


def _symmetric_from_lower(lower: np.ndarray) -> np.ndarray:
    """float32 C-order symmetric matrix from LAPACK's lower triangle (F-order)."""
    # an F-ordered lower triangle read in C order is the upper triangle
    upper = lower.T
    size = upper.shape[0]
    full = np.empty((size, size), dtype=np.float32)
    step = 512
    for start in range(0, size, step):
        stop = min(size, start + step)
        band = upper[start:stop, start:].astype(np.float32)  # valid on and above the diagonal
        diagonal = np.triu(band[:, :stop - start])
        full[start:stop, start:stop] = diagonal + np.triu(diagonal, 1).T
        full[start:stop, stop:] = band[:, stop - start:]
        full[stop:, start:stop] = band[:, stop - start:].T
    return full


class MaskRule:
    """The mask ADMM uses at each iteration: fixed, or ramped up to the plan's pattern.

    `prior` marks weights that may be kept (an earlier step's mask; None: all). `count` is
    the number to prune from this matrix (unstructured); N:M uses keep_n of group_m.

    Only the last ramp step (and the final mask) prunes an exact count. The steps before it
    are intermediate, so a matrix larger than SAMPLE_SIZE takes its threshold from a fixed
    random sample of the magnitudes: one pass instead of an exact selection, which would
    cost more than the iteration's GEMM.
    """

    def __init__(self, *, fixed: np.ndarray | None = None, prior: np.ndarray | None = None,
                 count: int = 0, keep_n: int = 0, group_m: int = 0, ramp: int = 0):
        self.fixed = fixed
        self.prior = prior
        self.count = count
        self.keep_n = keep_n
        self.group_m = group_m
        self.ramp = ramp
        self._sample: np.ndarray | None = None

    def changes_at(self, iteration: int) -> bool:
        return self.fixed is None and iteration < self.ramp

    def select(self, magnitudes: np.ndarray, iteration: int) -> np.ndarray:
        """Keep mask for |W + U| (float32 [rows, cols]); iteration -1 = final."""
        if self.fixed is not None:
            return self.fixed
        share = 1.0 if iteration < 0 or iteration >= self.ramp else (
            1.0 - (1.0 - (iteration + 1) / self.ramp) ** 3)
        if self.prior is not None:
            magnitudes = np.where(self.prior, magnitudes, MASKED_SCORE)
        best = None
        count = self.count
        if self.group_m:  # the N best of every M always stay
            best = kernels.nm_keep_mask(magnitudes, self.keep_n, self.group_m)
            count = magnitudes.size * (self.group_m - self.keep_n) // self.group_m
        count = int(round(count * share))
        if share < 1.0 and magnitudes.size > SAMPLE_SIZE:
            keep = self._approximate(magnitudes, count, best)
        else:
            if best is not None:
                magnitudes = np.where(best, np.float32(np.inf), magnitudes)
            keep = layer_keep_mask(magnitudes, count)
        if self.prior is not None:
            keep &= self.prior
        return keep

    def _approximate(self, magnitudes: np.ndarray, count: int,
                     best: np.ndarray | None) -> np.ndarray:
        """Keep `best` and those above the sample's quantile of `count` (about `count`
        pruned). Only the sample sees `best` as +inf: a full pass would cost more."""
        flat = magnitudes.reshape(-1)
        if self._sample is None or self._sample[-1] >= flat.size:
            self._sample = _sample_positions(flat.size)
        if count <= 0:
            return np.ones(magnitudes.shape, dtype=bool)
        sample = flat[self._sample]
        if best is not None:
            sample[best.reshape(-1)[self._sample]] = np.inf
        rank = min(SAMPLE_SIZE - 1, count * SAMPLE_SIZE // flat.size)
        threshold = np.partition(sample, rank)[rank]
        keep = magnitudes > threshold
        if best is not None:
            keep |= best
        return keep


@functools.lru_cache(maxsize=16)
def _sample_positions(size: int) -> np.ndarray:
    """SAMPLE_SIZE sorted positions out of `size`, fixed per size (the same run, the same
    masks), shared by the matrices of one shape."""
    positions = np.random.default_rng(size).choice(size, SAMPLE_SIZE, replace=False)
    positions.sort()
    positions.flags.writeable = False
    return positions


def admm_prune(weights: np.ndarray, factor: AdmmFactor, rule: MaskRule,
               iters: int = DEFAULT_ITERS) -> np.ndarray:
    """Pruned and reconstructed weights (float32 [rows, cols], pruned positions 0)."""
    scale = factor.scale
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    start = weights * scale  # W₀·D
    if iters <= 0 or start.size == 0:
        return np.where(rule.select(np.abs(start), -1), weights, np.float32(0.0))
    target = start @ factor.hessian  # W₀ (H + damp·I), normalised
    target += np.float32(factor.damp) * start
    current = start.copy()
    dual = np.zeros_like(start)
    rhs = np.empty_like(start)
    keep: np.ndarray | None = None
    with numba_single_thread():  # the GEMMs have BLAS's threads
        for iteration in range(iters):
            dual += current  # V = W + U
            if keep is None or rule.changes_at(iteration):
                keep = np.ascontiguousarray(rule.select(
                    np.abs(dual), iteration if rule.changes_at(iteration) else -1), dtype=bool)
            admm_split(dual, keep, target, factor.rho, rhs)  # dual: U; rhs: W₀H + ρ(Z − U)
            np.matmul(rhs, factor.inverse, out=current)
    if keep is None:  # iters > 0: the first iteration chose it
        raise RuntimeError("ADMM ran no iteration")
    dual += current
    result = np.where(keep, dual, np.float32(0.0))
    del dual, rhs, current
    if _normal_error(result, start, factor) > _normal_error(
            np.where(keep, start, np.float32(0.0)), start, factor):
        log.debug("ADMM did not beat the masked weights; kept them")
        return np.where(keep, weights, np.float32(0.0))
    return result / scale


def _normal_error(pruned: np.ndarray, start: np.ndarray, factor: AdmmFactor) -> float:
    """‖ΔW Xᵀ‖² (in the normalised problem, same value) of a candidate."""
    delta = pruned - start
    return float(np.einsum("ij,ij->", delta @ factor.hessian, delta, dtype=np.float64))


class Admm(Method, WeightUpdate):
    """`--method admm`: Wanda's ranking, then ADMM reconstruction with a gradual mask;
    `--update admm`: ADMM reconstruction for the mask a scoring method chose."""

    name = "admm"
    description = "ADMM reconstruction with a gradually chosen mask, layer by layer (calibrated)"
    needs = Needs.HESSIAN
    reconstructs = True
    default_calib_mode = "sequential"

    @dataclass(frozen=True)
    class Options:
        iters: int = option(DEFAULT_ITERS, minimum=0, metavar="N", help="iterations")
        rho: float = option(DEFAULT_RHO, minimum=0.0, exclusive_minimum=True, metavar="RHO",
                            help="penalty relative to mean diag(X^T X)")
        fixed_mask: bool = option(False, help="keep the first mask instead of choosing it "
                                              "gradually")

    def reconstruct(self, job: Job) -> np.ndarray:
        return _reconstruct(job, job.keep if job.fixed else None, self.options,
                            gradual=not self.options.fixed_mask)

    def update(self, job: Job, keep: np.ndarray) -> np.ndarray:
        """`--update admm`: reconstruct the weights for the mask `keep` (kept as it is)."""
        return _reconstruct(job, keep, self.options, gradual=False)


def _reconstruct(job: Job, fixed: np.ndarray | None, options: Admm.Options,
                 gradual: bool) -> np.ndarray:
    view, plan = job.calibration[0], job.plan
    iters, rho = options.iters, options.rho
    obs = view.to_obs(job.weights)
    groups, rows, cols = obs.shape
    fixed_obs = None if fixed is None else view.to_obs(fixed).astype(bool)
    prior_obs = None if job.keep is None else view.to_obs(job.keep).astype(bool)
    pattern = plan.pattern
    total = plan.prune_count(job.target.numel)
    ramp = max(1, round(RAMP_SHARE * iters)) if gradual else 0
    updated = np.empty_like(obs)
    for group in range(groups):
        key = ("admm", group, rho)  # targets reading the same input share the factor
        if key not in job.shared:
            job.shared[key] = admm_factor(job.hessians[group], rho)
        # the tensor's exact count split over the groups by cumulative rounding
        count = total * (group + 1) // groups - total * group // groups
        rule = MaskRule(fixed=None if fixed_obs is None else fixed_obs[group],
                        prior=None if prior_obs is None else prior_obs[group],
                        count=count, keep_n=pattern.n, group_m=pattern.m, ramp=ramp)
        updated[group] = admm_prune(obs[group], job.shared[key], rule, iters)
    return np.ascontiguousarray(view.from_obs(updated).astype(job.weights.dtype))

