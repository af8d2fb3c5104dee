"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and reconstruct it from calibration data.

For one weight matrix W [rows, cols] (cols = input features) and H = XᵀX of its calibration
inputs, SparseGPT approximately solves min ‖W Xᵀ − Ŵ Xᵀ‖² over Ŵ with the required zeros by
walking the columns left to right: each pruned weight w is set to 0 and its error
w / U[j, j] is spread over the not yet visited columns of its row through row j of U, the
upper Cholesky factor of H⁻¹ (the Optimal Brain Surgeon update with the inverse Hessian
restricted to the remaining columns). Columns are swept in blocks: inside a block the
updates are applied column by column (numba), the effect on the columns after the block is
applied once per block as a matrix product (BLAS) — the "lazy batch" update.

Masks: unstructured — at the start of each block, the block's share of the budget goes to the
weights of smallest w² / U[j, j]²; the shares are cumulative roundings, so the matrix loses
exactly ``prune_count(rows * cols, sparsity)`` weights (an exact per-layer count, not per
row). N:M — when the sweep reaches a group of M columns, each row keeps the N weights of
largest w² / U[j, j]² among them (on the weights as updated so far).

Numerics: H is damped by λ = damp · mean(diag H); inputs that never fire (H_jj = 0) get
H_jj = 1 and their weights are zeroed first (they do nothing on this data), beyond the
budget, but only in a matrix that loses weights: at sparsity 0 (no pattern, no earlier
mask) the weights stay exactly as they are. The Cholesky
factorizations are float64; when H is not positive definite even after damping, λ grows
tenfold until it is. The sweep itself runs in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas, lapack

from ..kernels.blocks import numba_single_thread
from ..kernels.obs_sweep import obs_sweep_block
from ..parts import option
from ..patterns import prune_count
from .base import Job, Method, Needs

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMP = 0.01
MAX_DAMP_INCREASES = 10


def sparsegpt_prune(weights: np.ndarray, hessian: np.ndarray, *, sparsity: float = 0.5,
                    keep_n: int = 0, group_m: int = 0, block_size: int = DEFAULT_BLOCK_SIZE,
                    damp: float = DEFAULT_DAMP, already_counted: int = 0,
                    upper: np.ndarray | None = None, pruned: np.ndarray | None = None,
                    fixed: bool = False,
                    grid: tuple[np.ndarray, np.ndarray, int, int] | None = None) -> np.ndarray:
    """The pruned and updated weights (float32 [rows, cols], F-order, pruned positions 0).

    ``weights`` is [rows, cols] (any float dtype, not modified), ``hessian`` the [cols, cols]
    matrix XᵀX (any positive scale). Unstructured when ``group_m == 0`` (``sparsity`` of the
    weights pruned), else ``keep_n`` of every ``group_m`` consecutive columns kept.
    ``already_counted`` is how many weights of the same tensor came before this matrix (for
    a grouped Conv, one matrix per group), so that the roundings of the per-block budgets
    add up to an exact count over the whole tensor. ``upper`` may pass a float32
    ``inverse_cholesky_upper(hessian, damp, dead_inputs(hessian))`` computed before, for
    layers that share one input (q, k and v projections).

    ``pruned`` [rows, cols] marks weights an earlier step removed: they are pruned first and
    never kept (the budget may then be exceeded). With ``fixed`` it is the exact mask: those
    weights and no others are pruned, and only the reconstruction runs.

    ``grid`` = (scale, zero point, qmin, qmax) of a quantized weight, scale and zero point
    float32 [rows, cols]: kept weights are rounded onto it as the sweep reaches them, their
    rounding error spread over the later columns (joint sparsification and quantization).

    The work happens in Fortran order: a block of columns is contiguous, and so are the
    columns after it, which the lazy update rewrites in place with one GEMM.
    """
    weights = np.array(weights, dtype=np.float32, order="F", copy=True)
    rows, cols = weights.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {hessian.shape} does not match {cols} columns")
    if group_m:
        if not 0 < keep_n < group_m or cols % group_m:
            raise ValueError(f"pattern {keep_n}:{group_m} does not fit {cols} columns")
        block_size = group_m * max(1, math.ceil(block_size / group_m))
    if rows == 0 or cols == 0:
        return weights

    dead = dead_inputs(hessian)
    if _prunes_something(rows, cols, sparsity, group_m, already_counted, pruned, fixed):
        weights[:, dead] = 0.0  # not when nothing is to go: sparsity 0 leaves the matrix
    elif grid is None:
        return weights  # nothing pruned, nothing to round: the sweep would change nothing
    if upper is None:
        upper = inverse_cholesky_upper(hessian, damp, dead).astype(np.float32, order="F")

    with numba_single_thread():  # the sgemm updates have BLAS's threads
        _sweep_blocks(weights, upper, pruned, fixed, sparsity, keep_n, group_m, block_size,
                      already_counted, grid)
    return weights


