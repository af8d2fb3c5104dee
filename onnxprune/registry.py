"""Parts registered by name: pruning methods, sparsity allocations and storage formats.

Each kind has one `Registry`. Built-in parts are listed as ``"module:attribute"`` strings
and imported on first use, so `onnxprune --help` lists every name without importing numba.
Outside packages add parts through Python entry points, one group per kind:

- ``onnxprune.methods``: a `methods.Method` instance (or a class to instantiate)
- ``onnxprune.allocations``: an `allocation.Allocation` instance (or class)
- ``onnxprune.formats``: a storage format (see `formats.kinds`)
- ``onnxprune.updates``: a weight update run after the mask is chosen (``--update``)
- ``onnxprune.refines``: a mask refinement run before it is applied (``--refine``)

The entry point's name is the name users type (``--method NAME``). A part can also be
registered from code with `METHODS.register(part)`, which is what the entry points call.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from importlib.metadata import entry_points

from .errors import ConfigError

log = logging.getLogger(__name__)


class Registry:
    """Name -> part for one kind of part; built-ins import lazily, plug-ins via entry points."""

    def __init__(self, kind: str, group: str, builtins: dict[str, str]):
        self.kind = kind
        self.group = group
        self._lazy = dict(builtins)  # name -> "module:attribute", imported on first use
        self._parts: dict[str, object] = {}
        self._plugins_loaded = False

    def register(self, part, name: str | None = None, *, replace: bool = False) -> object:
        """Add `part` (an instance, or a class made with no arguments) under its `name`."""
        if isinstance(part, type):
            part = part()
        name = name or getattr(part, "name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a string `name`, got {name!r}")
        if not replace and (name in self._parts or name in self._lazy):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy.pop(name, None)
        self._parts[name] = part
        return part

    def unregister(self, name: str) -> None:
        """Remove a part (tests register toy parts and take them away again)."""
        self._parts.pop(name, None)
        self._lazy.pop(name, None)

    def names(self) -> list[str]:
        """Every registered name, built-ins first in their listed order, then plug-ins."""
        self._load_plugins()
        return list(dict.fromkeys([*self._lazy, *self._parts]))

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str):
        """The part called `name`; a `ConfigError` naming the choices if there is none."""
        if name in self._parts:
            return self._parts[name]
        if name in self._lazy:
            module, attribute = self._lazy.pop(name).split(":")
            part = getattr(importlib.import_module(module, __package__), attribute)
            return self.register(part, name)
        self._load_plugins()
        if name in self._parts or name in self._lazy:
            return self.get(name)
        raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for entry in entry_points(group=self.group):
            if entry.name in self._parts or entry.name in self._lazy:
                log.warning("%s plug-in %r (%s) ignored: the name is taken", self.kind,
                            entry.name, entry.value)
                continue
            try:
                self.register(entry.load(), entry.name)
            except Exception as exc:  # a broken plug-in must not break the tool
                log.warning("%s plug-in %r (%s) cannot be loaded: %s", self.kind, entry.name,
                            entry.value, exc)


METHODS = Registry("method", "onnxprune.methods", {
    "magnitude": ".methods.magnitude:Magnitude",
    "random": ".methods.random:Random",
    "l1": ".methods.l1:L1",
    "wanda": ".methods.wanda:Wanda",
    "obd": ".methods.obd:OBD",
    "sparsegpt": ".methods.sparsegpt:SparseGPT",
    "ria": ".methods.ria:RIA",
    "admm": ".methods.admm:Admm",
})

ALLOCATIONS = Registry("allocation", "onnxprune.allocations", {
    "uniform": ".allocation.uniform:Uniform",
    "global": ".allocation.global_threshold:GlobalThreshold",
    "erk": ".allocation.erk:ERK",
    "owl": ".allocation.owl:OWL",
    "sensitivity": ".allocation.sensitivity:SensitivityAllocation",
})

FORMATS = Registry("format", "onnxprune.formats", {
    "dense": ".formats.kinds:Dense",
    "sparse": ".formats.kinds:Sparse",
    "compact": ".formats.kinds:Compact",
})

# `--update NAME`: ``update(job, keep) -> new weights`` (stored layout and dtype, zeros where
# `keep` is False) for a mask chosen by a scoring method; "none" is no update
UPDATES = Registry("update", "onnxprune.updates", {
    "admm": ".methods.admm:Admm",
})

# `--refine NAME`: ``refine(job, keep) -> keep`` improves a mask before it is applied (the
# pattern must still hold); "none" is no refinement
REFINES = Registry("refine", "onnxprune.refines", {
    "dsnot": ".methods.dsnot:DSnoT",
})
