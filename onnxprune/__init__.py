"""onnxprune: prune the weights of any ONNX model and prove it still works.

Names are imported on first use so that `onnxprune --help` stays fast (no onnx, no numba).
"""

from importlib import import_module

__all__ = ["prune", "inspect", "PruneConfig", "Pattern", "PrunePass", "PassResult",
           "Sequential", "MaskSet", "WeightTarget", "OnnxPruneError", "prune_gradual",
           "prune_iterative"]
__version__ = "0.1.0"

_HOMES = {
    "prune": "api", "inspect": "api", "PrunePass": "api", "PassResult": "api",
    "Sequential": "api", "MaskSet": "mask_files",
    "PruneConfig": "config", "Pattern": "config", "WeightTarget": "targets",
    "OnnxPruneError": "errors", "prune_gradual": "schedule", "prune_iterative": "schedule",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
