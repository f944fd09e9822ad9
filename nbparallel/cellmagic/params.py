"""One ``%%parallel --map`` run's parameter values: a tuple that names them.

Its repr is ``k=0, seed=3``, so everything that names an item by its repr (a failure's message and
traceback, the progress display, the tag on a printed line) names a run by its parameters rather
than ``item 2 ((0, 3))``. Workers unpickle it, so this module imports the standard library only.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from typing import Any

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


class Params(tuple):  # type: ignore[type-arg]
    """The values of one run, in the order of ``names`` (a plain tuple to the cell runner)."""

    names: tuple[str, ...]

    def __new__(cls, names: Iterable[str], values: Iterable[Any]) -> Params:
        made = super().__new__(cls, values)
        made.names = tuple(names)
        return made

    def __reduce__(self) -> tuple[Any, ...]:
        return (Params, (self.names, tuple(self)))

    def __repr__(self) -> str:
        return ", ".join(f"{name}={_short.repr(value)}" for name, value in zip(self.names, self))

    def as_dict(self) -> dict[str, Any]:
        """``{name: value}``."""
        return dict(zip(self.names, self))
