"""Kernel of the ADMM weight update: the element-wise half of one iteration, fused.

One ADMM iteration (see `onnxprune.methods.admm`) is a GEMM and an element-wise step over
the [rows, cols] matrices; done with numpy the step would make several temporaries of the
weights' size, here it is one pass, on one thread: between two OpenBLAS GEMMs a parallel
kernel would compete with BLAS's threads (see `blocks.numba_single_thread`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .flags import NUMBA_CACHE, NUMBA_FASTMATH

__all__ = ["admm_split"]


def admm_split(sums: np.ndarray, keep: np.ndarray, target: np.ndarray, rho: float,
               rhs: np.ndarray) -> None:
    """Split V = W + U by the mask and form the next right-hand side, in place.

    ``sums`` holds V on entry and the new scaled dual U = V ⊙ (1 − M) on return; ``rhs``
    receives ``target + rho · (Z − U)`` with Z = V ⊙ M, which is ``target + rho · V`` where
    kept and ``target − rho · V`` where pruned. All float32 [rows, cols] C-contiguous,
    ``keep`` bool of the same shape.
    """
    for name, array in (("sums", sums), ("target", target), ("rhs", rhs)):
        if array.dtype != np.float32 or array.ndim != 2 or not array.flags.c_contiguous:
            raise TypeError(f"{name} must be a C-contiguous float32 matrix")
        if array.shape != sums.shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {sums.shape}")
    if keep.dtype != np.bool_ or keep.shape != sums.shape or not keep.flags.c_contiguous:
        raise TypeError("keep must be a C-contiguous bool matrix shaped like sums")
    _split_kernel(sums, keep, target, np.float32(rho), rhs)


@njit(cache=NUMBA_CACHE, fastmath=NUMBA_FASTMATH)
def _split_kernel(sums, keep, target, rho, rhs):
    rows, cols = sums.shape
    for r in range(rows):
        for c in range(cols):
            v = sums[r, c]
            if keep[r, c]:
                rhs[r, c] = target[r, c] + rho * v
                sums[r, c] = 0.0
            else:
                rhs[r, c] = target[r, c] - rho * v
