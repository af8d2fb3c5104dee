"""`OnnxPrune`: an Olive pass that prunes an ONNX model with `onnxprune.prune`.

Install with ``pip install 'onnxprune[olive]'`` (Olive 0.13, which brings torch; its CPU build
is enough). Olive finds passes through a package config, not entry points, and
``--package-config`` replaces Olive's own list of passes instead of adding to it. So the
package config is made from the installed Olive's list with `OnnxPrune` added
(`package_config()`), written once per Olive version into onnxprune's cache folder
(`package_config_path()`), whose path ``python -m onnxprune.integrations.olive`` prints::

    olive run --config workflow.json --package-config "$(python -m onnxprune.integrations.olive)"

In Python, ``olive.workflows.run(config, package_config=package_config_path())``.

The pass config takes the prune options under their Python names (the keywords of
`onnxprune.prune`: ``sparsity``, ``method``, ``pattern``, ``structure``, ``allocation``,
``format``, ``include``, ...; the options parts declare, such as ``ria_alpha``), a
``recipe`` (a TOML file, as ``--recipe``: what the pass config gives wins) and
``data_config``, the calibration data of calibrated methods: each batch of its dataloader is
one calibration sample. ``sparsity`` and ``method`` have search spaces. Options are checked
before the pass runs, and a bad one stops the workflow with onnxprune's message (Olive stops
on a ValueError, where it would only log other errors). The report (`Report.to_json`) lies
beside the output model as ``onnxprune_report.json``, and later passes carry it forward.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from olive.common.config_utils import ParamCategory, validate_config
from olive.data.config import DataConfig
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import PassConfigParam
from olive.search.search_parameter import Categorical
from pydantic import model_validator

import onnxprune
from onnxprune.io import write_file_atomically
from onnxprune.registry import all_option_specs

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

PASS_NAME = "OnnxPrune"
REPORT_NAME = "onnxprune_report.json"
# what a search tries when the workflow searches and the pass config leaves these out
SPARSITY_SEARCH = (0.3, 0.5, 0.7)
METHOD_SEARCH = ("magnitude", "wanda", "sparsegpt")

# The options of `onnxprune.prune` (PruneConfig fields) the pass takes: type, description.
# None (the default of every one) leaves the setting to the recipe, else to onnxprune.
PRUNE_OPTIONS: dict[str, tuple[Any, str]] = {
    "sparsity": (float, "fraction of weights set to zero, 0 <= F < 1 [0.5]; N:M patterns "
                        "set their own. With structure: the structured share"),
    "method": (str, "magnitude, random, l1, wanda, obd, sparsegpt, ria, admm or a plug-in; "
                    "with structure: magnitude, random, wanda, flap, obs [magnitude]"),
    "pattern": (str, "unstructured, or N:M such as 2:4 [unstructured]"),
    "structure": (str, "what is removed whole: channels, ffn, heads (comma-separated), or "
                       "none [none]"),
    "scope": (str, "layer, or global: short for allocation global [layer]"),
    "allocation": (str, "uniform, global, erk, owl, sensitivity or a plug-in [uniform]"),
    "format": (str, "storage: dense, sparse or compact [dense]"),
    "update": (str, "reconstruct the kept weights after the mask (admm) [none]"),
    "refine": (str, "improve the mask before it is applied (dsnot) [none]"),
    "permute_channels": (bool, "N:M: permute input channels where the graph allows it"),
    "min_target_sparsity": (float, "non-uniform allocations: no target below this"),
    "max_target_sparsity": (float, "non-uniform allocations: no target above this"),
    "include": (list[str], "regular expressions: prune only the tensors they find"),
    "exclude": (list[str], "regular expressions: never prune the tensors they find"),
    "min_size": (int, "skip tensors with fewer elements [4096]"),
    "seed": (int, "randomness (random method, synthetic inputs) [0]"),
    "overrides": (list[dict], "per-target settings: tables of match (a regular expression) "
                              "and sparsity, pattern, method or skip"),
    "calib_samples": (int, "calibrate on at most N samples (batches of data_config)"),
    "calib_mode": (str, "sequential (default of sparsegpt and admm) or one-pass"),
    "measure_error": (bool, "report every target's reconstruction error on the calibration "
                            "data, whatever the method"),
    "synthetic_dims": (dict[str, int], "without data_config: sizes of named dynamic "
                                       "dimensions of synthetic calibration inputs (--dim)"),
    "synthetic_shapes": (dict[str, list[int]], "without data_config: shapes of synthetic "
                                               "calibration inputs by name (--input-shapes)"),
    "round_to": (int, "structured: kept channel counts are multiples of this [8]"),
    "latency_budget": (float, "structured, instead of sparsity: predicted onnxruntime CPU "
                              "latency at most this fraction of the dense model's"),
    "latency_table": (str, "structured: read and write the latency tables in this JSON file"),
    "latency_threads": (int, "structured: intra-op threads of the timed sessions"),
    "latency_calibrate": (bool, "structured: time the model at the chosen counts and "
                                "allocate once more when it misses the budget [true]"),
    "allow_norm": (bool, "structured: let groups run through a norm over their channels"),
    "allow_hidden": (bool, "structured: let a transformer's residual stream be a group"),
    "ray_address": (str, "run each calibration stage's reconstructions as tasks on this Ray "
                         "cluster ('local': start one); the output is the serial run's"),
    "float_reference": (str, "for a quantized input model: the float model it was quantized "
                             "from; methods that rebuild weights start from its float "
                             "weights (joint sparsification and quantization)"),
}
SEARCHED = {"sparsity": SPARSITY_SEARCH, "method": METHOD_SEARCH}
PATH_OPTIONS = ("latency_table", "float_reference")
# recipe keys that are command-line options the pass has no use for (it writes the report
# itself, and takes calibration data from data_config), with what to give instead
COMMAND_LINE_ONLY = {
    **dict.fromkeys(("report", "save_masks", "apply_masks", "fsync", "schedule", "steps",
                     "rounds", "retrain_cmd", "rewind", "keep_last_good", "validate", "data",
                     "samples", "atol", "rtol", "min_cosine", "min_top1", "timing",
                     "timing_runs", "verbose", "quiet"), ""),
    "dim": " (give synthetic_dims in the pass config)",
    "input_shapes": " (give synthetic_shapes in the pass config)",
}


@functools.cache
def part_options() -> dict[str, Any]:
    """The options registered parts declare (``ria_alpha``, ...), by name: their specs."""
    return {spec.dest: spec for spec in all_option_specs() if spec.dest not in PRUNE_OPTIONS}


def option_names() -> list[str]:
    """Every prune option the pass config takes."""
    return [*PRUNE_OPTIONS, *part_options()]


class OnnxPrune(Pass):
    """Prune the weights of an ONNX model with onnxprune: unstructured, N:M or structured,
    calibrated on the batches of `data_config`."""

    @classmethod
    def _default_config(cls, accelerator_spec) -> dict[str, PassConfigParam]:
        config = {
            name: PassConfigParam(type_=kind, default_value=None, description=text,
                                  search_defaults=Categorical(list(SEARCHED[name]))
                                  if name in SEARCHED else None,
                                  category=ParamCategory.PATH if name in PATH_OPTIONS
                                  else ParamCategory.NONE)
            for name, (kind, text) in PRUNE_OPTIONS.items()}
        for name, spec in part_options().items():
            config[name] = PassConfigParam(type_=spec.type, default_value=None,
                                           description=spec.help_text())
        config["recipe"] = PassConfigParam(
            type_=str, default_value=None, category=ParamCategory.PATH,
            description="a TOML recipe of prune options and [[override]] tables (as "
                        "--recipe); options given in the pass config win")
        config["data_config"] = PassConfigParam(
            type_=DataConfig | dict, default_value=None,
            description="calibration data of calibrated methods (each batch is a sample); "
                        "without it they calibrate on synthetic inputs, with a warning")
        config.update(get_external_data_config())
        return config

    @classmethod
    def _validators(cls) -> dict[str, Any]:
        # Olive would only warn about a key its config class does not have and drop it: a
        # misspelt option must not prune with a default instead
        return {"refuse_unknown_options": model_validator(mode="before")(_refuse_unknown)}

    @classmethod
    def validate_config(cls, config, accelerator_spec) -> bool:
        """The whole set of options, as onnxprune checks them, before the pass runs."""
        if not super().validate_config(config, accelerator_spec):
            return False
        settings = prune_settings(config)
        try:
            onnxprune.PruneConfig.from_settings(**settings)
        except onnxprune.OnnxPruneError as exc:
            raise ValueError(f"{PASS_NAME}: {exc}") from exc
        return True

    def _run_for_config(self, model: ONNXModelHandler, config,
                        output_model_path: str) -> ONNXModelHandler:
        if model.external_initializers_file_name or model.constant_inputs_file_name:
            raise ValueError(f"{PASS_NAME}: models whose initializers or constant inputs are "
                             "kept in a separate file cannot be pruned")
        settings = prune_settings(config)
        output_path = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        with tempfile.TemporaryDirectory(prefix="onnxprune_") as scratch:
            if config.data_config is not None:
                settings["calib"] = write_calibration(
                    config.data_config, model, Path(scratch) / "calib",
                    settings.get("calib_samples"))
            # onnxprune writes atomically, with external data where the input had it; Olive
            # then saves the model as its passes do (external data as the config says)
            pruned = Path(scratch) / "pruned" / output_path.name
            pruned.parent.mkdir()
            try:
                _, report = onnxprune.prune(model.model_path, pruned, **settings)
            except onnxprune.OnnxPruneError as exc:
                raise ValueError(f"{PASS_NAME}: {exc}") from exc
            proto = onnx.load(str(pruned))
        output = model_proto_to_olive_model(proto, output_path, config, force_model_dir=True)
        report.output = str(output_path)
        report_path = output_path.parent / REPORT_NAME
        text = report.to_json() + "\n"
        write_file_atomically(report_path, lambda fh: fh.write(text), binary=False)
        attributes = dict(model.model_attributes or {})
        carried = set(attributes.get("additional_files") or [])
        attributes["additional_files"] = sorted(carried | {str(report_path)})
        output.model_attributes = attributes
        summary = report.summary
        log.info("%s: %d of %d weights zero (%.2f%%) in %d targets", PASS_NAME, summary.zeros,
                 summary.params, 100 * summary.sparsity, len(report.targets))
        return output


def _refuse_unknown(cls, data: Any) -> Any:
    if isinstance(data, dict):
        known = sorted(cls.model_fields)
        for key in sorted(set(data) - set(known)):
            close = difflib.get_close_matches(key, known, n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"the options are {', '.join(known)}")
            raise ValueError(f"{PASS_NAME}: unknown option {key!r} ({hint})")
    return data


def prune_settings(config) -> dict[str, Any]:
    """The keywords of `onnxprune.prune` the pass config (and its recipe) give."""
    settings = recipe_settings(Path(config.recipe)) if config.recipe else {}
    for name in option_names():
        value = getattr(config, name)
        if value is not None:  # what the pass config gives wins over the recipe
            settings[name] = value
    return settings


def recipe_settings(path: Path) -> dict[str, Any]:
    """A recipe's options and overrides as keywords of `onnxprune.prune` (recipe keys are
    the command line's option names with '_' for '-', as the pass config's are)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValueError(f"{PASS_NAME}: {path}: no such recipe file") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{PASS_NAME}: {path}: cannot read the recipe ({exc})") from exc
    settings: dict[str, Any] = {}
    names = set(option_names())
    for key, value in data.items():
        if key == "override":
            settings["overrides"] = value
        elif key == "calib" or key in names:
            settings[key] = value
        elif key in COMMAND_LINE_ONLY:
            raise ValueError(f"{PASS_NAME}: {path}: {key!r} is a command-line option the "
                             f"Olive pass does not take{COMMAND_LINE_ONLY[key]}")
        else:
            raise ValueError(f"{PASS_NAME}: {path}: unknown key {key!r} (keys are prune "
                             "options with '_' for '-', e.g. min_size)")
    return settings


