"""Work spread over workers beside the search's trials: `onnxprune sensitivity --workers`
sweeps each worker's share of the targets and the curves are put back in target order.

Each target's curve depends only on the dense model, the samples and that target, so the
result is the serial one whatever the number of workers. With Ray, the model and the
calibration file travel through the object store (no shared file system needed).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import PruneConfig
from .runners import default_workers, shipment, unpack


def sweep_in_workers(model: str, config: PruneConfig, levels: Sequence[float],
                     workers: int | None, ray_address: str | None):
    """The `sensitivity_sweep.analyze` result of the whole model, its targets swept by
    `workers` local processes or on Ray."""
    from ..formats import densify_model
    from ..io import load_model
    from ..pipeline import selection_of
    from ..targets import discover_targets

    loaded = load_model(Path(model))
    densify_model(loaded.proto, loaded.base_dir)  # as each worker does: compact targets too
    names = [t.name for t in discover_targets(loaded.proto, selection_of(config))[0]]
    del loaded
    count = max(1, min(len(names), workers or default_workers()))
    shares = [names[i::count] for i in range(count)]
    if ray_address is not None:
        parts = _on_ray(model, config, levels, shares, ray_address, workers)
    else:
        import concurrent.futures as futures
        import multiprocessing

        with futures.ProcessPoolExecutor(count, mp_context=multiprocessing.get_context(
                "spawn")) as pool:
            parts = list(pool.map(_sweep_share, [model] * count, [config] * count,
                                  [list(levels)] * count, shares))
    curves = {curve.name: curve for part in parts for curve in part.targets}
    merged = parts[0]
    merged.targets = [curves[name] for name in names if name in curves]
    return merged


def _sweep_share(model: str, config: PruneConfig, levels: list[float],
                 names: list[str]):
    from ..formats import densify_model
    from ..io import load_model
    from ..sensitivity_sweep import analyze

    loaded = load_model(Path(model))
    densify_model(loaded.proto, loaded.base_dir)
    return analyze(loaded, config, levels=levels, only=set(names))


def _on_ray(model: str, config: PruneConfig, levels: Sequence[float],
            shares: list[list[str]], address: str, workers: int | None) -> list[Any]:
    from ..remote import connect_ray, ray_results

    ray = connect_ray(address, workers or default_workers())
    files = ray.put(shipment(model, {"--calib": config.calib}))
    remote = ray.remote(num_cpus=1)(_ray_share)
    refs = [remote.remote(files, config, list(levels), share) for share in shares]
    return ray_results(ray, refs)


def _ray_share(files: dict, config: PruneConfig, levels: list[float], names: list[str]):
    folder = Path(tempfile.mkdtemp(prefix="onnxprune-sweep-"))
    try:
        model, given = unpack(files, folder)
        if "--calib" in given:
            config = config.replace(calib=str(given["--calib"]))
        return _sweep_share(str(model), config, levels, names)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