def _prunes_something(rows: int, cols: int, sparsity: float, group_m: int,
                      already_counted: int, pruned: np.ndarray | None, fixed: bool) -> bool:
    """Whether `sparsegpt_prune` removes any weight of the matrix: an N:M pattern, weights
    an earlier step removed, or an unstructured budget of at least one weight."""
    if pruned is not None and pruned.any():
        return True
    if fixed:
        return False
    return bool(group_m) or (prune_count(already_counted + rows * cols, sparsity)
                             > prune_count(already_counted, sparsity))


def _sweep_blocks(weights, upper, pruned, fixed, sparsity, keep_n, group_m, block_size,
                  already_counted, grid=None):
    """The blocked OBS sweep of `sparsegpt_prune`, in place on `weights`."""
    rows, cols = weights.shape
    for start in range(0, cols, block_size):
        stop = min(cols, start + block_size)
        block = np.ascontiguousarray(weights[:, start:stop])
        hinv = np.ascontiguousarray(upper[start:stop, start:stop])
        prune = (np.zeros(block.shape, dtype=bool) if pruned is None
                 else np.ascontiguousarray(pruned[:, start:stop]))
        if fixed:
            pass  # the given mask is the mask
        elif not group_m:
            budget = (prune_count(already_counted + rows * stop, sparsity)
                      - prune_count(already_counted + rows * start, sparsity))
            if budget:
                saliency = block * block / (np.diagonal(hinv) ** 2)[np.newaxis, :]
                np.nan_to_num(saliency, copy=False, nan=-1.0)
                saliency[prune] = -np.inf  # pruned before: first to go
                flat = np.argpartition(saliency.ravel(), budget - 1)[:budget]
                prune.ravel()[flat] = True
        errors = np.empty_like(block)
        block_grid = None if grid is None else (
            np.ascontiguousarray(grid[0][:, start:stop]),
            np.ascontiguousarray(grid[1][:, start:stop]), grid[2], grid[3])
        obs_sweep_block(block, hinv, prune, errors, 0 if fixed else keep_n,
                        0 if fixed else group_m, block_grid)
        weights[:, start:stop] = block
        if stop < cols and errors.any():
            later = weights[:, stop:]  # F-contiguous view: sgemm updates it in place
            blas.sgemm(-1.0, errors, upper[start:stop, stop:], beta=1.0, c=later,
                       overwrite_c=True)


def dead_inputs(hessian: np.ndarray) -> np.ndarray:
    """Inputs that never fired on the calibration data (H_jj = 0, or not finite)."""
    diagonal = np.diagonal(hessian)
    return ~(diagonal > 0) | ~np.isfinite(diagonal)


