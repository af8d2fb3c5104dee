"""What a search may vary: categorical choices (method, pattern, allocation, structure,
format, recipe files, part options) and the sparsity level, on a grid.

From the command line, each of `--method`, `--pattern`, `--allocation` takes a
comma-separated list; a TOML search file may give any prune option as a list:

    [space]
    method = ["wanda", "sparsegpt"]
    pattern = ["unstructured", "2:4"]
    sparsity = [0.3, 0.95]      # the range searched (a bisection)
    resolution = 0.01           # grid step of the sparsity levels

    [base]                      # prune options every trial uses (as in a recipe)
    min_size = 1024

A candidate is one combination of the choices; the sparsity is searched for each (an N:M
pattern without --structure fixes it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Pattern
from ..errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEFAULT_RANGE = (0.05, 0.95)
DEFAULT_RESOLUTION = 0.01
SPACE_KEYS = ("sparsity", "resolution")  # [space] keys that are not prune options


@dataclass(frozen=True)
class Candidate:
    """One combination of the categorical choices: prune settings (PruneConfig fields and
    part options), and the sparsity levels searched for it."""

    number: int
    settings: Mapping[str, Any]
    levels: tuple[float, ...]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.settings.items()) or "default"


@dataclass
class SearchSpace:
    choices: dict[str, list[Any]] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    sparsity_range: tuple[float, float] = DEFAULT_RANGE
    resolution: float = DEFAULT_RESOLUTION

    def __post_init__(self) -> None:
        low, high = self.sparsity_range
        if not 0.0 <= low <= high < 1.0:
            raise ConfigError(f"sparsity range must satisfy 0 <= low <= high < 1, got "
                              f"[{low}, {high}]")
        if not 0.0 < self.resolution <= 0.5:
            raise ConfigError(f"resolution must be in (0, 0.5], got {self.resolution}")
        for key, values in self.choices.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"search choice {key!r} must be a non-empty list")

    def levels(self) -> tuple[float, ...]:
        """The sparsity grid: low, low + resolution, ..., high (rounded to the step)."""
        low, high = self.sparsity_range
        count = int(math.floor((high - low) / self.resolution + 1e-9)) + 1
        digits = max(0, -int(math.floor(math.log10(self.resolution)))) + 2
        return tuple(round(low + i * self.resolution, digits) for i in range(count))

    def candidates(self, pattern: str = "unstructured", structure: str = "none"
                   ) -> list[Candidate]:
        """Every combination of the choices, in the order given (the first choice varies
        slowest); `pattern` and `structure` are the base's, where no choice sets them."""
        keys = list(self.choices)
        grid = self.levels()
        out = []
        for number, values in enumerate(itertools.product(*(self.choices[k] for k in keys))):
            settings = dict(zip(keys, values, strict=True))
            pattern_of = Pattern.parse(str(settings.get("pattern", self.base.get("pattern",
                                                                                 pattern))))
            structure_of = settings.get("structure", self.base.get("structure", structure))
            fixed = pattern_of.is_nm and structure_of in (None, "none")
            out.append(Candidate(number, settings, (pattern_of.sparsity,) if fixed else grid))
        return out


def space_from_lists(lists: Mapping[str, str | None], sparsity_range=None,
                     resolution: float | None = None) -> SearchSpace:
    """The space of the command line: comma-separated lists by prune option name."""
    choices = {key: [v.strip() for v in text.split(",") if v.strip()]
               for key, text in lists.items() if text}
    return SearchSpace(choices, {}, tuple(sparsity_range or DEFAULT_RANGE),
                       resolution or DEFAULT_RESOLUTION)


def load_space(path: str | Path) -> SearchSpace:
    """A TOML search file (module docstring); one-line `ConfigError`s."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the search file ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    unknown = set(data) - {"space", "base"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; a search "
                          "file has [space] and [base]")
    space, base = data.get("space", {}), data.get("base", {})
    if not isinstance(space, dict) or not isinstance(base, dict):
        raise ConfigError(f"{path}: [space] and [base] must be tables")
    sparsity = space.get("sparsity", list(DEFAULT_RANGE))
    if not (isinstance(sparsity, list) and len(sparsity) == 2
            and all(isinstance(v, (int, float)) for v in sparsity)):
        raise ConfigError(f"{path}: space.sparsity must be [low, high]")
    resolution = space.get("resolution", DEFAULT_RESOLUTION)
    if not isinstance(resolution, (int, float)):
        raise ConfigError(f"{path}: space.resolution must be a number")
    choices = {key: value if isinstance(value, list) else [value]
               for key, value in space.items() if key not in SPACE_KEYS}
    return SearchSpace(choices, dict(base), (float(sparsity[0]), float(sparsity[1])),
                       float(resolution))


def merged(space: SearchSpace, other: SearchSpace) -> SearchSpace:
    """`other`'s choices and base win over `space`'s (command line over file)."""
    return SearchSpace({**space.choices, **other.choices}, {**space.base, **other.base},
                       other.sparsity_range, other.resolution)


def describe(candidates: Sequence[Candidate]) -> str:
    sizes = {len(c.levels) for c in candidates}
    return (f"{len(candidates)} candidate(s) x up to {max(sizes)} sparsity level(s)")
