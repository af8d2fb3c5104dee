"""Parts registered by name: methods, allocations, storage formats, weight updates, mask
refinements and patterns.

Each kind has one typed `Registry`, whose parts subclass the kind's base class (an ABC:
`methods.Method`, `allocation.Allocation`, `formats.kinds.StorageFormat`,
`methods.base.WeightUpdate`, `methods.base.MaskRefinement`, `patterns.PatternRule`).
Built-in parts are listed as ``"module:Class"`` strings and imported on first use. Outside
packages add parts through Python entry points, one group per kind:

- ``onnxprune.methods``, ``onnxprune.allocations``, ``onnxprune.formats``,
  ``onnxprune.updates``, ``onnxprune.refines``, ``onnxprune.channel_scores``: a part class
  (or an instance of one)

The entry point's name is the name users type (``--method NAME``). A part declares its
settings in an `Options` dataclass (`parts.option`); `Registry.build` makes the part with
the run's values of them, and the command line and recipes list them (`option_specs`).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .errors import ConfigError
from .parts import OptionSpec, Part, build_options, option_specs

if TYPE_CHECKING:  # the kinds' base classes, imported with their parts, on first use
    from .allocation import Allocation
    from .formats.kinds import StorageFormat
    from .methods.base import MaskRefinement, Method, WeightUpdate
    from .patterns import PatternRule
    from .structured.scores import ChannelScore
    from .structured.updates import StructuredUpdate

log = logging.getLogger(__name__)

P = TypeVar("P", bound=Part)


class Registry(Generic[P]):
    """Name -> part class for one kind of part; built-ins import lazily, plug-ins through
    entry points. A part that cannot be imported is named, with its import error, when it
    is asked for."""

    def __init__(self, kind: str, group: str | None, base: str,
                 builtins: dict[str, str]) -> None:
        self.kind = kind
        self.group = group  # entry-point group; None: built-ins only
        self._base = base  # "module:Class" of the kind's base class, checked on registration
        self._lazy = dict(builtins)  # name -> "module:Class", imported on first use
        self._parts: dict[str, type[P] | P] = {}
        self._broken: dict[str, str] = {}  # name -> why it cannot be loaded
        self._entries: dict[str, Any] = {}  # plug-in name -> its entry point, not yet loaded
        self._plugins_loaded = False

    # ------------------------------------------------------------------ registering
    def register(self, part: type[P] | P, name: str | None = None, *,
                 replace: bool = False) -> type[P] | P:
        """Add a part class (or an instance, used as it is) under its `name`."""
        name = name or getattr(part, "name", None)
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} needs a string `name`, got {name!r}")
        if not replace and (name in self._parts or name in self._lazy):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        base = self._base_class()
        cls = part if isinstance(part, type) else type(part)
        if not issubclass(cls, base):
            raise TypeError(f"{self.kind} {name!r}: {cls.__name__} must subclass "
                            f"{base.__module__}.{base.__qualname__}")
        option_specs(part, self.kind)  # a bad Options declaration fails here, not later
        self._lazy.pop(name, None)
        self._broken.pop(name, None)
        self._entries.pop(name, None)
        self._parts[name] = part
        return part

    def unregister(self, name: str) -> None:
        """Remove a part (tests register toy parts and take them away again)."""
        self._parts.pop(name, None)
        self._lazy.pop(name, None)
        self._broken.pop(name, None)
        self._entries.pop(name, None)

    # ------------------------------------------------------------------ looking up
    def names(self) -> list[str]:
        """Every registered name, built-ins first in their listed order, then plug-ins
        (those that cannot be loaded included: asking for one says why)."""
        self._load_plugins()
        return list(dict.fromkeys([*self._lazy, *self._parts, *self._entries, *self._broken]))

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> type[P] | P:
        """The part registered as `name` (its class, or the instance a plug-in gave); a
        `ConfigError` naming the choices, or why the part cannot be loaded."""
        if name in self._parts:
            return self._parts[name]
        if name in self._lazy:
            reference = self._lazy[name]
            try:
                module, attribute = reference.split(":")
                part = getattr(importlib.import_module(module, __package__), attribute)
            except Exception as exc:  # the built-in stays listed; say why it is unusable
                raise ConfigError(f"{self.kind} {name!r} cannot be loaded ({reference}): "
                                  f"{type(exc).__name__}: {exc}") from exc
            return self.register(part, name, replace=True)
        self._load_plugins()
        if name in self._entries:
            self._load_entry(name)
        if name in self._broken:
            raise ConfigError(self._broken[name])
        if name in self._parts or name in self._lazy:
            return self.get(name)
        raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")

    def part_class(self, name: str) -> type[P]:
        part = self.get(name)
        return part if isinstance(part, type) else type(part)

    def build(self, name: str, settings: Mapping[str, Any] | None = None) -> P:
        """The part `name` made with its options taken from `settings` (keys are option
        dests such as ``ria_alpha``; absent or None: the declared default)."""
        part = self.get(name)
        if not isinstance(part, type):
            return part  # a plug-in's ready-made instance
        options = build_options(part, option_specs(part, self.kind), settings or {})
        return part(options)

    def option_specs(self, name: str) -> list[OptionSpec]:
        return option_specs(self.get(name), self.kind)

    # ------------------------------------------------------------------ internals
    def _base_class(self) -> type:
        module, attribute = self._base.split(":")
        return getattr(importlib.import_module(module, __package__), attribute)

    def _load_plugins(self) -> None:
        """Note the plug-ins' entry points; each is imported when it is asked for, so that
        listing names (the command line's choices) imports no plug-in."""
        if self._plugins_loaded or self.group is None:
            return
        self._plugins_loaded = True
        for entry in entry_points(group=self.group):
            if entry.name in self._parts or entry.name in self._lazy:
                log.warning("%s plug-in %r (%s) ignored: the name is taken", self.kind,
                            entry.name, entry.value)
                continue
            self._entries[entry.name] = entry

    def _load_entry(self, name: str) -> None:
        entry = self._entries.pop(name)
        try:
            self.register(entry.load(), name)
        except Exception as exc:  # a broken plug-in must not break the other parts
            why = (f"{self.kind} plug-in {name!r} ({entry.value}) cannot be loaded: "
                   f"{type(exc).__name__}: {exc}")
            log.warning("%s", why)
            self._broken[name] = why


METHODS: Registry[Method] = Registry("method", "onnxprune.methods", ".methods.base:Method", {
    "magnitude": ".methods.magnitude:Magnitude",
    "random": ".methods.random:Random",
    "l1": ".methods.l1:L1",
    "wanda": ".methods.wanda:Wanda",
    "obd": ".methods.obd:OBD",
    "sparsegpt": ".methods.sparsegpt:SparseGPT",
    "ria": ".methods.ria:RIA",
    "admm": ".methods.admm:Admm",
})

ALLOCATIONS: Registry[Allocation] = Registry(
    "allocation", "onnxprune.allocations", ".allocation:Allocation", {
    "uniform": ".allocation.uniform:Uniform",
    "global": ".allocation.global_threshold:GlobalThreshold",
    "erk": ".allocation.erk:ERK",
    "owl": ".allocation.owl:OWL",
    "sensitivity": ".allocation.sensitivity:SensitivityAllocation",
})

FORMATS: Registry[StorageFormat] = Registry(
    "format", "onnxprune.formats", ".formats.kinds:StorageFormat", {
    "dense": ".formats.kinds:Dense",
    "sparse": ".formats.kinds:Sparse",
    "compact": ".formats.kinds:Compact",
})

# `--update NAME`: rebuild the kept weights after a scoring method chose the mask
UPDATES: Registry[WeightUpdate] = Registry(
    "update", "onnxprune.updates", ".methods.base:WeightUpdate", {
    "admm": ".methods.admm:Admm",
})

# `--refine NAME`: improve a mask before it is applied (the pattern must still hold)
REFINES: Registry[MaskRefinement] = Registry(
    "refine", "onnxprune.refines", ".methods.base:MaskRefinement", {
    "dsnot": ".methods.dsnot:DSnoT",
})

# the checks of `--pattern`: built in only (masks are chosen by the loop for these two)
PATTERNS: Registry[PatternRule] = Registry("pattern", None, ".patterns:PatternRule", {
    "unstructured": ".patterns:UnstructuredRule",
    "n:m": ".patterns:NMRule",
})

# `--method NAME` with `--structure`: one score per channel of a coupled group
CHANNEL_SCORES: Registry[ChannelScore] = Registry(
    "channel score", "onnxprune.channel_scores", ".structured.scores:ChannelScore", {
    "magnitude": ".structured.scores:GroupMagnitude",
    "random": ".structured.scores:RandomChannels",
    "wanda": ".structured.scores:StructuredWanda",
    "flap": ".structured.scores:Flap",
    "obs": ".structured.scores:StructuredObs",
})

# `--update NAME` with `--structure`: rebuild the consumers once the kept channels are chosen
STRUCTURED_UPDATES: Registry[StructuredUpdate] = Registry(
    "structured update", "onnxprune.structured_updates",
    ".structured.updates:StructuredUpdate", {
    "least-squares": ".structured.updates:LeastSquares",
})

# every kind whose parts may declare options, in the order --help lists them
OPTION_KINDS: tuple[Registry[Any], ...] = (METHODS, UPDATES, REFINES, ALLOCATIONS, FORMATS,
                                      PATTERNS, CHANNEL_SCORES, STRUCTURED_UPDATES)


def all_option_specs() -> list[OptionSpec]:
    """Every option of every registered part that can be loaded, one per dest (a part
    registered under two kinds, such as admm, declares its options once; parts may share a
    flag they declare alike, as flap and obs share --bias-compensation)."""
    seen: dict[str, OptionSpec] = {}
    for registry in OPTION_KINDS:
        for name in registry.names():
            try:
                specs = registry.option_specs(name)
            except ConfigError:
                continue  # named with its error when it is asked for
            for spec in specs:
                earlier = seen.get(spec.dest)
                if earlier is None:
                    seen[spec.dest] = spec
                elif (earlier.part, earlier.field) != (spec.part, spec.field) \
                        and not _same_option(earlier, spec):
                    log.warning("%s %r: option %s is also declared by %s %r; the first is used",
                                spec.kind, spec.part, spec.option_string, earlier.kind,
                                earlier.part)
    return list(seen.values())


def _same_option(first: OptionSpec, second: OptionSpec) -> bool:
    """Whether two parts declare one flag with the same type, default, bounds and choices
    (one option, read by both)."""
    return all(getattr(first, key) == getattr(second, key)
               for key in ("type", "default", "minimum", "maximum", "exclusive_minimum",
                           "choices"))
