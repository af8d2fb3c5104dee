"""numba kernels for the hot paths: scores, threshold selection, masks, audits.

Only numpy, numba, ml_dtypes and the standard library are imported here, never onnx
or the rest of onnxprune (numba settings live in :mod:`.flags`).
Every public function validates its arguments (TypeError / ValueError for programmer
errors) and then runs a private, disk-cached ``@njit`` kernel. Scores are float32 and are
ordered by the sortable key of their bits (see :mod:`.keys`): NaN is the largest score,
-0.0 sorts below +0.0, and ties are broken by flat C-order index.
"""

from .bandwidth import read_bandwidth_probe
from .nm import nm_keep_mask, nm_violations
from .scores import magnitude_scores, random_scores
from .select import Threshold, count_below_equal, kth_smallest, kth_smallest_array
from .unstructured import apply_mask, count_zeros, unstructured_keep_mask

__all__ = [
    "Threshold",
    "apply_mask",
    "count_below_equal",
    "count_zeros",
    "kth_smallest",
    "kth_smallest_array",
    "magnitude_scores",
    "nm_keep_mask",
    "nm_violations",
    "random_scores",
    "read_bandwidth_probe",
    "unstructured_keep_mask",
]
