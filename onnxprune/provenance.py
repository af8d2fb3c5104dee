"""Provenance of a pruned model, kept in its `metadata_props` (shown by Netron, readable by
`onnx.load(...).metadata_props` anywhere): which onnxprune, method, pattern and allocation
made it, and a digest of what every target ended up with (next to `onnxprune:storage`,
which the compact format writes for its own use).

The digest is the sha256 of the sorted lines `name:zeros/numel`, one per target. Anyone can
recompute it from the weights, so it tells whether the pruned weights were changed since
(by a later tool, or by retraining without masks). Pruning an already pruned model replaces
these keys, never adds a second set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import onnx

PREFIX = "onnxprune:"
# every key a run may write: a key of an earlier run that this run does not write (an
# --update it did not use) must not survive to contradict the new ones
KEYS = tuple(PREFIX + key for key in (
    "version", "method", "pattern", "allocation", "sparsity", "achieved_sparsity", "format",
    "targets", "sparsity_digest", "update", "refine", "permute_channels", "structure",
    "round_to", "groups", "params", "structure_method", "structure_allocation",
    "structure_sparsity", "structure_achieved_sparsity"))
# the keys a structured run and an unstructured one both write: in a model made by both
# stages (`stages.py`) the structured stage's carry a `structure_` prefix, and the plain
# keys describe the zeros the weights hold now (what the digest checks)
SHARED_KEYS = ("method", "allocation", "sparsity", "achieved_sparsity")


def sparsity_digest(counts: Iterable[tuple[str, int, int]]) -> str:
    """`sha256:<hex>` of the sorted `name:zeros/numel` lines of (name, zeros, numel)."""
    lines = sorted(f"{name}:{zeros}/{numel}" for name, zeros, numel in counts)
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def provenance_entries(config, targets, permutations=()) -> dict[str, str]:
    """Our metadata for a prune run: `config` a PruneConfig, `targets` its TargetReports,
    `permutations` the report entries of the targets whose channels were permuted."""
    from . import __version__

    params = sum(t.numel for t in targets)
    zeros = sum(t.zeros for t in targets)
    entries = {
        "version": __version__,
        "method": config.method,
        "pattern": str(config.pattern),
        "allocation": config.allocation,
        "sparsity": f"{config.target_sparsity:.6g}",  # what was asked
        "achieved_sparsity": f"{zeros / params if params else 0.0:.6f}",
        "format": config.format,
        "targets": str(len(targets)),
        "sparsity_digest": sparsity_digest((t.name, t.zeros, t.numel) for t in targets),
    }
    for part in ("update", "refine"):  # only when used: most runs have neither
        if getattr(config, part) != "none":
            entries[part] = getattr(config, part)
    if permutations:  # how many targets had their input channels permuted
        entries["permute_channels"] = str(len(permutations))
    return {PREFIX + key: value for key, value in entries.items()}


def structured_provenance(config, result) -> dict[str, str]:
    """Our metadata for a structured run: `result` a `structured.run.StructuredResult`.
    `achieved_sparsity` is the share of the selected groups' member tensors' parameters
    removed; `groups`
    the channels each pruned group kept, `name:before->after` separated by spaces; `params`
    the model's float parameters before -> after."""
    from . import __version__

    pruned = [g for g in result.groups if g.kept < g.channels]
    selected = result.selected_params
    removed = result.params_before - result.params_after
    entries = {
        "version": __version__,
        "method": config.method,
        "structure": config.structure,
        "allocation": config.allocation,
        "sparsity": f"{config.target_sparsity:.6g}",
        "achieved_sparsity": f"{removed / selected if selected else 0.0:.6f}",
        "round_to": str(config.round_to),
        "groups": " ".join(f"{g.name}:{g.channels}->{g.kept}" for g in pruned),
        "params": f"{result.params_before}->{result.params_after}",
    }
    return {PREFIX + key: value for key, value in entries.items()}


def staged_provenance(structured: Mapping[str, str], unstructured: Mapping[str, str]
                      ) -> dict[str, str]:
    """The metadata of a structured stage followed by an N:M / format stage: both sets of
    entries, the structured stage's `SHARED_KEYS` renamed `structure_<key>`."""
    renamed = {PREFIX + "structure_" + key[len(PREFIX):]
               if key[len(PREFIX):] in SHARED_KEYS else key: value
               for key, value in structured.items() if key != PREFIX + "version"}
    return {**unstructured, **renamed}


def stamp_provenance(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Put `entries` in the model's metadata_props, replacing those of an earlier run (all
    of `KEYS`); other keys, `onnxprune:storage` among them, are kept."""
    ours = set(KEYS) | set(entries)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in ours]
    del model.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        model.metadata_props.add(key=key, value=value)


def read_provenance(model: onnx.ModelProto) -> dict[str, str]:
    """Our metadata in a model, `onnxprune:storage` included (empty when onnxprune did not
    write any)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


def describe_provenance(entries: Mapping[str, str], targets) -> str | None:
    """How a model was pruned, and whether `targets` (TargetReports of the model
    as it is now) still have the sparsities the digest recorded; None without our keys."""
    if PREFIX + "method" not in entries:
        return None
    get = entries.get
    staged = PREFIX + "structure_method" in entries  # structured, then N:M / format
    shrink = "structure_" if staged else ""
    structured = (f"--structure {get(PREFIX + 'structure')}, "
                  f"{get(PREFIX + shrink + 'method')}, "
                  f"{get(PREFIX + shrink + 'allocation', '?')} allocation, "
                  f"{get(PREFIX + shrink + 'achieved_sparsity', '?')} of the groups' "
                  f"parameters removed (parameters {get(PREFIX + 'params', '?')})")
    if PREFIX + "structure" in entries and not staged:
        return f"pruned by onnxprune {get(PREFIX + 'version', '?')}: {structured}"
    line = (f"pruned by onnxprune {get(PREFIX + 'version', '?')}: "
            + (f"{structured}, then " if staged else "")
            + f"{get(PREFIX + 'method')}, "
            f"{get(PREFIX + 'pattern', '?')}, {get(PREFIX + 'allocation', '?')} allocation, "
            f"sparsity {get(PREFIX + 'achieved_sparsity', '?')}")
    recorded = get(PREFIX + "sparsity_digest")
    if recorded is None:
        return line
    now = sparsity_digest((t.name, t.zeros, t.numel) for t in targets)
    if now == recorded:
        return line + "\n  sparsity digest: the targets still have these sparsities"
    return line + ("\n  sparsity digest: does NOT match the targets now (weights changed "
                   "since, or another target selection)")
