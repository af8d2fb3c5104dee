"""numba settings of every kernel, in one leaf module (imports nothing of onnxprune)."""

NUMBA_CACHE = True  # kernels are cached on disk, so a second run compiles nothing
NUMBA_FASTMATH = False  # fastmath would reorder NaN comparisons, which the kernels rely on
