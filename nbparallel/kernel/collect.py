"""Collecting a map run's outcomes: into a list (``map``), or as they come (``imap``, ``Executor.map``).

Whatever stops a call (its first error, Ctrl-C, ``total_timeout``), every result that had arrived
is kept: the error raised carries them as ``details(err).completed`` ({index: result}; our own errors
as ``err.completed``), including the late batches that arrived while the run was being cancelled.
A task's exception is raised outside every handler here: a task raising TimeoutError or
KeyboardInterrupt is not mistaken for the call's timeout or for Ctrl-C.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import Interrupted, NbParallelError, TaskTimeout, completed_of, keep_completed
from .mapping import Batch, InputFailure, MapRun

#: ``{index: result}`` of the last call that stopped before its end (``nbparallel.last_results()``):
#: a cell stopped by the stop button has no ``err`` to read ``err.completed`` from.
last_stopped: dict[int, Any] = {}


def remember(error: BaseException) -> None:
    """Keep what had finished when a call stopped with ``error`` (nothing for other exceptions)."""
    global last_stopped
    completed = completed_of(error)
    if completed is not None:
        last_stopped = completed


class Kept:
    """The outcomes of a run by index: contiguous runs of values as spans (no dict entry per item
    for a million results), the rest one by one; errors in the items' places."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, list[Any]]] = []  # (first index, values) for contiguous batches
        self.singles: dict[int, Any] = {}
        self.failed: set[int] = set()  # the indices in ``singles`` that hold an error, not a value

    def keep(self, batch: Batch) -> None:
        if isinstance(batch.indices, range) and batch.values:
            self.spans.append((batch.indices.start, batch.values))
        else:
            self.singles.update(zip(batch.indices, batch.values))
        self.singles.update(batch.errors)
        self.failed.update(batch.errors)

    def completed(self, run: MapRun) -> dict[int, Any]:
        """``{index: result}`` of what finished, the run's late batches included."""
        completed: dict[int, Any] = {}
        for start, values in self.spans:
            completed.update(zip(range(start, start + len(values)), values))
        completed.update((i, v) for i, v in self.singles.items() if i not in self.failed)
        for late in run.late:
            completed.update(zip(late.indices, late.values))
        return completed

    def mark_unfinished(self, run: MapRun, total_timeout: float | None, length: int) -> list[TaskTimeout]:
        """A ``TaskTimeout`` in the place of every item below ``length`` that has no outcome (sent or
        not yet read from the input); returns them."""
        for late in run.late:
            self.keep(late)
        settled = bytearray(length)  # 1 where an outcome is kept: only the others get a TaskTimeout
        for start, values in self.spans:
            settled[start : start + len(values)] = b"\x01" * len(values)
        for index in self.singles:
            if index < length:
                settled[index] = 1
        unfinished: list[TaskTimeout] = []
        index = settled.find(0)
        while index >= 0:
            self.singles[index] = timeout = TaskTimeout(
                f"item {index} did not finish before the call's total_timeout of {total_timeout:g} s",
                index=index, limit=total_timeout)
            self.failed.add(index)
            unfinished.append(timeout)
            index = settled.find(0, index + 1)
        return unfinished

    def outcomes(self, run: MapRun) -> dict[int, Any]:
        """``{index: value or error}`` of every item with an outcome (errors="return")."""
        outcomes = self.completed(run)
        outcomes.update((i, v) for i, v in self.singles.items() if i in self.failed)
        return outcomes

    def as_list(self, length: int) -> list[Any]:
        results: list[Any] = [None] * length
        for start, values in self.spans:
            results[start : start + len(values)] = values
        for index, value in self.singles.items():
            results[index] = value
        return results


