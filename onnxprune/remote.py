"""Reconstructions as Ray tasks: the targets of one calibration stage are independent, so
with `--ray-address` each target's rebuild (sparsegpt, admm, ...) runs as a task that
receives its weights and XᵀX, and a stage takes about as long as its slowest target.

A task gets a slim copy of the job (the target without its graph and stored tensor) and
returns the rebuilt weights; the pipeline writes them in target order, as the serial run
does. Each task's BLAS runs on as many threads as the caller's, so that every product is
summed in the same order: the output is bit-identical to the serial run on machines of the
same kind (a cluster of other CPUs may round differently).
"""

from __future__ import annotations

import os
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
        # the tasks' BLAS runs on as many threads as this process's: a product summed in
        # another order would round differently, and the output must be the serial run's
        threads = str(_blas_threads())
        self._task = ray.remote(num_cpus=1, runtime_env={"env_vars": {
            name: threads for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                       "MKL_NUM_THREADS")}})(_reconstruct)

    def submit(self, method, job) -> Any:
        target = replace(job.target, tensor=None, graph=None)
        view = replace(job.view, target=target) if job.view is not None else None
        return self._task.remote(method, replace(job, target=target, view=view, shared={}))

    def result(self, handle: Any) -> np.ndarray:
        return self.ray.get(handle)


def _blas_threads() -> int:
    """The threads numpy's and scipy's BLAS use here (their default: the CPUs)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.cpu_count() or 1
    counts = [pool["num_threads"] for pool in threadpool_info()
              if pool.get("user_api") == "blas"]
    return max(counts) if counts else os.cpu_count() or 1


def _reconstruct(method, job) -> np.ndarray:
    return method.reconstruct(job)
