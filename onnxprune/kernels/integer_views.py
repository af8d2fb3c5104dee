"""Float weights seen as unsigned integers of the same width.

Zeroing and zero-testing through an integer view treats every float format alike
(bfloat16 included, which numba cannot do arithmetic on), never rounds, and keeps kept
weights bit-identical. In every supported format the sign is the top bit, so a value is
zero (+0.0 or -0.0) exactly when its other bits are all zero.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
SUPPORTED_WEIGHT_DTYPES = (
    np.dtype(np.float16),
    BFLOAT16,
    np.dtype(np.float32),
    np.dtype(np.float64),
)
_UNSIGNED_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def check_float_weights(weights: np.ndarray, name: str) -> None:
    """TypeError unless ``weights`` is a numpy array of a supported float dtype."""
    if not isinstance(weights, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(weights).__name__}")
    if weights.dtype not in SUPPORTED_WEIGHT_DTYPES:
        names = ", ".join(str(dtype) for dtype in SUPPORTED_WEIGHT_DTYPES)
        raise TypeError(f"{name} must have dtype {names}; got {weights.dtype}")


def unsigned_view(weights: np.ndarray) -> np.ndarray:
    """Flat unsigned-integer view of C-contiguous float weights (no copy)."""
    return weights.reshape(-1).view(_UNSIGNED_OF_SIZE[weights.dtype.itemsize])


def magnitude_bits_mask(unsigned_dtype: np.dtype) -> np.unsignedinteger:
    """All bits but the sign bit, typed like the view so kernels compare like with like."""
    unsigned = np.dtype(unsigned_dtype).type
    return unsigned(np.iinfo(unsigned).max >> 1)
