"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class OnnxPruneError(Exception):
    """A user error: bad arguments, an unreadable or invalid model, nothing to prune."""

    exit_code = 2


class ModelLoadError(OnnxPruneError):
    """The model file is missing, truncated, not ONNX, or its external data is missing."""


class ConfigError(OnnxPruneError):
    """An option or recipe value is out of range or inconsistent with another."""


class NothingToPruneError(OnnxPruneError):
    """Pruning was asked for, but no tensor qualified as a target."""


class OutputPathError(OnnxPruneError):
    """The output path cannot be written (same as the input, or an unwritable directory)."""


class CalibrationError(OnnxPruneError):
    """Calibration inputs are missing, or do not match the graph's inputs."""


class TimingError(OnnxPruneError):
    """onnxruntime cannot run the model (or a part of it) at the shapes it is timed at."""


class ValidationFailed(Exception):
    """The candidate model did not meet the requested tolerance (exit code 1, not a user error)."""

    exit_code = 1
