"""One job in the runner, as the kernel sees it: open it, send its chunks, read its outcomes.

The one engine under every kind of call: map and imap (mapping.py) send many chunks; submit,
``Executor.submit`` and the joblib backend (tasks.py) send one item. Either way the function is
pickled before anything starts (fail fast, name the culprit), the job frame says how to call it,
and each ``result`` or ``crashed`` frame becomes values and errors by item index: a task's own
exception as itself, unpickled here, its remote traceback (written out with the notebook's cells)
chained and its item named (``errors.attach``; a ``TaskError`` when it cannot be rebuilt here), the
machinery's failures and crashed workers as the right ``NbParallelError``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..crashes import InitializerFailed, MemoryLimitExceeded, ResultUnreadable, WorkerCrashed
from ..errors import (NbParallelError, RemoteTraceback, SidecarDied, TaskError, TaskTimeout, Unreadable, attach,
                      which_item)
from ..payload.aiocall import is_async
from ..payload import pickling as ser
from ..payload import salvage, tracebacks
from ..payload.initializing import InitializerError
from ..payload.retrying import ATTEMPTS_ATTR
from ..wire import messages as msg
from ..wire.frames import Buffer, Frame
from .jobspec import Limits, caller_context, function_key
from .runner import Client, JobHandle

#: How errors name the item at an index (``ser.describe`` of it, or a submitted call's label).
Describe = Callable[[int], str]


@dataclass
class Batch:
    """Outcomes of some items: ``values[k]`` belongs to ``indices[k]``; ``errors`` are the failures:
    the tasks' own exceptions and nbparallel's errors. ``pickled``: the worker's pickle of
    ``(offsets, values, problems)`` as it came, when it holds every value and no problem (and no
    buffer out of band), so that a journal (sweep.py) need not pickle the values again."""

    indices: range | list[int]
    values: list[Any]
    errors: dict[int, BaseException]
    pickled: Buffer | None = None


class Job:
    """A call's job in the runner: its pickled function, its id, and what its frames mean.

    ``call`` is how a worker calls the function on an item: ``"one"`` (``fn(item)``), ``"star"``
    (``fn(*item)``) or ``"kwargs"`` (submit's ``(args, kwargs)``). ``numbered``: errors carry the
    item's index (map) or not (a submitted call, named by its label alone).
    """

    def __init__(self, fn: Callable[..., Any], *, call: msg.CallMode, numbered: bool = True) -> None:
        self.function = ser.dumps_function(fn)  # before anything runs: fail fast, name the culprit
        self.sources = tracebacks.SourceIndex(fn)  # writes remote tracebacks out with the cells' lines
        self.call = call
        self.numbered = numbered
        self.asynchronous = is_async(fn)  # runs on a worker's event loop (worker/aio.py)
        self.client: Client
        self.id = 0

    def connect(self, client: Client) -> None:
        """Take a job id of ``client``'s (the runner this job will run in)."""
        self.client = client
        self.id = client.new_job_id()

    def discard(self) -> None:
        """Release the pickled function of a job that will never be opened."""
        self.function.close()

    # -- sending --------------------------------------------------------------------------------

    def route(self, handle: JobHandle) -> None:
        """Have the client's reader thread hand ``handle`` every frame about this job."""
        self.client.register(self.id, handle)

    def open(self, *, limit: int, group: int | None = None, stop_on_error: bool = False,
             limits: Limits | None = None, concurrency: int | None = None, rate: float | None = None,
             report_started: bool = False, max_tasks: int | None = None) -> None:
        """Send the job (the function travels with it). ``limit`` caps how many workers run it at
        once (0: no cap), shared by the jobs of ``group``. ``concurrency``: the items each worker
        keeps in flight (a coroutine function's job; 1 if it is one and none is given); ``rate``:
        item starts per second across the job. ``report_started``: the runner says ``started``
        when a chunk starts running; ``max_tasks``: a worker is replaced after running that many
        items of the group."""
        limits = limits or Limits()
        context = caller_context()
        header = msg.job(job=self.id, key=function_key(self.function), call=self.call, limit=limit,
                         cwd=context["cwd"], path=context["path"], stop_on_error=stop_on_error,
                         timeout=limits.timeout, retries=limits.retries, memory_limit=limits.memory_limit)
        if group is not None:
            header["group"] = group
        if concurrency or self.asynchronous:
            header["concurrency"] = concurrency or 1
        if rate:
            header["rate"] = rate
        if report_started:
            header["report_started"] = True
        if max_tasks:
            header["max_tasks"] = max_tasks
        self.client.send_packed(header, self.function)

    def send_chunk(self, start: int, count: int, payload: Any) -> int:
        """Send items ``start..start+count-1`` (``payload``: their ``ser.pack``-ed list); the chunk's id."""
        chunk = self.client.new_chunk_id()
        self.client.send_packed(msg.chunk(job=self.id, chunk=chunk, start=start, count=count), payload)
        return chunk

    def cancel(self) -> bool:
        """Ask the runner to drop the job's queued chunks and kill its running workers; False if
        it is gone (nothing to cancel, and no ``cancelled`` will come)."""
        if self.client.dead is not None:
            return False
        try:
            self.client.send(msg.cancel(job=self.id))
        except SidecarDied:
            return False
        return True

    def end(self, *, send: bool = True) -> None:
        """Stop routing the job's frames; ``send``: tell the runner to forget the job."""
        self.client.unregister(self.id)
        if send and self.client.dead is None:
            try:
                self.client.send(msg.end(job=self.id))
            except SidecarDied:
                pass

    # -- reading --------------------------------------------------------------------------------

    def outcomes(self, frame: Frame, start: int, describe: Describe) -> Batch:
        """The values and errors a ``result`` frame carries for the chunk that starts at ``start``.
        Raises what unpickling the values raised (e.g. a result of a class the kernel cannot import,
        or one whose ``__reduce__`` calls ``sys.exit``); an exception that cannot be rebuilt fails
        its own item only. On the main thread, call it under ``HeldInterrupts``: then a
        KeyboardInterrupt raised in here comes from the code being unpickled, not from Ctrl-C."""
        offsets, values, problems = salvage.unpack_outcomes(frame)  # a value that cannot load fails alone
        indices: range | list[int]
        if isinstance(offsets, range):
            indices = range(start + offsets.start, start + offsets.stop)
        else:
            indices = [start + o for o in offsets]
        errors: dict[int, BaseException] = {}
        for offset, (status, value) in problems.items():
            index = start + offset
            errors[index] = self.problem(status, value, index if self.numbered else None, describe(index))
        whole = not problems and not frame.get("oob")  # one self-contained stream, every value in it
        return Batch(indices, values, errors, frame.payload if whole else None)

    def problem(self, status: int, value: Any, index: int | None, item: str) -> BaseException:
        """The error for one item's problem (``status`` ``RAISED`` or ``FAILED``)."""
        if status == ser.RAISED:
            return self.raised(value, index, item)
        if isinstance(value, TaskTimeout):  # a coroutine cancelled past its timeout (payload/retrying.py)
            return cancelled_timeout(value, index, item)
        error: NbParallelError = value  # the machinery's own error, e.g. a result that could not be pickled
        if isinstance(value, Unreadable) and not isinstance(value, ResultUnreadable):  # ProcessPoolExecutor's type
            error = ResultUnreadable(*value.args, index=value.index, item=value.item)
        if self.numbered:
            error.index, error.item = index, item
        return error

    def raised(self, raised: ser.Raised, index: int | None, item: str) -> BaseException:
        """The exception a task raised, rebuilt here, its remote traceback chained and its item
        named (``errors.attach``); a ``TaskError`` if it cannot be rebuilt here."""
        text = self.sources.render(raised.trace)
        error, why = ser.rebuild_exception(raised)
        if error is None:
            failure = TaskError(raised.type_name, raised.message, text, why=why, index=index, item=item)
            return failure
        if isinstance(error, InitializerError):  # the machinery's: the executor that asked for it is broken
            broken = InitializerFailed(f"{which_item(index, item)} could not run: {error}", index=index, item=item)
            broken.remote_traceback = text
            broken.reason = str(error)
            return broken
        remote = RemoteTraceback(text, index=index, item=item)
        state = getattr(error, "__dict__", None)
        if isinstance(state, dict) and ATTEMPTS_ATTR in state:  # left by retry_on's retries (retrying.py)
            remote.attempts = int(state.pop(ATTEMPTS_ATTR) or 1)
        return attach(error, remote)

    def crashed(self, frame: Frame, describe: Describe) -> dict[int, BaseException]:
        """The errors for the items a ``crashed`` frame names, by the reason their worker died."""
        crash = msg.view(frame, msg.Crashed)
        return {index: crash_error(crash, index if self.numbered else None, describe(index))
                for index in crash["indices"]}

    def unreadable(self, exc: BaseException, index: int, describe: Describe) -> ResultUnreadable:
        """The error for an item whose result came back but could not be unpickled here."""
        why = f"{type(exc).__name__}: {exc}"
        if not self.numbered:
            return ResultUnreadable(f"the result of {describe(index)} could not be unpickled here: {why}")
        return ResultUnreadable(f"the results for item {index} could not be unpickled here: {why}. Is everything "
                                "the function returns importable in the kernel?", index=index, item=describe(index))


def cancelled_timeout(timeout: TaskTimeout, index: int | None, item: str) -> TaskTimeout:
    """The error for an item whose coroutine ran past ``timeout=`` and was cancelled in its worker."""
    limit, attempts = timeout.limit or 0.0, timeout.attempts
    tries = f" (tried {attempts} times)" if attempts > 1 else ""
    return TaskTimeout(f"{which_item(index, item)} ran past its time limit of {limit:g} s{tries}; its coroutine was "
                       "cancelled (the worker goes on). Raise timeout= if it needs longer.",
                       index=index, item=item, limit=limit, attempts=attempts)


def crash_error(crash: msg.Crashed, index: int | None, item: str) -> NbParallelError:
    """The error for an item whose worker died (a ``crashed`` frame), by the reason it died."""
    reason, attempts, pid = crash.get("reason"), crash.get("attempts", 1), crash.get("pid")
    if reason == "timeout":
        return TaskTimeout(index=index, item=item, limit=crash["limit"], attempts=attempts)
    if reason == "memory":
        return MemoryLimitExceeded(index=index, item=item, pid=pid, limit=int(crash["limit"]),
                                   memory=int(crash["memory"] or 0), attempts=attempts)
    return WorkerCrashed(index=index, item=item, pid=pid, exitcode=crash.get("exitcode"),
                         memory=crash.get("memory"), attempts=attempts, cause=crash.get("cause"),
                         worker=crash.get("worker"))


class HeldInterrupts:
    """Holds Ctrl-C back while a result is unpickled on the main thread (no other thread gets
    signals), so that a KeyboardInterrupt raised meanwhile is known to come from the code being
    unpickled, which fails its items, never cancels the call. ``release()`` then delivers a Ctrl-C
    that came in the meantime (usually: raises KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.caught = False
        self.previous: Any = None

    def __enter__(self) -> HeldInterrupts:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):  # not ignored, and set from Python: ours to replace for a moment
                self.previous = previous
                signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self.caught = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def release(self) -> None:
        if self.caught:
            self.caught = False
            self.previous(signal.SIGINT, None)
