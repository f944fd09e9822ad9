"""The ``%%parallel`` line: splitting it into words and turning ``--map NAME=EXPR`` into values.

No IPython here (``magics.py`` feeds the words to its argparse parser). Errors are ``CellError``
with a one-line message that names the offending word.
"""

from __future__ import annotations

import itertools
import keyword
from collections.abc import Mapping
from typing import Any

from ..kernel.journal import Checkpoint
from ..payload import pickling as ser
from .cellcode import CellError

_OPEN, _CLOSE = "([{", ")]}"


def split_line(line: str) -> list[str]:
    """Split on spaces outside brackets and string literals, so ``--map a=[1, 2]`` is two words.

    A word wrapped whole in quotes, shell style (``--map "a=[1, 2]"``), loses them.
    """
    words: list[str] = []
    word: list[str] = []
    depth = 0
    quote = ""
    chars = iter(line)
    for char in chars:
        if quote:
            word.append(char)
            if char == "\\":
                word.append(next(chars, ""))
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
            word.append(char)
        elif char.isspace() and depth == 0:
            if word:
                words.append("".join(word))
                word = []
        else:
            depth += (char in _OPEN) - (char in _CLOSE)
            word.append(char)
    if quote or depth > 0:
        raise CellError(f"unbalanced {'quote' if quote else 'bracket'} in {line.strip()!r}")
    if word:
        words.append("".join(word))
    return [w[1:-1] if len(w) >= 2 and w[0] == w[-1] in "'\"" and w[0] not in w[1:-1] else w for w in words]


def evaluate_maps(specs: list[str], namespace: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """``["alpha=[1, 2]", ...]`` to ``[("alpha", [1, 2]), ...]``: each EXPR evaluated in
    ``namespace`` and made a list; every value checked to be sendable to a worker."""
    params: list[tuple[str, list[Any]]] = []
    for spec in specs:
        name, sep, expr = spec.partition("=")
        name, expr = name.strip(), expr.strip()
        if not sep or not expr:
            raise CellError(f"--map needs NAME=EXPR, got {spec!r}")
        if not name.isidentifier() or keyword.iskeyword(name):
            raise CellError(f"--map {spec}: {name!r} is not a valid variable name")
        if any(name == seen for seen, _ in params):
            raise CellError(f"--map {name} is given twice")
        try:
            value = eval(expr, dict(namespace))  # a copy: the walrus in an EXPR must not assign
        except Exception as exc:
            raise CellError(f"--map {name}={expr} failed: {type(exc).__name__}: {exc}") from None
        try:
            values = list(value)
        except TypeError:
            raise CellError(f"--map {name}={expr} gives a {type(value).__name__}, which is not iterable; "
                            "give a list, a range or another iterable") from None
        except Exception as exc:
            raise CellError(f"--map {name}={expr}: iterating it failed: {type(exc).__name__}: {exc}") from None
        try:
            ser.dumps(values)
        except Exception as exc:
            raise CellError(f"--map {name}={expr}: its values cannot be sent to the workers: "
                            f"{type(exc).__name__}: {exc}") from None
        params.append((name, values))
    return params


def combine(params: list[tuple[str, list[Any]]], *, zipped: bool) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """The parameter names and one tuple of values per run: the Cartesian product (the last
    parameter varying fastest), or with ``zipped`` the values paired position by position."""
    names = tuple(name for name, _ in params)
    columns = [values for _, values in params]
    if not zipped:
        return names, list(itertools.product(*columns))
    lengths = {name: len(values) for name, values in params}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise CellError(f"--zip needs the same number of values for every --map: {listed}")
    return names, list(zip(*columns))


def checkpoint_option(path: str | None, on_change: str | None) -> Checkpoint | None:
    """``--checkpoint PATH`` (and ``--on-change``) as ``checkpoint=`` of map and submit."""
    if path is None:
        if on_change is not None:
            raise CellError("--on-change says what to do with a --checkpoint journal: give --checkpoint PATH too")
        return None
    return Checkpoint(path, on_change=on_change or "error")
