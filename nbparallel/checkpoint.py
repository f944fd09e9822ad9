"""Durable sweeps: ``nbparallel.map(fn, items, checkpoint="runs/sweep.db")`` and what goes with it.

Every finished item's outcome is written to a journal (an SQLite file; kernel/journal.py) as it
arrives. Run the same call again, after a crash, an interrupt, a kernel restart or in another
process, and only the items the journal has no value for run; the progress display says how many
were restored. Failed items run again unless ``Checkpoint(..., rerun_failed=False)``.

- ``Checkpoint(path, on_change=..., rerun_failed=...)``: what ``checkpoint=`` takes besides a path.
- ``load(path)``: what a journal holds, read without running anything (another process may be
  writing it meanwhile).
- ``submit(path, fn, *args, **kwargs)``: one call, done once: its future is already done when the
  journal holds its value (``%%parallel --bg --checkpoint PATH`` uses it).
- ``CheckpointError``, ``CheckpointBusy`` (another sweep is writing the journal) and
  ``CheckpointMismatch`` (the journal holds results of a different function).
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .futures import submit as _submit
from .kernel.journal import Checkpoint, CheckpointBusy, CheckpointError, CheckpointMismatch, Journal
from .kernel.journalrows import Row
from .kernel.sweep import run_once

__all__ = ["Checkpoint", "CheckpointError", "CheckpointBusy", "CheckpointMismatch", "Call", "Entry", "Contents",
           "load", "submit"]


@dataclass(frozen=True)
class Call:
    """A function that wrote results to the journal: ``digest`` identifies it (its code, closure,
    defaults and the globals it reads); ``source`` when Python could find it."""

    id: int
    name: str
    digest: str
    source: str | None
    started: datetime.datetime
    pid: int
    host: str
    python: str


@dataclass(frozen=True)
class Entry:
    """The newest outcome of one item: ``value`` (or with ``ok=False`` the exception), when it
    ``finished``, the ``call`` that made it, and the ``item`` itself (None when only its digest was
    kept: big items)."""

    index: int
    ok: bool
    value: Any
    finished: datetime.datetime
    call: Call
    item: Any = None


class Contents:
    """What a journal holds (``load``): an Entry per index, newest outcome first wins."""

    def __init__(self, path: str, calls: list[Call], entries: dict[int, Entry]) -> None:
        self.path = path
        self.calls = calls
        self.entries = entries

    @property
    def values(self) -> dict[int, Any]:
        """``{index: value}`` of the items that succeeded."""
        return {i: e.value for i, e in self.entries.items() if e.ok}

    @property
    def failures(self) -> dict[int, BaseException]:
        """``{index: exception}`` of the items whose newest outcome is a failure."""
        return {i: e.value for i, e in self.entries.items() if not e.ok}

    @property
    def finished(self) -> dict[int, datetime.datetime]:
        return {i: e.finished for i, e in self.entries.items()}

    def function(self, index: int) -> Call:
        """The function that made item ``index``'s outcome."""
        return self.entries[index].call

    def records(self) -> list[dict[str, Any]]:
        """One dict per item (index, ok, value, item, finished, function), e.g. for ``pandas.DataFrame``."""
        return [{"index": e.index, "ok": e.ok, "value": e.value, "item": e.item, "finished": e.finished,
                 "function": e.call.name} for e in self.entries.values()]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries.values())

    def __repr__(self) -> str:
        names = sorted({c.name for c in self.calls})
        return (f"<nbparallel checkpoint {self.path}: {len(self.values):,} values, {len(self.failures):,} failures, "
                f"by {', '.join(names) or 'nobody yet'}>")


def load(path: str | os.PathLike[str]) -> Contents:
    """Read the journal at ``path`` without running anything: the values, the failures, when
    each finished, and which function made them. Safe while a sweep is writing it."""
    journal = Journal.open(path, write=False)
    try:
        calls = {row[0]: Call(row[0], row[2], row[1], row[3], _when(row[5]), row[6], row[7], row[8])
                 for row in journal.calls()}
        entries: dict[int, Entry] = {}
        for row in journal.rows():
            _read(row, calls, entries)
    finally:
        journal.close()
    return Contents(os.fspath(path), list(calls.values()), dict(sorted(entries.items())))


def _read(row: Row, calls: dict[int, Call], entries: dict[int, Entry]) -> None:
    fresh = [(k, i) for k, i in enumerate(row.indices) if i not in entries]
    if not fresh:
        return
    try:
        outcomes, ok = row.outcomes(), not row.failed
    except Exception as exc:  # e.g. a large value's file is gone
        outcomes, ok = [CheckpointError(f"this outcome could not be read back: {type(exc).__name__}: {exc}")], False
    try:
        items = pickle.loads(row.items) if row.items is not None else None
    except Exception:  # a class the items need is not defined here
        items = None
    call = calls.get(row.call) or Call(row.call, "?", "?", None, _when(0), 0, "?", "?")
    for k, index in fresh:
        value = outcomes[k] if k < len(outcomes) else outcomes[0]
        item = items[k] if items is not None and k < len(items) else None
        entries[index] = Entry(index, ok, value, _when(row.finished), call, item)


def _when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds)


def submit(path: str | os.PathLike[str] | Checkpoint, fn: Callable[..., Any], /, *args: Any,
           **kwargs: Any) -> cf.Future[Any]:
    """``nbparallel.submit(fn, *args, **kwargs)`` done once: when the journal at ``path`` holds the
    value of this call (same function, same arguments), a future already done with it (its
    ``restored`` attribute is True); else the call is submitted and its outcome written when it ends."""
    future, restored = run_once(_submit, fn, args, kwargs, path)
    setattr(future, "restored", restored)
    return future
