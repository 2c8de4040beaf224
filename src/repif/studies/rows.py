"""Typed result rows: one dataclass per kind of row a study writes to ``results.json``.

A row class lists its fields in the order they are written. A field that rows of earlier
versions lack (or that only some rows carry, such as a full-pool reference's ``scale``) defaults
to :data:`ABSENT` and is left out of :meth:`Row.to_dict`, so a row read back and written again
keeps exactly its keys. :meth:`Row.from_dict` checks a row read from a file: an unknown key, a
missing required field or a value of the wrong type is a ValueError naming the field.

The numbers' ranges (:func:`out_of_range`) are checked by each study's ``check_results``, which
also names the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any

from repif.validation import dataclass_from_dict

#: How far past its bound round-off may carry a computed value (a cosine of two nearly equal
#: vectors comes out as 1 + 2e-16); far below any edit that changes a result.
RANGE_SLACK = 1e-9


def out_of_range(row: dict[str, Any], ranges: dict[str, tuple[float, float]]) -> str | None:
    """``"f1=7.5, outside [0, 1]"`` for the first field of ``row`` (numbers or null, already
    checked) that lies outside its range in ``ranges``, or None. NaN (a bare ``NaN`` written
    into the JSON by hand; repif writes null) is outside every range."""
    for k, (lo, hi) in ranges.items():
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (
            lo - RANGE_SLACK <= v <= hi + RANGE_SLACK
        ):
            return f"{k}={v!r}, outside [{lo:g}, {hi:g}]"
    return None


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A number or None (a JSON null: how repif writes NaN)."""
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


class _Absent:
    """The value of a row field the row does not carry (see the module doc)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"

    def __copy__(self) -> _Absent:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Absent:
        return self

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


def optional() -> Any:
    """A field that rows may leave out (:data:`ABSENT` unless given)."""
    return dataclasses.field(default=ABSENT)


#: What a field's annotation allows, and how an error names it.
_TYPES: dict[str, tuple[Any, str]] = {
    "int": (is_int, "an integer"),
    "str": (lambda v: isinstance(v, str), "a name"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a name or null"),
    "float": (lambda v: is_number(v) and v is not None, "a number"),
    "float | None": (is_number, "a number or null"),
    "list[float | None]": (lambda v: isinstance(v, list) and all(map(is_number, v)),
                           "a list of numbers or nulls"),
}


@dataclasses.dataclass(kw_only=True)
class Row:
    """Base of the typed rows: :meth:`to_dict` gives the JSON form, :meth:`from_dict` reads it
    back, checked."""

    def to_dict(self) -> dict[str, Any]:
        """The row as it is written to ``results.json`` (fields in order, absent ones left
        out)."""
        return {f.name: v for f in dataclasses.fields(self)
                if (v := getattr(self, f.name)) is not ABSENT}

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The fields every row carries."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)

    @classmethod
    def from_dict(cls, d: Any, what: str = "a row") -> Any:
        """The row stored as ``d``; ValueError naming an unknown key, a missing field or a
        field of the wrong type (``what`` names the row, e.g. ``"cells[3]"``)."""
        if not isinstance(d, dict):
            raise ValueError(f"{what} is not an object")
        for name in cls.required():
            if name not in d:
                raise ValueError(f"{what} has no {name}, a field every row carries")
        row = dataclass_from_dict(cls, d, what)
        for f in dataclasses.fields(row):
            v = getattr(row, f.name)
            ok, wanted = _TYPES[str(f.type)]
            if v is not ABSENT and not ok(v):
                raise ValueError(f"{what} has {f.name}={v!r}, not {wanted}")
        return row


def finite_positive(v: Any) -> bool:
    """Whether ``v`` is a finite number > 0 (bools refused)."""
    return is_number(v) and v is not None and math.isfinite(v) and v > 0


def check_rows(rows: list[Any], field: str, row_class: type[Row],
               ranges: dict[str, tuple[float, float]], key: Callable[[dict[str, Any]], Hashable],
               bad: Callable[[str], Exception],
               check: Callable[[dict[str, Any], str], str | None] | None = None,
               repeats: str = "the entry") -> None:
    """Check every entry of ``rows`` (the list under ``field`` of a results file), in order: an
    object; ``check(row, what)`` (a study's own checks: a message, or None); every number
    within ``ranges``; of ``row_class``'s shape (:meth:`Row.from_dict`); a ``key`` no earlier
    entry has. The first failure raises ``bad(message)``, the message naming the entry
    (``cells[3] has …``)."""
    seen: set[Hashable] = set()
    for i, row in enumerate(rows):
        what = f"{field}[{i}]"
        if not isinstance(row, dict):
            raise bad(f"{what} is not an object")
        if check is not None and (problem := check(row, what)) is not None:
            raise bad(problem)
        if (problem := out_of_range(row, ranges)) is not None:
            raise bad(f"{what} has {problem}")
        try:  # an unknown key, or a field the checks above do not cover of the wrong type
            row_class.from_dict(row, what)
        except ValueError as err:
            raise bad(str(err)) from None
        if (k := key(row)) in seen:
            raise bad(f"{what} repeats {repeats} {k}")
        seen.add(k)
