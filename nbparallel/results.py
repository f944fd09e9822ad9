"""What ``%%parallel --map`` stores: ``Results``, a list of ``Result(params, value)`` records.

One entry per run, in input order. ``params`` is ``{name: value}`` of that run's ``--map``
parameters, ``value`` the value of the cell's last expression (None when the cell ends with a
statement). With ``--errors return`` a failed run's value is its exception; after the stop button or
a failure, a run that never finished has the value ``MISSING``.

``results.values`` is the plain list of values, ``results.records()`` flat dicts (a dict value is
spread into columns), and ``results.to_dataframe()`` the same rows as a pandas DataFrame.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from .payload.pickling import describe

__all__ = ["MISSING", "Result", "Results"]


class _Missing:
    """The value of a run that never finished (stopped or interrupted). Falsy; one instance."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISSING"  # pickled by name, so it stays the same object


MISSING = _Missing()


class Result(NamedTuple):
    """One run: its parameters and the value of the cell's last expression."""

    params: dict[str, Any]
    value: Any


class Results(list[Result]):
    """The runs of one ``%%parallel --map`` cell, in input order; ``names`` are the parameters."""

    def __init__(self, entries: Iterable[Result] = (), names: Iterable[str] = ()) -> None:
        super().__init__(entries)
        self.names: tuple[str, ...] = tuple(names)

    @property
    def values(self) -> list[Any]:
        """The values alone, in input order."""
        return [entry.value for entry in self]

    @property
    def missing(self) -> list[int]:
        """Positions of runs that never finished."""
        return [i for i, entry in enumerate(self) if entry.value is MISSING]

    @property
    def failed(self) -> list[int]:
        """Positions of runs whose value is an exception (``--errors return``)."""
        return [i for i, entry in enumerate(self) if isinstance(entry.value, BaseException)]

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per run: the parameters, then ``value``; or, when every finished value is
        a dict, that dict's keys as columns of their own."""
        finished = [e.value for e in self if e.value is not MISSING and not isinstance(e.value, BaseException)]
        spread = bool(finished) and all(isinstance(v, Mapping) for v in finished)
        rows = []
        for entry in self:
            if spread and isinstance(entry.value, Mapping):
                rows.append({**entry.params, **entry.value})
            else:
                rows.append({**entry.params, "value": entry.value})
        return rows

    def to_dataframe(self) -> Any:
        """``records()`` as a pandas DataFrame (needs pandas)."""
        try:
            pandas = importlib.import_module("pandas")  # optional; not a dependency
        except ImportError:
            raise ImportError("Results.to_dataframe needs pandas (pip install pandas); "
                              "records() gives the same rows as dicts") from None
        return pandas.DataFrame(self.records())

    def __repr__(self) -> str:
        over = " x ".join(self.names) or "no parameters"
        notes = [f"{len(what)} {label}" for what, label in ((self.missing, "missing"), (self.failed, "failed"))
                 if what]
        head = f"Results: {len(self)} runs over {over}" + (f" ({', '.join(notes)})" if notes else "")
        shown = list(enumerate(self))
        if len(shown) > 10:
            shown = shown[:5] + [(-1, Result({}, None))] + shown[-5:]
        lines = [head]
        for index, entry in shown:
            if index < 0:
                lines.append(f"  ... {len(self) - 10} more")
                continue
            params = ", ".join(f"{k}={describe(v)}" for k, v in entry.params.items())
            lines.append(f"  [{index}] {params} -> {describe(entry.value)}")
        return "\n".join(lines)
