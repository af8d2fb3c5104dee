"""What every registered part is, and the options it declares once, on itself.

A part (a method, allocation, storage format, weight update, mask refinement or pattern)
is a class with a `name`, a `description` and, if it has settings, an `Options` dataclass
whose fields are made with `option(...)`:

    @dataclass(frozen=True)
    class Options:
        alpha: float = option(0.5, help="exponent of the input norm", minimum=0.0)

The field's default is the one default of that setting. From the declaration come the
command-line option (``--<part>-<field>``, e.g. ``--ria-alpha``, unless `flag` names
another), its ``--help`` line, the recipe key (the option's name with ``_`` for ``-``:
``ria_alpha = 0.7``), the checks of a value, and the part's constructor argument: the
registry builds each part as ``Part(Options(...))`` from the run's settings.

This module imports nothing heavy, so that the command line can list every option before
numba or onnx is imported.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

_SPEC_KEY = "onnxprune.option"


@dataclass(frozen=True)
class Declared:
    """What `option` records in a dataclass field's metadata."""

    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    flag: str | None = None


def option(default: Any, *, help: str, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: bool = False,
           choices: Sequence[Any] | None = None, metavar: str | None = None,
           flag: str | None = None) -> Any:
    """A field of a part's `Options` dataclass: its default, help and bounds.

    `minimum`/`maximum` bound numbers (inclusive; `exclusive_minimum` makes the minimum
    strict); `choices` lists the allowed values; `flag` is the command-line name without
    ``--`` when it is not ``<part>-<field>`` (an option users already know by that name).
    """
    declared = Declared(help, minimum, maximum, exclusive_minimum,
                         tuple(choices) if choices is not None else None, metavar, flag)
    return dataclasses.field(default=default, metadata={_SPEC_KEY: declared})


@dataclass(frozen=True)
class NoOptions:
    """The options of a part that has none."""


@dataclass(frozen=True, kw_only=True)
class OptionSpec(Declared):
    """One declared option of one part, as the command line, recipes and checks see it;
    `flag` is always set (without the leading "--")."""

    kind: str  # "method", "allocation", ...
    part: str  # the part's name
    field: str  # the field of the part's Options
    type: type  # bool, int, float or str
    default: Any
    flag: str  # the declared flag, or <part>-<field>

    @property
    def dest(self) -> str:
        """The settings key, recipe key and argparse dest: the flag with '_' for '-'."""
        return self.flag.replace("-", "_")

    @property
    def option_string(self) -> str:
        return "--" + self.flag

    def check(self, value: Any) -> Any:
        """`value` as this option's type, or a `ConfigError` naming the option and what is
        wrong."""
        converted, problem = self.convert(value)
        if problem:
            raise ConfigError(f"{self.option_string}: {problem}")
        return converted

    def convert(self, value: Any) -> tuple[Any, str | None]:
        """(`value` as this option's type, None), or (None, what is wrong with it)."""
        if self.type is bool:
            if not isinstance(value, bool):
                return None, f"expected true or false, got {value!r}"
            return value, None
        if self.type in (int, float):
            wanted = "an integer" if self.type is int else "a number"
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                return None, f"expected {wanted}, got {value!r}"
            try:
                number = self.type(value)
            except (TypeError, ValueError):
                return None, f"expected {wanted}, got {value!r}"
            if self.type is int and isinstance(value, float) and number != value:
                return None, f"expected an integer, got {value!r}"
            if isinstance(number, float) and not math.isfinite(number):
                return None, f"expected a finite number, got {value!r}"
            problem = self._bounds_problem(number)
            if problem:
                return None, problem
            value = number
        elif not isinstance(value, str):
            return None, f"expected a string, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return None, f"expected one of {', '.join(map(str, self.choices))}, got {value!r}"
        return value, None

    def _bounds_problem(self, number: float) -> str | None:
        if self.minimum is not None:
            low = self.minimum
            if number < low or (self.exclusive_minimum and number == low):
                relation = ">" if self.exclusive_minimum else ">="
                return f"must be {relation} {low:g}, got {number:g}"
        if self.maximum is not None and number > self.maximum:
            return f"must be <= {self.maximum:g}, got {number:g}"
        return None

    def help_text(self) -> str:
        """The --help line: what it does, its bounds and its default."""
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        text = f"{self.part}: {self.help}"
        if bounds:
            text += f" ({', '.join(bounds)})"
        if self.type is not bool and self.default is not None:
            text += f" [{self.default}]"
        return text


class Part(ABC):  # noqa: B024 (no abstract method here: each kind's base adds its own)
    """Base of every registered part. `Options` declares its settings (see `option`)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()


def option_specs(part: type | object, kind: str) -> list[OptionSpec]:
    """The options `part` (a class or an instance) declares, in field order."""
    options_type = getattr(part, "Options", NoOptions)
    if not dataclasses.is_dataclass(options_type):
        raise TypeError(f"{kind} {getattr(part, 'name', part)!r}: Options must be a dataclass")
    name = str(getattr(part, "name", ""))
    specs = []
    for field in dataclasses.fields(options_type):
        declared = field.metadata.get(_SPEC_KEY)
        if declared is None:
            raise TypeError(f"{kind} {name!r}: option {field.name!r} must be made with "
                            "onnxprune.parts.option(...)")
        flag = declared.flag or f"{name}-{field.name.rstrip('_')}".replace("_", "-")
        specs.append(OptionSpec(**{**vars(declared), "flag": flag}, kind=kind, part=name,
                                field=field.name, type=_value_type(field, declared),
                                default=field.default))
    return specs


def _value_type(field: dataclasses.Field, declared: Declared) -> type:
    default = field.default
    if default is dataclasses.MISSING:
        raise TypeError(f"option {field.name!r} needs a default")
    for kind in (bool, int, float, str):
        if isinstance(default, kind):
            return kind
    if default is None:  # an optional value: the declared type names what it holds
        annotation = str(field.type)
        for kind in (bool, int, float, str):
            if kind.__name__ in annotation:
                return kind
    raise TypeError(f"option {field.name!r}: only bool, int, float and str options are "
                    f"supported, got default {default!r}")


def build_options(part: type, specs: Sequence[OptionSpec], settings: Mapping[str, Any]) -> Any:
    """The part's `Options` from the settings (keys are `OptionSpec.dest`), checked."""
    values = {spec.field: spec.check(settings[spec.dest]) for spec in specs
              if spec.dest in settings and settings[spec.dest] is not None}
    return getattr(part, "Options", NoOptions)(**values)
