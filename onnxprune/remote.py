"""Reconstructions as Ray tasks: the targets of one calibration stage are independent, so
with `--ray-address` each target's rebuild (sparsegpt, admm, ...) runs as a task that
receives its weights and XᵀX, and a stage takes about as long as its slowest target.

A task gets a slim copy of the job (the target without its graph and stored tensor) and
returns the rebuilt weights; the pipeline writes them in target order, as the serial run
does. Ray workers run their task on one thread (`num_cpus=1`), like numba's kernels in the
sweep; the BLAS products of the lazy updates then run on one thread too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from .errors import ConfigError


class RemoteReconstruction:
    def __init__(self, address: str):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--ray-address needs Ray: pip install 'onnxprune[ray]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
            if address != "local":
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot reach the Ray cluster at {address}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        self._task = ray.remote(num_cpus=1)(_reconstruct)

    def submit(self, method, job) -> Any:
        target = replace(job.target, tensor=None, graph=None)
        view = replace(job.view, target=target) if job.view is not None else None
        return self._task.remote(method, replace(job, target=target, view=view, shared={}))

    def result(self, handle: Any) -> np.ndarray:
        return self.ray.get(handle)


def _reconstruct(method, job) -> np.ndarray:
    return method.reconstruct(job)