def inverse_cholesky_upper(hessian: np.ndarray, damp: float = DEFAULT_DAMP,
                           dead: np.ndarray | None = None) -> np.ndarray:
    """U upper triangular with UᵀU = (H + λI)⁻¹, λ = damp · mean(diag H); float64, F-order.

    Inputs flagged in `dead` are cut off first (their row and column zeroed, H_jj = 1). The
    inverse is never formed: with J the order reversal, J H J = L Lᵀ gives H = V Vᵀ for the
    upper triangular V = J L J, so (H + λI)⁻¹ = Uᵀ U with U = V⁻¹. When the factorization
    fails (H not positive definite), λ is multiplied by ten and it is retried.
    """
    size = hessian.shape[0]
    dead_reversed = None if dead is None or not dead.any() else np.flatnonzero(dead[::-1])
    for attempt in range(MAX_DAMP_INCREASES + 1):
        # J H J of a symmetric H is its flat reversal: a streaming copy, not a strided one;
        # its transpose is the F-ordered matrix LAPACK wants (same values by symmetry)
        reversed_h = np.ascontiguousarray(hessian, dtype=np.float64).ravel()[::-1].reshape(
            size, size).copy()
        if dead_reversed is not None:
            reversed_h[dead_reversed, :] = 0.0
            reversed_h[:, dead_reversed] = 0.0
            reversed_h[dead_reversed, dead_reversed] = 1.0
        if attempt == 0:
            mean_diagonal = float(np.mean(np.diagonal(reversed_h))) if size else 0.0
            if not mean_diagonal > 0 or not math.isfinite(mean_diagonal):
                mean_diagonal = 1.0
            level = damp * mean_diagonal
        reversed_h.ravel()[::size + 1] += level
        lower, info = lapack.dpotrf(reversed_h.T, lower=1, clean=1, overwrite_a=1)
        del reversed_h
        if info == 0:
            upper_v = lower.ravel(order="F")[::-1].reshape(size, size, order="F").copy()
            del lower
            inverse, info = lapack.dtrtri(upper_v, lower=0, overwrite_c=1)
            if info == 0 and np.isfinite(inverse).all():
                if attempt:
                    log.warning("Hessian not positive definite: damping raised to %.3g x mean "
                                "diagonal", level / mean_diagonal)
                return inverse
        level = level * 10.0 if level > 0 else 1e-8 * mean_diagonal
    raise np.linalg.LinAlgError("Hessian stays singular after raising the damping "
                                f"{MAX_DAMP_INCREASES} times")


class SparseGPT(Method):
    name = "sparsegpt"
    description = "OBS pruning with weight reconstruction, layer by layer (calibrated)"
    needs = Needs.HESSIAN
    reconstructs = True
    default_calib_mode = "sequential"

    @dataclass(frozen=True)
    class Options:
        block_size: int = option(DEFAULT_BLOCK_SIZE, minimum=1, metavar="N",
                                 help="columns per lazily updated block")
        damp: float = option(DEFAULT_DAMP, minimum=0.0, exclusive_minimum=True,
                             metavar="L", help="damping of XᵀX, relative to its mean diagonal")

    def reconstruct(self, job: Job) -> np.ndarray:
        view, plan = job.calibration[0], job.plan
        obs = view.to_obs(job.weights)
        pruned = None if job.keep is None else ~view.to_obs(job.keep).astype(bool)
        updated = np.empty_like(obs)
        per_group = obs.shape[1] * obs.shape[2]
        grids: list | None = None
        if job.grid is not None:  # the grid in the matrices' layout, to round kept weights onto
            grid, shape = job.grid, job.weights.shape
            scales = view.to_obs(np.broadcast_to(grid.scale, shape))
            zeros = view.to_obs(np.broadcast_to(grid.zero_point, shape).astype(np.float32))
            grids = [(scales[g], zeros[g], grid.qmin, grid.qmax) for g in range(obs.shape[0])]
        factors = job.shared  # targets reading the same input share H⁻¹'s factor
        for group in range(obs.shape[0]):
            hessian = job.hessians[group]
            if group not in factors:
                factors[group] = inverse_cholesky_upper(
                    hessian, self.options.damp, dead_inputs(hessian)).astype(np.float32, order="F")
            updated[group] = sparsegpt_prune(
                obs[group], hessian, sparsity=plan.sparsity, keep_n=plan.pattern.n,
                group_m=plan.pattern.m, block_size=self.options.block_size,
                damp=self.options.damp,
                already_counted=group * per_group, upper=factors[group],
                pruned=None if pruned is None else pruned[group], fixed=job.fixed,
                grid=None if grids is None else grids[group])
        return np.ascontiguousarray(view.from_obs(updated).astype(job.weights.dtype))
