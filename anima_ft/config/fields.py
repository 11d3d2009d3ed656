"""Per-field value rules of the schema (numeric ranges, allowed strings) and the walk that checks every field.

A schema field declares its rule where it is defined, e.g. ``eps: float = bounded(1e-8, lo=0, lo_open=True)``;
:func:`check_fields` walks the whole config once (nested dataclasses, list items, list elements and the free
``dist.deepspeed_overrides`` dict) and raises ``ValueError`` naming the dotted key and the value for:

* any float that is NaN or +-Inf (a NaN learning rate trains silently; a NaN clip norm turns clipping off),
* a number outside its field's range (sentinels such as ``-1 = inherit`` are listed per field),
* a string that is not one of its field's choices.

Cross-field rules (batch arithmetic, stage lists, files on disk) stay in ``validate.py``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

RULE = "anima_ft.rule"  # key of the rule in a dataclass field's metadata


@dataclass(frozen=True)
class Range:
    """Allowed numbers: ``lo <= x <= hi`` (``lo_open`` / ``hi_open`` make a bound strict), plus ``sentinels``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    sentinels: tuple[float, ...] = ()
    note: str = ""

    def describe(self) -> str:
        """Human form of the range, e.g. ``in [0, 1)``, ``> 0`` or ``>= 1, or -1 (inherit)``."""
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            text = "finite"
        if self.sentinels:
            text += ", or " + " / ".join(f"{s:g}" for s in self.sentinels)
        return text + (f" ({self.note})" if self.note else "")

    def contains(self, x: float) -> bool:
        """True when ``x`` is allowed (a sentinel or inside the bounds)."""
        if x in self.sentinels:
            return True
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))


@dataclass(frozen=True)
class Choices:
    """Allowed strings of a field."""

    options: tuple[str, ...]


def bounded(default: Any = dataclasses.MISSING, lo: float | None = None, hi: float | None = None, *,
            lo_open: bool = False, hi_open: bool = False, sentinels: tuple[float, ...] = (), note: str = "",
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose number (or every number of its list) must lie in the given range."""
    rule = Range(lo, hi, lo_open, hi_open, tuple(sentinels), note)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={RULE: rule})
    return field(default=default, metadata={RULE: rule})


def one_of(default: str, options: tuple[str, ...]) -> Any:
    """A dataclass string field restricted to ``options``."""
    assert default in options, (default, options)
    return field(default=default, metadata={RULE: Choices(tuple(options))})


SEED_MAX = 2**32 - 1  # numpy's seed limit; torch accepts more, numpy's RandomState does not


def seed_field(default: int = 0) -> Any:
    """An integer seed field: ``0 <= seed <= 2**32 - 1``."""
    return bounded(default, 0, SEED_MAX)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_value(key: str, value: Any, rule: Range | Choices | None) -> None:
    if _is_number(value):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} is not a finite number; give a finite value"
                             + (f" {rule.describe()}" if isinstance(rule, Range) else ""))
        if isinstance(rule, Range) and not rule.contains(value):
            raise ValueError(f"{key}={value!r} is out of range: must be {rule.describe()}")
    elif isinstance(value, str) and isinstance(rule, Choices) and value not in rule.options:
        raise ValueError(f"{key}={value!r} is not valid; use one of {list(rule.options)}")


def _walk_free(key: str, value: Any) -> None:
    """Finiteness of every number inside a free-form container (``dist.deepspeed_overrides``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _walk_free(f"{key}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk_free(f"{key}.{i}", v)
    else:
        _check_value(key, value, None)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass ``obj`` (recursively) against its rule; ``prefix`` is its dotted path."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        rule = f.metadata.get(RULE)
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_fields(item, f"{key}.{i}")
                else:
                    _check_value(f"{key}.{i}", item, rule)
        elif isinstance(value, dict):
            _walk_free(key, value)
        else:
            _check_value(key, value, rule)


def numeric_fields(obj: Any, prefix: str = "") -> list[tuple[str, type, Any]]:
    """``(dotted key, int | float, rule)`` of every scalar numeric field reachable from ``obj`` (for tests/docs).

    List items are addressed by index as they exist in ``obj``; list-of-number fields appear as ``key.0`` etc.
    """
    out: list[tuple[str, type, Any]] = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value, rule = getattr(obj, f.name), f.metadata.get(RULE)
        items = [(key, value)] if not isinstance(value, (list, tuple)) else [(f"{key}.{i}", v) for i, v in enumerate(value)]
        for k, v in items:
            if dataclasses.is_dataclass(v):
                out += numeric_fields(v, k)
            elif _is_number(v):
                out.append((k, type(v), rule))
    return out
