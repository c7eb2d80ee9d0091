"""Valid ranges of numeric config fields, declared next to each field's definition.

A field says what it accepts where it is defined::

    momentum: float = bounded(0.9, ge=0, lt=1)
    scale: Tuple[float, float] = bounded((0.08, 1.0), gt=0, le=1, ordered=True)

and :func:`problems` walks any (nested) dataclass and reports every value outside its
range, naming the key (``optim.momentum=5.0: must be in [0, 1)``). Floats must also be
finite: NaN compares false with every bound, so a plain ``lr < 0`` test lets it through.
Tuples are checked element by element, and ``ordered`` asks for lo <= hi (a crop scale
of (1.0, 0.08) is a typo, not a recipe).

Plain Python: the pipeline library declares its ``ViewSpec`` ranges with it and the
trainer's config (bt_fast.config) imports it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator


def _num(x: float) -> str:
    """1048576 as 1048576 (not 1.04858e+06), 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """lo/hi bounds (None: unbounded), open or closed, of a number or of each tuple item."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    ordered: bool = False
    """A tuple whose items must not decrease (a (min, max) pair)."""

    def text(self) -> str:
        """'in [0, 1)', '>= 1', '> 0': what the message says the field accepts."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return "finite"

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is outside the range, or None."""
        items = value if isinstance(value, (tuple, list)) else (value,)
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"must be a number {self.text()}"
            if isinstance(v, float) and not math.isfinite(v):
                return "must be finite"
            if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
                return f"must be {self.text()}"
            if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
                return f"must be {self.text()}"
        if self.ordered and any(a > b for a, b in zip(items, items[1:])):
            return "must be (min, max) with min <= max"
        return None


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, ordered: bool = False):
    """A dataclass field with ``default`` and its valid range (``ge``/``gt`` low, ``le``/``lt`` high)."""
    rng = Range(lo=gt if gt is not None else ge, hi=lt if lt is not None else le,
                lo_open=gt is not None, hi_open=lt is not None, ordered=ordered)
    return field(default=default, metadata={"range": rng})


def is_numeric(tp: Any) -> bool:
    """int, float, or a tuple of them: the field types that must declare a range."""
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (tuple, typing.Tuple):
        return all(a in (int, float) for a in typing.get_args(tp) if a is not Ellipsis)
    return False


def numeric_fields(cls: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """(name, field) of every numeric field of dataclass ``cls`` (not nested)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_numeric(hints[f.name]):
            yield f.name, f


def problems(obj: Any, prefix: str = "") -> Iterator[str]:
    """'key=value: why' for every out-of-range numeric field in ``obj`` and below it.

    Keys are dotted as ``--set`` writes them (``views.0.scale``, ``optim.momentum``).
    """
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "__dataclass_fields__"):
        for i, item in enumerate(obj):
            if dataclasses.is_dataclass(item):
                yield from problems(item, f"{prefix}{i}.")
        return
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        rng = f.metadata.get("range")
        if rng is not None:
            why = rng.problem(value)
            if why:
                shown = list(value) if isinstance(value, tuple) else value
                yield f"{prefix}{f.name}={shown}: {why}"
        elif dataclasses.is_dataclass(value) or isinstance(value, list):
            yield from problems(value, f"{prefix}{f.name}.")


def check(obj: Any, prefix: str = "") -> None:
    """ValueError naming the first out-of-range field of ``obj`` (see :func:`problems`)."""
    for message in problems(obj, prefix):
        raise ValueError(message)


def flag_problem(args: Any, ranges: dict[str, Range]) -> str | None:
    """'--flag value: why' for the first command-line flag outside its range, else None.

    ``ranges`` maps argparse dest names to Ranges; flags a command does not have (None)
    are skipped. Commands raise their UserError with it (one line, exit 2)."""
    for name, rng in ranges.items():
        value = getattr(args, name, None)
        why = rng.problem(value) if value is not None else None
        if why:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            return f"--{name.replace('_', '-')} {shown}: {why}"
    return None