def gather(run: MapRun, *, ordered: bool, errors: str, total_timeout: float | None) -> list[Any]:
    """Drive ``run`` to the end and return its results: in input order, or as they finished.
    ``errors``: ``"raise"`` stops at the first failure, ``"return"`` puts it in its item's place."""
    __tracebackhide__ = True  # IPython shows the caller's line and the task's exception, not our plumbing
    try:
        return _gather(run, ordered=ordered, errors=errors, total_timeout=total_timeout)
    except BaseException as error:
        remember(error)
        raise


def _gather(run: MapRun, *, ordered: bool, errors: str, total_timeout: float | None) -> list[Any]:
    __tracebackhide__ = True
    kept = Kept()
    arrival: list[Any] = []
    length: int | None = None  # of the list returned: the items read, or every item when it timed out
    failed_input: BaseException | None = None
    failure: BaseException | None = None  # the first task error, with errors="raise"
    batches = run.batches()
    try:
        for batch in batches:
            if errors == "raise" and batch.errors:
                kept.keep(batch)
                failure = _stop(run, batch, kept)  # raised below, outside these handlers
                break
            kept.keep(batch)
            if not ordered:
                arrival.extend(batch.values)
                arrival.extend(batch.errors.values())
    except KeyboardInterrupt:
        run.cancel()
        raise Interrupted(interrupt_message(run), kept.completed(run)) from None
    except cf.TimeoutError:
        if errors == "raise":
            raise call_timeout(run, total_timeout, kept.completed(run)) from None
        # Every item of an input of known length gets its place, read or not; of an iterator, the
        # items read (the rest were never taken from it).
        length = max(run.next_index, run.total or 0)
        unfinished = kept.mark_unfinished(run, total_timeout, length)
        if not ordered:
            for late in run.late:  # arrived while the call was being cancelled: theirs too
                arrival.extend(late.values)
                arrival.extend(late.errors.values())
            arrival.extend(unfinished)
    except InputFailure as broken:  # raised outside this handler, so it reads as the input raised it
        failed_input = input_error(broken, kept.completed(run) if errors == "raise" else kept.outcomes(run))
    except NbParallelError as error:
        if not error.completed:
            error.completed = kept.completed(run)
        raise
    finally:
        batches.close()
    if failure is not None:
        raise failure
    if failed_input is not None:
        raise failed_input
    return arrival if not ordered else kept.as_list(run.next_index if length is None else length)


def stream(run: MapRun, *, ordered: bool, errors: str, deadline: float | None = None,
           raise_in_order: bool = False, total_timeout: float | None = None) -> Iterator[Any]:
    """Yield ``run``'s results while the work goes on: in input order, or as they finished.

    ``raise_in_order`` (concurrent.futures semantics): an item's error is raised when its place is
    reached, not when it arrives. ``deadline``: ``time.monotonic()`` past which waiting raises
    ``TimeoutError`` (with ``total_timeout``: our ``TaskTimeout``)."""
    __tracebackhide__ = True  # as in gather
    try:
        yield from _stream(run, ordered=ordered, errors=errors, deadline=deadline, raise_in_order=raise_in_order,
                           total_timeout=total_timeout)
    except BaseException as error:
        remember(error)
        raise


