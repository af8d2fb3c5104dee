"""Recipes: `prune` options from a TOML file, and per-target overrides.

Top-level keys are the long option names of `onnxprune prune` with ``_`` for ``-``; they
become the defaults of the command line, so an option given there wins. Per-target
overrides are ``[[override]]`` tables: ``match`` (a regular expression searched in the
target name) and any of ``sparsity``, ``pattern``, ``method``, ``skip = true``. Every
matching override applies in file order, so for each setting the last one wins; the plan
entry of the target records which overrides set it.

`tomllib` reports no line numbers for values, so errors find the line of a key by scanning
the text: the first ``key =`` line of its table.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .registry import Registry

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

OVERRIDE_TABLE = "override"
OVERRIDE_KEYS = ("match", "sparsity", "pattern", "method", "skip")
# prune options a recipe cannot set: the file itself, and where the output goes
NOT_IN_RECIPES = ("help", "output", "recipe")


@dataclass(frozen=True)
class Override:
    """Settings for the targets whose name `match` finds (re.search); None = unchanged."""

    match: str
    sparsity: float | None = None
    pattern: str | None = None
    method: str | None = None
    skip: bool = False
    index: int = 0  # position among the overrides, from 1 (0: made in code)
    line: int = 0  # line of its [[override]] header in the recipe

    def __post_init__(self) -> None:
        for key in ("match", "sparsity", "pattern", "method", "skip"):
            problem = _override_value_problem(key, getattr(self, key))
            if problem:
                raise ConfigError(f"{self.label}: {key}: {problem}")

    @property
    def label(self) -> str:
        where = f" (line {self.line})" if self.line else ""
        return f"override {self.index}{where}" if self.index else f"override {self.match!r}"

    def matches(self, name: str) -> bool:
        return re.search(self.match, name) is not None

    def skip_only(self) -> Override:
        """The same override without its settings: only which targets it skips."""
        return replace(self, sparsity=None, pattern=None, method=None)


@dataclass
class Recipe:
    path: Path
    options: dict[str, object]  # prune option dest -> value
    overrides: tuple[Override, ...]


def as_overrides(values: Iterable[Override | Mapping] | None) -> tuple[Override, ...]:
    """Overrides given in code: `Override` objects or dicts of the same keys."""
    result = []
    for index, value in enumerate(values or (), 1):
        if isinstance(value, Override):
            result.append(value)
        elif isinstance(value, Mapping):
            unknown = set(value) - set(OVERRIDE_KEYS)
            if unknown:
                raise ConfigError(f"override {index}: unknown key {sorted(unknown)[0]!r}; "
                                  f"use {', '.join(OVERRIDE_KEYS)}")
            if "match" not in value:
                raise ConfigError(f"override {index}: needs a 'match' regular expression")
            result.append(Override(**value, index=index))
        else:
            raise ConfigError(f"override {index}: expected a table of settings, got "
                              f"{type(value).__name__}")
    return tuple(result)


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> Recipe:
    """Read and check a recipe against the options of `parser` (the prune subcommand)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such recipe file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the recipe ({exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    lines = _KeyLines(text)
    actions = _recipe_actions(parser)
    options: dict[str, object] = {}
    overrides: list[Override] = []
    for key, value in data.items():
        if key == OVERRIDE_TABLE:
            overrides = _overrides(path, value, lines)
            continue
        line = lines.top(key)
        if key not in actions:
            raise ConfigError(f"{path}, line {line}: unknown key {key!r} (top-level keys are "
                              "prune options with '_' for '-', e.g. min_size)")
        problem = _option_value_problem(key, value, actions[key])
        if problem:
            raise ConfigError(f"{path}, line {line}: {key}: {problem}")
        options[key] = list(value) if isinstance(value, list) else value
    return Recipe(path, options, tuple(overrides))


def parse_with_recipe(parser: argparse.ArgumentParser, prune_parser: argparse.ArgumentParser,
                      argv: Sequence[str] | None, recipe_path: str) -> argparse.Namespace:
    """Parse `argv` again with the recipe's values as the prune defaults: what the command
    line gives wins (a repeatable option given there replaces the recipe's list)."""
    recipe = load_recipe(recipe_path, prune_parser)
    prune_parser.set_defaults(**recipe.options, overrides=recipe.overrides)
    args = parser.parse_args(argv)
    for key, value in recipe.options.items():
        if isinstance(value, list) and len(getattr(args, key)) > len(value):
            setattr(args, key, getattr(args, key)[len(value):])
    return args


def apply_overrides(plan: dict, targets: Sequence, overrides: Sequence[Override]) -> dict:
    """The plan with each target's matching overrides applied in order (skips aside)."""
    from .config import Pattern
    from .plan import PlanOrigin, TargetPlan

    result = dict(plan)
    for target in targets:
        matching = [o for o in overrides if not o.skip and o.matches(target.name)
                    and (o.sparsity is not None or o.pattern is not None or o.method)]
        if not matching:
            continue
        entry = plan[target.name]
        sparsity, pattern, method, count = entry.sparsity, entry.pattern, entry.method, \
            entry.count
        for override in matching:
            if override.pattern is not None:
                pattern = Pattern.parse(override.pattern)
                if pattern.is_nm and target.reduction_length % pattern.m:
                    raise ConfigError(f"{override.label}: pattern {pattern} does not fit "
                                      f"{target.name} (reduction axis of "
                                      f"{target.reduction_length})")
                sparsity, count = (pattern.sparsity if pattern.is_nm else sparsity), None
            if override.sparsity is not None:
                if pattern.is_nm:
                    raise ConfigError(f"{override.label}: sparsity {override.sparsity} with "
                                      f"pattern {pattern} on {target.name}; add "
                                      "pattern = \"unstructured\" to the override")
                sparsity, count = override.sparsity, None
            method = override.method or method
        set_by = " + ".join(o.label for o in matching)
        result[target.name] = TargetPlan(target.name, sparsity, pattern, method, count, set_by,
                                         PlanOrigin.OVERRIDE)
    return result


def split_skipped(targets: list, overrides: Sequence[Override]) -> tuple[list, list]:
    """(targets kept, `SkippedTensor`s for the targets an override skips)."""
    from .targets import SkipCause, SkippedTensor

    kept, skipped = [], []
    for target in targets:
        matching = [o for o in overrides if o.matches(target.name)]
        skipping = [o for o in matching if o.skip]
        if skipping:
            skipped.append(SkippedTensor(target.name, SkipCause.OVERRIDE_SKIP,
                                         tuple(target.shape), target.dtype, target.source,
                                         {"override": skipping[-1].label}))
        else:
            kept.append(target)
    return kept, skipped


# ------------------------------------------------------------------------------ checking

def _recipe_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The prune options a recipe may set, by dest (the long name with '_' for '-')."""
    actions = {}
    for action in parser._actions:  # argparse has no public listing of its options
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in NOT_IN_RECIPES and action.dest != argparse.SUPPRESS:
            actions[action.dest] = action
    return actions


def _option_value_problem(key: str, value, action: argparse.Action) -> str | None:
    """What is wrong with a recipe value for `action`, or None."""
    from .registry import all_option_specs

    spec = next((s for s in all_option_specs() if s.dest == key), None)
    if spec is not None:  # an option a part declares: its own checks
        return spec.convert(value)[1]
    if isinstance(action, argparse._StoreTrueAction):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(action, argparse._CountAction):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"expected a count (0, 1, 2), got {value!r}"
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else None
        if values is None or not all(isinstance(v, str) for v in values):
            return f"expected a list of strings, got {value!r}"
        items = values
    else:
        items = [value]
    kind = getattr(action.type, "value_type", action.type)
    for item in items:
        problem = _scalar_problem(item, kind)
        if problem:
            return problem
        # a checking type (sparsity in [0, 1), counts >= 1): a callable with a value_type
        if kind is not action.type and callable(action.type):
            try:
                action.type(str(item))
            except argparse.ArgumentTypeError as exc:
                return str(exc)
        if action.choices is not None and item not in action.choices:
            return f"expected one of {', '.join(map(str, action.choices))}, got {item!r}"
        problem = _semantic_problem(key, item)
        if problem:
            return problem
    return None


def _scalar_problem(value, kind) -> str | None:
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        wanted = {int: "an integer", float: "a number"}.get(kind, "a string")
        return f"expected {wanted}, got {value!r}"
    if kind is int and not isinstance(value, int):
        return f"expected an integer, got {value!r}"
    if kind is float and not isinstance(value, (int, float)):
        return f"expected a number, got {value!r}"
    if kind not in (int, float) and not isinstance(value, str):
        return f"expected a string, got {value!r}"
    return None


def _semantic_problem(key: str, value) -> str | None:
    """Range and name checks of the options whose bad values are easy to make."""
    from .config import Pattern
    from .registry import ALLOCATIONS, FORMATS, METHODS, REFINES, UPDATES

    registries: dict[str, Registry[Any]] = {
        "method": METHODS, "allocation": ALLOCATIONS, "format": FORMATS, "update": UPDATES,
        "refine": REFINES}
    try:
        if key == "sparsity" and not 0.0 <= value < 1.0:
            return f"must be in [0, 1), got {value}"
        if key in ("min_size",) and value < 0:
            return f"must be >= 0, got {value}"
        if key in ("steps", "rounds", "calib_samples", "samples") and value < 1:
            return f"must be >= 1, got {value}"
        if key == "pattern":
            Pattern.parse(value)
        if key in ("include", "exclude"):
            re.compile(value)
        if key in registries and not (key in ("update", "refine") and value == "none"):
            registries[key].get(value)
    except ConfigError as exc:
        return str(exc)
    except re.error as exc:
        return f"bad regular expression {value!r}: {exc}"
    return None


def _override_value_problem(key: str, value) -> str | None:
    if key == "match":
        if not isinstance(value, str):
            return f"expected a regular expression string, got {value!r}"
        try:
            re.compile(value)
        except re.error as exc:
            return f"bad regular expression {value!r}: {exc}"
        return None
    if value is None:
        return None
    if key == "skip":
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    problem = _scalar_problem(value, float if key == "sparsity" else str)
    return problem or _semantic_problem(key, value)


def _overrides(path: Path, value, lines: _KeyLines) -> list[Override]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{path}, line {lines.top(OVERRIDE_TABLE)}: override must be an "
                          "array of tables ([[override]])")
    overrides = []
    for index, table in enumerate(value, 1):
        header = lines.override_header(index)
        for key, item in table.items():
            if key not in OVERRIDE_KEYS:
                raise ConfigError(f"{path}, line {lines.in_override(index, key)}: unknown key "
                                  f"{key!r} in [[override]] (use {', '.join(OVERRIDE_KEYS)})")
            problem = _override_value_problem(key, item)
            if problem:
                raise ConfigError(f"{path}, line {lines.in_override(index, key)}: {key}: "
                                  f"{problem}")
        if "match" not in table:
            raise ConfigError(f"{path}, line {header}: [[override]] needs a 'match' regular "
                              "expression")
        overrides.append(Override(**table, index=index, line=header))
    return overrides


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_\-]+))\s*[.=]""")


class _KeyLines:
    """Line numbers of keys, found by scanning the text table by table."""

    def __init__(self, text: str):
        self._top: dict[str, int] = {}
        self._overrides: list[tuple[int, dict[str, int]]] = []
        section: dict[str, int] | None = self._top
        for number, line in enumerate(text.splitlines(), 1):
            header = _HEADER.match(line)
            if header:
                brackets, name = header.groups()
                name = name.strip().strip("\"'")
                if brackets == "[[" and name == OVERRIDE_TABLE:
                    section = {}
                    self._overrides.append((number, section))
                else:  # any other table is an unknown key at the top level
                    self._top.setdefault(name.split(".")[0], number)
                    section = None
                continue
            key = _KEY.match(line)
            if key and section is not None:
                section.setdefault(next(g for g in key.groups() if g), number)

    def top(self, key: str) -> int | str:
        return self._top.get(key, "?")

    def override_header(self, index: int) -> int:
        return self._overrides[index - 1][0] if index <= len(self._overrides) else 0

    def in_override(self, index: int, key: str) -> int | str:
        if index > len(self._overrides):
            return "?"
        header, keys = self._overrides[index - 1]
        return keys.get(key, header)
