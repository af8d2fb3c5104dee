"""The one configuration object shared by the Python API and the CLI."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .registry import Registry

# methods, allocations and formats are registered parts: see registry.py
SCOPES = ("layer", "global")
CALIB_MODES = ("sequential", "one-pass")
# what `--structure` removes whole (structured.run maps each to the kinds of groups)
STRUCTURES = ("channels", "ffn", "heads")
DEFAULT_MIN_SIZE = 4096
DEFAULT_SPARSITY = 0.5
DEFAULT_ROUND_TO = 8  # kept channel counts: multiples of this (tools/bench_round_to.py)


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n == m == 0), or N kept of every M weights along the reduction axis."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        """The sparsity an N:M pattern implies (0 for unstructured, which has none of its own)."""
        return 1.0 - self.n / self.m if self.is_nm else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        if isinstance(text, Pattern):
            return text
        text = str(text).strip().lower()
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise ConfigError(f"pattern must be 'unstructured' or N:M such as 2:4, got {text!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(f"pattern {text}: need 0 < N < M (N kept of every M weights)")
        if m > 256:
            raise ConfigError(f"pattern {text}: M must be at most 256")
        return cls(n, m)


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides what `prune` does. Validated on construction."""

    sparsity: float | None = None  # None: 0.5, or what an N:M pattern implies
    pattern: Pattern = field(default_factory=Pattern)
    method: str = "magnitude"
    scope: str = "layer"  # "global" is short for allocation="global"
    format: str = "dense"
    allocation: str | None = None  # None: "global" with scope="global", else "uniform"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int = DEFAULT_MIN_SIZE
    seed: int = 0
    calib: str | None = None  # .npz or folder of .npz; None: synthetic inputs, with a warning
    calib_samples: int | None = None
    calib_mode: str | None = None  # None: the method's default (sparsegpt: sequential)
    # gather calibration statistics for every target, to report each one's reconstruction
    # error even where the method needs none (magnitude, random)
    measure_error: bool = False
    # shapes of synthetic calibration inputs (no `calib`): --dim NAME=V, --input-shapes
    synthetic_dims: dict | None = None
    synthetic_shapes: dict | None = None
    # registry.UPDATES name: reconstruct the kept weights after the mask (with --structure,
    # registry.STRUCTURED_UPDATES: refit the consumers after the channels are chosen)
    update: str = "none"
    refine: str = "none"  # registry.REFINES name: improve the mask before it is applied
    # N:M: permute input channels (and where they are made) so each group keeps more score
    permute_channels: bool = False
    min_target_sparsity: float | None = None  # non-uniform allocations stay within these
    max_target_sparsity: float | None = None
    # per-target overrides (recipe.Override, or dicts of match/sparsity/pattern/method/skip)
    overrides: tuple = ()
    # structured pruning: "none", or what is removed whole ("channels", "ffn", "heads",
    # comma-separated); kept channel counts are multiples of `round_to`
    structure: str = "none"
    round_to: int = DEFAULT_ROUND_TO
    # structured: kept counts chosen so that the predicted onnxruntime CPU latency is at
    # most this fraction of the dense model's (instead of --sparsity), from per-group
    # tables measured here (cached, or in `latency_table`), sessions with `latency_threads`
    # intra-op threads (None: onnxruntime's default)
    latency_budget: float | None = None
    latency_table: str | None = None
    latency_threads: int | None = None
    # correct the tables' prediction once by timing the model at the counts they chose
    latency_calibrate: bool = True
    # a quantized model's float original: quantized targets that are rebuilt (sparsegpt,
    # admm, --update) start from its float weights, matched to them by value
    float_reference: str | None = None
    # run each calibration stage's reconstructions as Ray tasks there ("local": a Ray
    # instance started here); how, not what: the output is the serial run's
    ray_address: str | None = None
    # structured: let groups run through a norm over their channels (not output-preserving)
    # / let a transformer's residual stream be a group
    allow_norm: bool = False
    allow_hidden: bool = False
    # the options parts declare (`parts.option`), by dest: {"ria_alpha": 0.7}; absent or
    # None: the part's default. Checked against every registered part's declarations.
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", Pattern.parse(self.pattern))
        object.__setattr__(self, "include", _as_tuple(self.include))
        object.__setattr__(self, "exclude", _as_tuple(self.exclude))
        if self.overrides:
            from .recipe import as_overrides

            object.__setattr__(self, "overrides", as_overrides(self.overrides))
        if self.sparsity is not None:
            try:
                sparsity = float(self.sparsity)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"sparsity must be a number, got {self.sparsity!r}") from exc
            if not 0.0 <= sparsity < 1.0:
                raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
            object.__setattr__(self, "sparsity", sparsity)
        from .registry import ALLOCATIONS, FORMATS, METHODS, REFINES, UPDATES

        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}; got {self.scope!r}")
        allocation = self.allocation
        if allocation is None:
            allocation = "global" if self.scope == "global" else "uniform"
            object.__setattr__(self, "allocation", allocation)
        elif self.scope == "global" and allocation != "global":
            raise ConfigError(f"--scope global contradicts --allocation {allocation}")
        if self.calib_samples is not None and int(self.calib_samples) < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib_mode is not None and self.calib_mode not in CALIB_MODES:
            raise ConfigError(f"calib mode must be one of {', '.join(CALIB_MODES)}; "
                              f"got {self.calib_mode!r}")
        if self.structure != "none":
            self._check_structured()
            object.__setattr__(self, "options", _checked_options(self.options))
            return
        if self.latency_budget is not None or self.latency_table is not None \
                or self.latency_threads is not None:
            raise ConfigError("--latency-budget, --latency-table and --latency-threads need "
                              "--structure")
        method = METHODS.get(self.method)
        ALLOCATIONS.get(allocation)
        FORMATS.get(self.format)
        for kind, name, registry in (("update", self.update, UPDATES),
                                     ("refine", self.refine, REFINES)):
            if name != "none":
                registry.get(name)  # an unknown name is a ConfigError listing the choices
                if method.reconstructs:
                    raise ConfigError(f"--{kind} {name} needs a scoring method; "
                                      f"{self.method} rebuilds the weights itself")
        if self.permute_channels and not self.pattern.is_nm and not any(
                _override_pattern(o) for o in self.overrides):
            raise ConfigError("--permute-channels needs an N:M --pattern (such as 2:4)")
        object.__setattr__(self, "options", _checked_options(self.options))
        if self.allocation == "global" and not method.streams_scores \
                and not self.pattern.is_nm:
            raise ConfigError(f"--scope global is not available with --method {self.method}")
        self._check_selection()

    def _check_selection(self) -> None:
        """--min-size and the --include/--exclude regular expressions."""
        if int(self.min_size) < 0:
            raise ConfigError(f"--min-size must be >= 0, got {self.min_size}")
        for regex in self.include + self.exclude:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ConfigError(f"bad regular expression {regex!r}: {exc}") from exc

    def _check_structured(self) -> None:
        """What --structure takes: a registered channel score and structured update, uniform,
        global or sensitivity allocation, no refinement or permutation yet. An N:M pattern,
        a storage format and per-target overrides are the second stage's, on the shrunk
        model (`stages.py`)."""
        from .registry import CHANNEL_SCORES, FORMATS, STRUCTURED_UPDATES

        structure_names(self.structure)
        CHANNEL_SCORES.get(self.method)
        FORMATS.get(self.format)
        if self.update != "none":
            STRUCTURED_UPDATES.get(self.update)
        if self.allocation not in ("uniform", "global", "sensitivity"):
            raise ConfigError(f"--allocation {self.allocation} is not available with "
                              "--structure; choose uniform, global or sensitivity")
        given = [option for option, used in (
            ("--refine", self.refine != "none"), ("--permute-channels", self.permute_channels),
            ("--measure-error", self.measure_error),
            ("--min-target-sparsity/--max-target-sparsity",
             self.min_target_sparsity is not None or self.max_target_sparsity is not None))
            if used]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --structure yet")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) \
                or self.round_to < 1:
            raise ConfigError(f"--round-to must be an integer >= 1, got {self.round_to!r}")
        self._check_latency()
        self._check_selection()

    def _check_latency(self) -> None:
        """--latency-budget R: 0 < R <= 1, the target instead of --sparsity (both given is
        a contradiction); --latency-table and --latency-threads only with it."""
        if self.latency_budget is None:
            if self.latency_table is not None or self.latency_threads is not None:
                raise ConfigError("--latency-table and --latency-threads need "
                                  "--latency-budget")
            return
        try:
            budget = float(self.latency_budget)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--latency-budget must be a number, got "
                              f"{self.latency_budget!r}") from exc
        if not 0.0 < budget <= 1.0:
            raise ConfigError(f"--latency-budget must be in (0, 1], got {self.latency_budget}")
        object.__setattr__(self, "latency_budget", budget)
        if self.sparsity is not None:
            raise ConfigError("--latency-budget replaces --sparsity as the target: give one "
                              "of them")
        if (self.options or {}).get("max_error") is not None:
            raise ConfigError("--max-error and --latency-budget are both targets: give one "
                              "of them")
        threads = self.latency_threads
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ConfigError(f"--latency-threads must be an integer >= 1, got {threads!r}")

    @property
    def allocation_name(self) -> str:
        """The allocation this run uses: `allocation` as construction settled it."""
        if self.allocation is None:  # __post_init__ replaces None with the scope's default
            raise ValueError("PruneConfig.allocation was not settled on construction")
        return self.allocation

    @property
    def target_sparsity(self) -> float:
        """The sparsity to reach: the N:M pattern's own, else the requested one (0.5 default).
        With --structure the requested one is the structured share, whatever the pattern
        of the second stage."""
        if self.pattern.is_nm and self.structure == "none":
            return self.pattern.sparsity
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    def describe(self) -> dict:
        """The settings as plain JSON values, for the report."""
        values = dataclasses.asdict(self)
        values["pattern"] = str(self.pattern)
        # under a latency budget the allocation, not a sparsity, sets the counts
        values["sparsity"] = self.target_sparsity if self.latency_budget is None else None
        values["include"], values["exclude"] = list(self.include), list(self.exclude)
        values["calib"] = None if self.calib is None else str(self.calib)
        if self.float_reference is not None:
            values["float_reference"] = str(self.float_reference)
        del values["options"]
        values.update(self.effective_options())
        return values

    def effective_options(self) -> dict[str, Any]:
        """The options of the parts this run uses, given or default, by dest."""
        from .registry import (
            ALLOCATIONS,
            CHANNEL_SCORES,
            FORMATS,
            METHODS,
            REFINES,
            STRUCTURED_UPDATES,
            UPDATES,
        )

        used: list[tuple[Registry[Any], str]]
        if self.structure != "none":  # structured runs take a channel score and an update
            used = [(CHANNEL_SCORES, self.method)]
            if self.allocation_name == "sensitivity":
                used.append((ALLOCATIONS, "sensitivity"))  # its curves and --max-error
            if self.update != "none":
                used.append((STRUCTURED_UPDATES, self.update))
            from .stages import has_second_stage, unstructured_method

            if has_second_stage(self):  # N:M and the format on the shrunk model
                used += [(METHODS, unstructured_method(self.method)[0]), (FORMATS, self.format),
                         *((METHODS, str(o.method)) for o in self.overrides if o.method)]
        else:
            used = [(METHODS, self.method), (ALLOCATIONS, self.allocation_name),
                    (FORMATS, self.format),
                    *((METHODS, str(o.method)) for o in self.overrides if o.method)]
            used += [(r, n) for r, n in ((UPDATES, self.update), (REFINES, self.refine))
                     if n != "none"]
        values: dict[str, Any] = {}
        for registry, name in used:
            for spec in registry.option_specs(name):
                given = self.options.get(spec.dest)
                values[spec.dest] = spec.default if given is None else given
        return values

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with `changes`: fields, or part options by dest (``ria_alpha=0.7``)."""
        fields, options = _split_settings(changes)
        if options:
            fields["options"] = {**self.options, **fields.get("options", {}), **options}
        return dataclasses.replace(self, **fields)

    @classmethod
    def from_settings(cls, **settings: Any) -> PruneConfig:
        """A config from fields and part options alike (``method="ria", ria_alpha=0.7``)."""
        fields, options = _split_settings(settings)
        if options:
            fields["options"] = {**fields.get("options", {}), **options}
        return cls(**fields)


def _split_settings(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PruneConfig fields, everything else: part options, checked later)."""
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    fields = {k: v for k, v in settings.items() if k in names}
    return fields, {k: v for k, v in settings.items() if k not in names}


def _checked_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part options with values of their declared types; a `ConfigError` for a name no
    registered part declares or a value out of its bounds."""
    if not options:
        return {}
    from .registry import all_option_specs

    specs = {spec.dest: spec for spec in all_option_specs()}
    checked = {}
    for dest, value in options.items():
        spec = specs.get(dest)
        if spec is None:
            raise ConfigError(f"unknown option {dest!r}; options of the registered parts: "
                              f"{', '.join(sorted(specs))}")
        checked[dest] = None if value is None else spec.check(value)
    return checked


def structure_names(text: str) -> tuple[str, ...]:
    """The structures `--structure` names (comma-separated); a ConfigError for others."""
    names = tuple(word.strip() for word in str(text).split(","))
    for name in names:
        if name not in STRUCTURES:
            raise ConfigError(f"--structure {text}: choose from {', '.join(STRUCTURES)} "
                              "(comma-separated to combine), or none")
    return names


def _as_tuple(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _override_pattern(override) -> bool:
    """Whether a per-target override (recipe.Override or its dict form) sets an N:M pattern."""
    text = override.get("pattern") if isinstance(override, dict) else getattr(
        override, "pattern", None)
    return text is not None and Pattern.parse(text).is_nm
