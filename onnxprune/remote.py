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

from .errors import ConfigError, OnnxPruneError


def connect_ray(address: str, cpus: int | None = None):
    """The `ray` module, connected: to the cluster at `address`, or ("local") to a Ray
    instance started here with `cpus` CPUs; an instance already running is used as it is.
    One-line `ConfigError`s when Ray is missing or the cluster cannot be reached."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray-address needs Ray: pip install 'onnxprune[ray]'") from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
        if address != "local":
            kwargs["address"] = address
        elif cpus is not None:
            kwargs["num_cpus"] = cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Ray cluster at {address}: "
                              f"{str(exc).splitlines()[0]}") from exc
    return ray


def ray_results(ray, refs: list) -> list:
    """`ray.get(refs)`, a task's own onnxprune error re-raised as itself (one line), any
    other failure of a task as a one-line RuntimeError."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OnnxPruneError):
            raise cause from None
        raise RuntimeError(f"a Ray task failed: {type(cause).__name__}: "
                           f"{str(cause).splitlines()[0] if cause else exc}") from None


class RemoteReconstruction:
    def __init__(self, address: str):
        self.ray = connect_ray(address)
        # the tasks' BLAS runs on as many threads as this process's: a product summed in
        # another order would round differently, and the output must be the serial run's
        threads = _blas_threads()
        self._task = self.ray.remote(num_cpus=threads, runtime_env={"env_vars": {
            name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                            "MKL_NUM_THREADS")}})(_reconstruct)

    def submit(self, method, job) -> Any:
        target = replace(job.target, tensor=None, graph=None)
        view = replace(job.view, target=target) if job.view is not None else None
        return self._task.remote(method, replace(job, target=target, view=view, shared={}))

    def result(self, handle: Any) -> np.ndarray:
        return ray_results(self.ray, [handle])[0]


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