def _stream(run: MapRun, *, ordered: bool, errors: str, deadline: float | None = None,
            raise_in_order: bool = False, total_timeout: float | None = None) -> Iterator[Any]:
    __tracebackhide__ = True
    waiting: dict[int, Any] = {}  # ordered: finished but not yet yielded
    failed: dict[int, BaseException] = {}  # the errors among them
    run.backlog = waiting.__len__
    run.deadline = deadline
    next_index = 0
    failed_input: BaseException | None = None
    raised: BaseException | None = None  # a task's error to raise, outside the handlers below
    batches = run.batches()
    try:
        while True:
            try:
                batch = next(batches, None)
            except InputFailure as broken:
                failed_input = input_error(broken, dict(waiting))
                break
            if batch is None:
                break
            if batch.errors and errors == "raise" and not raise_in_order:
                run.cancel("failed")
                batches.close()
                raised = next(iter(batch.errors.values()))
                waiting.update(zip(batch.indices, batch.values))
                for late in run.late:
                    waiting.update(zip(late.indices, late.values))
                keep_completed(raised, dict(waiting))
                break
            if not ordered:
                yield from batch.values
                yield from batch.errors.values()
                continue
            waiting.update(zip(batch.indices, batch.values))
            failed.update(batch.errors)
            waiting.update(batch.errors)
            while next_index in waiting:
                value = waiting.pop(next_index)
                if raise_in_order and next_index in failed:
                    batches.close()
                    raised = value
                    break
                next_index += 1
                yield value
            if raised is not None:
                break
    except KeyboardInterrupt:
        batches.close()
        completed = dict(waiting)
        for late in run.late:
            completed.update(zip(late.indices, late.values))
        raise Interrupted(interrupt_message(run), completed) from None
    except cf.TimeoutError:
        if total_timeout is None:
            raise  # Executor.map's own timeout: concurrent.futures semantics
        completed = {i: v for i, v in waiting.items() if i not in failed}
        for late in run.late:
            completed.update(zip(late.indices, late.values))
        raise call_timeout(run, total_timeout, completed) from None
    finally:
        batches.close()
    if raised is not None:
        raise raised
    if failed_input is not None:
        raise failed_input


def input_error(failure: InputFailure, completed: dict[int, Any]) -> BaseException:
    """What the input raised, carrying ``completed`` (and a note saying so) like our own errors do;
    wrapped in an ``NbParallelError`` only if the exception refuses the attribute."""
    error = failure.error
    note = (f"nbparallel: the input raised this after {failure.read} items were read; err.completed holds "
            "the outcomes that had arrived")
    try:
        error.completed = completed  # type: ignore[attr-defined]
        if hasattr(error, "add_note"):
            error.add_note(note)
    except Exception:
        wrapped = NbParallelError(f"{note}; the input raised {type(error).__name__}")
        wrapped.completed = completed
        wrapped.__cause__ = error
        return wrapped
    return error


def imap_in_order(fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...], *, workers: int | None,
                  chunksize: int | str, timeout: float | None) -> Iterator[Any]:
    """concurrent.futures semantics (``Executor.map``): in order; an item's exception raised when
    it is reached; ``timeout`` counts from this call."""
    run = MapRun(fn, iterables, workers=workers, chunksize=chunksize, stop_on_error=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    return stream(run, ordered=True, errors="return", deadline=deadline, raise_in_order=True)


def deadline_after(total_timeout: float | None) -> float | None:
    """The ``time.monotonic()`` at which a call of ``total_timeout`` seconds must stop (checked)."""
    if total_timeout is None:
        return None
    if isinstance(total_timeout, bool) or not isinstance(total_timeout, (int, float)) or total_timeout <= 0:
        raise ValueError(f"total_timeout must be a positive number of seconds, got {total_timeout!r}")
    return time.monotonic() + total_timeout


def call_timeout(run: MapRun, total_timeout: float | None, completed: dict[int, Any]) -> TaskTimeout:
    """The error of a call that ran past ``total_timeout``, carrying what had finished."""
    error = TaskTimeout(
        f"the call ran past its total_timeout of {total_timeout:g} s with {run.done} items finished; it was "
        "cancelled (nbparallel.last_results() returns the finished results). Raise total_timeout, or pass "
        'errors="return" to get the finished results in place.', limit=total_timeout)
    error.completed = completed
    return error


def interrupt_message(run: MapRun) -> str:
    total = run.next_index if run.exhausted else run.total
    return (f"nbparallel: cancelled after {run.done} of {total if total is not None else 'an unknown number of'} "
            "items finished; nbparallel.last_results() returns the finished results ({index: result})")


def _stop(run: MapRun, batch: Batch, kept: Kept) -> BaseException:
    run.cancel("failed")
    error = min(batch.errors.items())[1]
    keep_completed(error, kept.completed(run))
    return error
