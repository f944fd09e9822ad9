"""A plain chunk's items, run: one at a time, each marked in the slot (``run_careful``), or in runs
of ``SUB_BATCH`` through a generator, the slot marking the run (``run_fast``); outcomes collected in
a ``ChunkRun`` and streamed while the chunk runs long. (An async job's chunks are aio.py's.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..errors import NbParallelError, SerializationError
from ..payload import pickling as ser
from ..payload.outcomes import Batch
from ..wire import messages as msg
from ..wire import worker_messages as wmsg
from ..wire.slot import OFFSET, STARTED, Slot
from .sending import Connection, WorkerState

FLUSH_INTERVAL = 0.25  # seconds: a long chunk streams the results it has at this pace
SUB_BATCH = 64  # items run through map() between two marks in the slot


class Runner(Protocol):
    """What this module needs of loop.py's Worker."""

    conn: Connection
    slot: Slot
    state: WorkerState

    def send_result(self, chunk: wmsg.WorkerChunk, batch: Batch, upto: int, began: float, *, final: bool) -> None: ...


def unpickle_failure(stage: str, exc: BaseException) -> SerializationError:
    """Every item's outcome when the chunk's ``stage`` (the function, the items) cannot be rebuilt here."""
    return SerializationError(
        f"the worker could not unpickle the {stage}: {type(exc).__name__}: {exc}. "
        "Is the module that defines it importable in the worker (same sys.path, same cwd)?"
    )


class ChunkRun:
    """The outcomes of one chunk so far, sent in pieces when the chunk runs long."""

    def __init__(self, worker: Runner, chunk: wmsg.WorkerChunk, batch: Batch, began: float) -> None:
        self.worker, self.chunk, self.batch, self.began = worker, chunk, batch, began
        self.start = chunk["start"]
        self.last_flush = began

    def flush_if_due(self, next_offset: int) -> None:
        now = time.perf_counter()
        if now - self.last_flush > FLUSH_INTERVAL and next_offset < self.chunk["count"]:
            self.worker.send_result(self.chunk, self.batch, next_offset, self.began, final=False)
            self.batch = Batch(self.start)
            self.last_flush = now


def run_careful(run: ChunkRun, fn: Callable[..., Any], items: list[Any], call: msg.CallMode, resume: int,
                skip: set[int], stop_on_error: bool, timed: bool) -> int:
    """One item at a time, each marked in the slot (and timed, for the sidecar's timeout)."""
    # Item assignment through the slot's typed views is the cheapest write (this runs once per
    # item; Slot.write costs twice as much): the start time first, as Slot.write orders them.
    worker = run.worker
    ints, times, state, monotonic = worker.slot.ints, worker.slot.times, worker.state, time.monotonic
    conn = worker.conn
    count = len(items)
    for offset in range(resume, count):
        if offset in skip:
            continue
        if conn.forked:  # a task forked and its child returned here: the items are the worker's
            os._exit(0)
        if timed:
            times[STARTED] = monotonic()
        ints[OFFSET] = offset
        state.index = run.start + offset
        try:
            item = items[offset]
            if call == "one":
                value = fn(item)
            elif call == "star":
                value = fn(*item)
            else:  # "kwargs": submit's (args, kwargs)
                value = fn(*item[0], **item[1])
        except BaseException as exc:  # SystemExit and KeyboardInterrupt in a task are its outcome too
            run.batch.add_problem(offset, ser.RAISED, ser.encode_exception(exc))
            if stop_on_error:
                return offset + 1
        else:
            run.batch.offsets.append(offset)
            run.batch.values.append(value)
        run.flush_if_due(offset + 1)
    return count


def run_fast(run: ChunkRun, fn: Callable[..., Any], items: list[Any], star: bool, resume: int,
             stop_on_error: bool) -> int:
    """Runs of SUB_BATCH items through ``_calls`` (a generator: map() would take a StopIteration the
    task raises for the end of the run), the slot marking the run. If the worker dies, the
    sidecar cannot tell which item of the run killed it, and runs the rest of the chunk again
    carefully: the culprit is then named exactly (items before it in its run may run twice)."""
    apply = _star_calls if star else _calls
    worker = run.worker
    count, state = len(items), worker.state
    for first in range(resume, count, SUB_BATCH):
        if worker.conn.forked:  # a task forked and its child returned here: the items are the worker's
            os._exit(0)
        last = min(first + SUB_BATCH, count)
        worker.slot.write(offset=first, width=last - first)
        pending = iter(items[first:last])
        at = first  # the offset of the next item ``pending`` yields
        while at < last:
            values = run.batch.values
            mark = len(values)
            state.follow(run.start + at, pending, last - at)
            try:
                values.extend(apply(fn, pending))  # stops at an exception, keeping what it had
            except BaseException as exc:
                done = len(values) - mark
                run.batch.offsets.extend(range(at, at + done))
                run.batch.add_problem(at + done, ser.RAISED, ser.encode_exception(_raised(exc)))
                at += done + 1
                if stop_on_error:
                    return at
            else:
                done = len(values) - mark
                run.batch.offsets.extend(range(at, at + done))
                if at + done < last:  # cannot happen with _calls; never let results shift
                    error = NbParallelError("the worker lost track of this item's outcome")
                    run.batch.add_problem(at + done, ser.FAILED, error)
                    done += 1
                at += done
        run.flush_if_due(last)
    return count


def _calls(fn: Callable[..., Any], items: Iterator[Any]) -> Iterator[Any]:
    """``map(fn, items)`` as a generator: a StopIteration that ``fn`` raises then leaves as a
    RuntimeError (PEP 479) instead of ending the run, which ``map()`` would take for the end of its
    input, shifting every later result to the wrong index. ``_raised`` unwraps it."""
    for item in items:
        yield fn(item)


def _star_calls(fn: Callable[..., Any], items: Iterator[Any]) -> Iterator[Any]:
    """``itertools.starmap(fn, items)`` as a generator, for the same reason as ``_calls``."""
    for item in items:
        yield fn(*item)


_CALLS_CODES = (_calls.__code__, _star_calls.__code__)


def _raised(exc: BaseException) -> BaseException:
    """What the task raised: the StopIteration itself where ``_calls`` turned it into a RuntimeError.
    Told apart from a task's own RuntimeError by the tracebacks: the StopIteration left through
    ``_calls``'s frame, and the RuntimeError was made outside it (a task's own was raised inside)."""
    cause = exc.__cause__
    if type(exc) is RuntimeError and isinstance(cause, StopIteration) and cause.__traceback__ is not None:
        if cause.__traceback__.tb_frame.f_code in _CALLS_CODES:
            tb = exc.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code in _CALLS_CODES:
                    return exc  # raised inside a task, which ran in _calls
                tb = tb.tb_next
            return cause
    return exc
