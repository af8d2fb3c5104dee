"""The one ordering every kernel uses: a total order on float32 scores via their bits.

A float32 is mapped to a *signed sortable key* (an int32 value held in an int64):
non-negative floats keep their bits, negative floats get their 31 low bits flipped, and
every NaN becomes the largest key. Comparing keys as integers then orders
``-inf < ... < -0.0 < +0.0 < ... < +inf < NaN``, and "equal" means "same key", so
NaN == NaN and -0.0 != +0.0. The unsigned key of the spec (``bits ^ 0x80000000`` for a
clear sign bit, ``~bits`` otherwise, NaN -> 0xFFFFFFFF) is this key plus 2**31.

Numba caches a kernel by its own file only: after changing a helper here, delete the
``__pycache__`` folders of this package, or callers in other files keep stale machine code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Signed keys lie in (KEY_MIN, KEY_MAX]: KEY_MIN would be a NaN's key before NaNs are made
# equal, so no element has it; KEY_MAX is the key of every NaN.
KEY_MIN = -(2**31)
KEY_MAX = 2**31 - 1
NAN_KEY = KEY_MAX

_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000


@njit(inline="always")
def signed_key(bits):
    """Sortable key of float32 bits given as an int32 (branch-free, so loops vectorize)."""
    key = bits ^ ((bits >> 31) & _ABS_MASK)
    return NAN_KEY if (bits & _ABS_MASK) > _INF_BITS else key


@njit(inline="always")
def signed_key32(bits):
    """signed_key computed and returned as int32.

    numba widens int32 arithmetic to int64, which halves the vector width of a loop; the
    casts after every step let LLVM keep 8 keys per AVX2 register.
    """
    key = np.int32(bits ^ np.int32(np.int32(bits >> 31) & np.int32(_ABS_MASK)))
    is_nan = np.int32(bits & np.int32(_ABS_MASK)) > np.int32(_INF_BITS)
    return np.int32(NAN_KEY) if is_nan else key


def keys_of(scores: np.ndarray) -> np.ndarray:
    """Flat signed keys (int64) of a float32 array, in numpy; for small arrays only."""
    bits = (
        np.ascontiguousarray(scores, dtype=np.float32).reshape(-1).view(np.int32).astype(np.int64)
    )
    keys = bits ^ ((bits >> 31) & _ABS_MASK)
    keys[(bits & _ABS_MASK) > _INF_BITS] = NAN_KEY
    return keys


def key_of_value(value: float) -> int:
    """Signed key of ``value`` rounded to float32."""
    bits = int(np.array(value, dtype=np.float32).view(np.int32))
    if (bits & _ABS_MASK) > _INF_BITS:
        return NAN_KEY
    return bits ^ ((bits >> 31) & _ABS_MASK)


def value_of_key(key: int) -> float:
    """The float32 value (as a Python float, which holds it exactly) whose key is ``key``."""
    bits = key if key >= 0 else key ^ _ABS_MASK
    return float(np.array(bits, dtype=np.int32).view(np.float32))
