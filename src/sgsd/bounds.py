"""The bounds of numeric settings, checked when a settings object is built (TRL's `__post_init__`).

Every settings dataclass (`sgsd.config`'s sections, `sgsd.loss_settings.SGSDSettings`) declares a `Bound` for
each numeric field in its `BOUNDS` table and calls `check_settings(self)` in `__post_init__`, so a value from a
YAML file, a `key=value` override or Python code passes one check before anything uses it: no value passes the
config check and fails once a model has loaded. NaN and infinity are refused for every float (a setting is a
finite number); `None` passes where the field's type allows it. tests/test_config_bounds.py feeds 0, a negative
value, NaN and infinity to every numeric field through each route.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

from sgsd.errors import ConfigError, shorten


class SettingsError(ConfigError, ValueError):
    """A settings value out of its bounds (a `ConfigError` for the CLI, a `ValueError` for Python callers)."""


@dataclass(frozen=True)
class Bound:
    """low <= value (low < value with `low_open`), value <= high (value < high with `high_open`); None: no
    bound on that side. `hint` says what a boundary value means or how to choose one."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None and self.high is not None:
            parts.append(f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}")
        elif self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        elif self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "must be a finite number " + " ".join(parts) + (f" ({self.hint})" if self.hint else "")


def at_least(low: float, hint: str = "") -> Bound:
    return Bound(low=low, hint=hint)


def above(low: float, hint: str = "") -> Bound:
    return Bound(low=low, low_open=True, hint=hint)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False, hint: str = "") -> Bound:
    return Bound(low, high, low_open, high_open, hint)


def bound_problems(obj: Any, where: str) -> list[str]:
    """One message per numeric field of the dataclass `obj` outside its `BOUNDS` entry (`where`: the section's
    dotted name); a numeric field without an entry is a programming error, reported as one."""
    bounds: dict[str, Bound] = getattr(type(obj), "BOUNDS", {})
    out = []
    for spec in dataclasses.fields(obj):
        value = getattr(obj, spec.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        bound = bounds.get(spec.name)
        if bound is None:
            out.append(f"{where}.{spec.name}: no bound declared ({type(obj).__name__}.BOUNDS)")
        elif not bound.holds(value):
            out.append(f"{where}.{spec.name}={shorten(repr(value), 40)}: {bound.describe()}")
    return out


def check_settings(obj: Any, where: str, extra: Sequence[str] = ()) -> None:
    """Raise a `SettingsError` with every problem of `obj`: its bounds and `extra` (the section's own
    cross-field checks)."""
    problems = bound_problems(obj, where) + list(extra)
    if problems:
        raise SettingsError("; ".join(problems))
