"""Where trials run: in this process, in local worker processes, or on a Ray cluster.

Every runner takes trials with `submit` and hands back finished ones with `wait`, in the
order they finish; the search's answer does not depend on which runner or how many
workers (`bisection.py`). Local processes are spawned, not forked (onnxruntime and numba
threads do not survive a fork), and keep their state across trials (`trials.run_trial`).
With Ray, the model, the check's data and the calibration file go into Ray's object store
once and each worker writes them to its own temporary folder once, so a cluster needs no
shared file system (the one-pass statistics captured here travel with the job).
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .trials import SearchJob, Trial, TrialResult, run_trial


def default_workers() -> int:
    """What this machine has: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Runner:
    workers = 1

    def submit(self, trial: Trial) -> Any:
        raise NotImplementedError

    def wait(self, pending: Iterable[Any]) -> list[tuple[Any, TrialResult]]:
        """Some finished trials (at least one) among `pending`, with their handles."""
        raise NotImplementedError

    def close(self, cancel: bool = False) -> None:
        pass


class InProcess(Runner):
    """One worker: this process (no start-up cost; what `--workers 1` runs)."""

    def __init__(self, job: SearchJob):
        self.job = job
        self._done: dict[int, TrialResult] = {}

    def submit(self, trial: Trial) -> int:
        self._done[trial.number] = run_trial(self.job, trial)
        return trial.number

    def wait(self, pending):
        return [(handle, self._done.pop(handle)) for handle in list(pending)]


def _start_worker() -> None:
    # a worker's trials run one at a time: keep each to its share of the machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class LocalProcesses(Runner):
    """`workers` spawned processes on this machine."""

    def __init__(self, job: SearchJob, workers: int):
        self.job = job
        self.workers = workers
        self._pool = futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker)

    def submit(self, trial: Trial) -> futures.Future:
        return self._pool.submit(run_trial, self.job, trial)

    def wait(self, pending):
        done, _ = futures.wait(list(pending), return_when=futures.FIRST_COMPLETED)
        return [(future, future.result()) for future in done]

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


class RayCluster(Runner):
    """Trials as Ray tasks, on a local Ray instance started here or at `address`."""

    def __init__(self, job: SearchJob, workers: int | None, address: str | None):
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--ray-address needs Ray: pip install 'onnxprune[ray]'") from exc
        self.ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address, "log_to_driver": False,
                                      "include_dashboard": False}
            if address is None:
                kwargs["num_cpus"] = workers or default_workers()
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot reach the Ray cluster at {address}: "
                                  f"{str(exc).splitlines()[0]}") from exc
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        files = {"model": _read(job.model)}
        data_dir = Path(job.model).parent / (Path(job.model).name + ".data")
        if data_dir.exists():
            files["model.data"] = _read(str(data_dir))
        if job.data is not None and Path(job.data).is_file():
            files["data"] = _read(job.data)
        if job.base.calib is not None:
            if not Path(job.base.calib).is_file():
                raise ConfigError("--ray-address ships --calib to the workers: give one .npz "
                                  "file")
            files["calib"] = _read(job.base.calib)
        self._files = ray.put(files)
        self._job = ray.put(job)
        self._remote = ray.remote(num_cpus=1)(_ray_trial)

    def submit(self, trial: Trial):
        return self._remote.remote(self._job, self._files, trial)

    def wait(self, pending):
        done, _ = self.ray.wait(list(pending), num_returns=1)
        return [(ref, self.ray.get(ref)) for ref in done]

    def close(self, cancel: bool = False) -> None:
        pass  # the Ray instance outlives the search (a cluster is the user's)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


_LOCAL_COPIES: dict[str, SearchJob] = {}


def _ray_trial(job: SearchJob, files: dict[str, bytes], trial: Trial) -> TrialResult:
    """A trial on a Ray worker: the files written once per worker, then `run_trial`."""
    from dataclasses import replace

    local = _LOCAL_COPIES.get(job.key)
    if local is None:
        folder = Path(tempfile.mkdtemp(prefix="onnxprune-search-"))
        model = folder / Path(job.model).name
        model.write_bytes(files["model"])
        if "model.data" in files:
            (folder / (model.name + ".data")).write_bytes(files["model.data"])
        data = None
        if "data" in files:
            data = folder / Path(job.data or "data.npz").name
            data.write_bytes(files["data"])
        workdir = folder / "trials"
        workdir.mkdir()
        local = replace(job, model=str(model), data=str(data) if data else job.data,
                        workdir=str(workdir))
        if "calib" in files and job.base.calib is not None:
            calib = folder / "calib.npz"
            calib.write_bytes(files["calib"])
            cache = job.calibration.moved(job.base.calib, str(calib)) if job.calibration \
                else None
            local = replace(local, base=job.base.replace(calib=str(calib)), calibration=cache)
        _LOCAL_COPIES[job.key] = local
    result = run_trial(local, trial)
    if result.path is not None:  # the model travels back: the search keeps the best
        path = Path(result.path)
        result.path = None
        result.model_bytes = path.read_bytes()
        path.unlink()
    return result


def make_runner(job: SearchJob, workers: int | None, ray_address: str | None) -> Runner:
    if ray_address is not None:
        return RayCluster(job, workers, None if ray_address == "local" else ray_address)
    count = workers or default_workers()
    return InProcess(job) if count == 1 else LocalProcesses(job, count)
