"""The information-theoretic floor that the stored sizes are compared with.

A tensor with `nnz` non-zero values among `numel` positions needs at least
``bits(values) * nnz + numel * H(nnz / numel)`` bits when the values are incompressible
and the positions are a uniformly random subset: H is the binary entropy. No position
code can beat the second term on average; the formats aim to come close to it.
"""

from __future__ import annotations

import math


def binary_entropy(p: float) -> float:
    """H(p) in bits; 0 at p = 0 and p = 1."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


def entropy_bound_bytes(numel: int, nnz: int, itemsize: float) -> float:
    """bits(values) * nnz + numel * H(nnz / numel), in bytes (`itemsize` 0.5: 4-bit values)."""
    if numel == 0:
        return 0.0
    bits = 8 * itemsize * nnz + numel * binary_entropy(nnz / numel)
    return bits / 8.0