def write_calibration(data_config: DataConfig | dict, model: ONNXModelHandler, folder: Path,
                      limit: int | None) -> Path:
    """The batches of the data config's calibration dataloader as `.npz` files in `folder`,
    keyed by graph input name (at most `limit` of them): the calibration folder of
    `onnxprune.prune`."""
    data = validate_config(data_config, DataConfig)
    reader = data.to_data_container().create_calibration_dataloader(model_path=model.model_path,
                                                     io_config=model.io_config)
    folder.mkdir()
    count = 0
    while limit is None or count < limit:
        batch = reader.get_next()
        if batch is None:
            break
        arrays: dict[str, Any] = {name: np.asarray(value) for name, value in batch.items()}
        np.savez(folder / f"batch_{count:06d}.npz", **arrays)
        count += 1
    if count == 0:
        raise ValueError(f"{PASS_NAME}: the calibration data config {data.name!r} gave no "
                         "batch")
    log.debug("%s: %d calibration batches written to %s", PASS_NAME, count, folder)
    return folder


def package_config() -> dict[str, Any]:
    """The installed Olive's package config with `OnnxPrune` added."""
    default = Path(OlivePackageConfig.get_default_config_path())
    config = json.loads(default.read_text(encoding="utf-8"))
    config["passes"][PASS_NAME] = {
        "module_path": f"{__name__}.{PASS_NAME}",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
        "supported_algorithms": [],
        "supported_quantization_encodings": [],
        "dataset": "dataset_optional",
    }
    return config


def package_config_path() -> Path:
    """`package_config()` as a file (written once per Olive version, atomically), for
    ``olive run --package-config``."""
    from importlib.metadata import version

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onnxprune"
    path = folder / f"olive-{version('olive-ai')}-package-config.json"
    text = json.dumps(package_config(), indent=2)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        folder.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, lambda fh: fh.write(text), binary=False)
    return path


if __name__ == "__main__":
    print(package_config_path())
