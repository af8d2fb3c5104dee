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
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .trials import SearchJob, Trial, TrialResult, forget, run_trial


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

    def close(self, cancel: bool = False) -> None:
        forget(self.job)


_WORKER_JOB: list[SearchJob] = []  # the job of the search a spawned worker serves


def _start_worker(job: SearchJob) -> None:
    # a worker's trials run one at a time: keep each to its share of the machine; the job
    # (with its calibration statistics) comes once per worker, not with every trial
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_JOB[:] = [job]


def _worker_trial(trial: Trial) -> TrialResult:
    return run_trial(_WORKER_JOB[0], trial)


class LocalProcesses(Runner):
    """`workers` spawned processes on this machine; one that dies (killed for memory, a
    crash in native code) fails its trial, and the pool is started again."""

    def __init__(self, job: SearchJob, workers: int):
        self.job = job
        self.workers = workers
        self._pool = self._start()
        self._trials: dict[futures.Future, Trial] = {}

    def _start(self) -> futures.ProcessPoolExecutor:
        return futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(self.job,))

    def submit(self, trial: Trial) -> futures.Future:
        try:
            future = self._pool.submit(_worker_trial, trial)
        except futures.process.BrokenProcessPool:
            self._pool = self._start()
            future = self._pool.submit(_worker_trial, trial)
        self._trials[future] = trial
        return future

    def wait(self, pending):
        done, _ = futures.wait(list(pending), return_when=futures.FIRST_COMPLETED)
        finished = []
        for future in done:
            trial = self._trials.pop(future)
            try:
                finished.append((future, future.result()))
            except futures.process.BrokenProcessPool as exc:
                finished.append((future, TrialResult(
                    trial.number, trial.candidate, trial.level, trial.sparsity,
                    dict(trial.settings), error=f"its worker process died ({exc})")))
        return finished

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)


class RayCluster(Runner):
    """Trials as Ray tasks, on a local Ray instance started here or at `address`."""

    def __init__(self, job: SearchJob, workers: int | None, address: str | None):
        from ..remote import connect_ray

        ray = connect_ray(address or "local", workers or default_workers())
        self.ray = ray
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self._files = ray.put(shipment(job.model, {"--data": job.data,
                                                   "--calib": job.base.calib}))
        self._job = ray.put(job)
        self._remote = ray.remote(num_cpus=1)(_ray_trial)

    def submit(self, trial: Trial):
        return self._remote.remote(self._job, self._files, trial)

    def wait(self, pending):
        from ..remote import ray_results

        done, _ = self.ray.wait(list(pending), num_returns=1)
        return [(ref, ray_results(self.ray, [ref])[0]) for ref in done]

    def close(self, cancel: bool = False) -> None:
        pass  # the Ray instance outlives the search (a cluster is the user's)


def shipment(model: str, files: dict[str, str | None]) -> dict[str, Any]:
    """The model, the external data files it names, and the single files given (by the
    option that names them), as bytes for Ray's object store: workers need no shared file
    system. A folder where one file is needed is a one-line `ConfigError`."""
    from ..io.wire import scan_file

    folder = Path(model).parent
    external = {location: (folder / location).read_bytes()
                for location in sorted(filter(None, scan_file(Path(model)).external_locations))
                if (folder / location).is_file()}
    given = {}
    for option, path in files.items():
        if path is None:
            continue
        if not Path(path).is_file():
            raise ConfigError(f"--ray-address ships {option} to the workers: give one .npz "
                              "file")
        given[option] = (Path(path).name, Path(path).read_bytes())
    return {"model": (Path(model).name, Path(model).read_bytes()), "external": external,
            "files": given}


def unpack(shipped: dict[str, Any], folder: Path) -> tuple[Path, dict[str, Path]]:
    """Write a `shipment` into `folder`: the model's path, and the given files' by option."""
    name, data = shipped["model"]
    model = folder / name
    model.write_bytes(data)
    for location, data_bytes in shipped["external"].items():
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
        (folder / location).write_bytes(data_bytes)
    paths = {}
    for option, (name, data) in shipped["files"].items():
        path = folder / "given" / option.lstrip("-") / name  # apart from the model's files
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths[option] = path
    return model, paths


_LOCAL_COPIES: dict[str, tuple[SearchJob, Path]] = {}


def _ray_trial(job: SearchJob, files: dict[str, Any], trial: Trial) -> TrialResult:
    """A trial on a Ray worker: the files written once per worker, then `run_trial`."""
    from dataclasses import replace

    found = _LOCAL_COPIES.get(job.key)
    if found is None:
        for key, (_, old) in list(_LOCAL_COPIES.items()):  # a worker serves one search
            shutil.rmtree(old, ignore_errors=True)
            del _LOCAL_COPIES[key]
        folder = Path(tempfile.mkdtemp(prefix="onnxprune-search-"))
        model, given = unpack(files, folder)
        workdir = folder / "trials"
        workdir.mkdir()
        data = given.get("--data")
        local = replace(job, model=str(model), data=str(data) if data else job.data,
                        workdir=str(workdir))
        calib = given.get("--calib")
        if calib is not None and job.base.calib is not None:
            cache = job.calibration.moved(job.base.calib, str(calib)) if job.calibration \
                else None
            local = replace(local, base=job.base.replace(calib=str(calib)), calibration=cache)
        _LOCAL_COPIES[job.key] = (local, folder)
    else:
        local = found[0]
    result = run_trial(local, trial)
    if result.path is not None:  # the model travels back: the search keeps the best
        path = Path(result.path)
        result.path = None
        result.model_bytes = path.read_bytes()
        data = path.with_name(path.name + ".data")
        if data.exists():
            result.data_bytes = data.read_bytes()
            data.unlink()
        path.unlink()
    return result


def make_runner(job: SearchJob, workers: int | None, ray_address: str | None) -> Runner:
    if ray_address is not None:
        return RayCluster(job, workers, None if ray_address == "local" else ray_address)
    count = workers or default_workers()
    return InProcess(job) if count == 1 else LocalProcesses(job, count)
