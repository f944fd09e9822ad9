"""``submit`` and ``Executor``: one task per Future, on the shared sidecar.

A Future here is a real ``concurrent.futures.Future`` (a ``TaskFuture``, kernel/tasks.py) and keeps
its contract: PENDING, RUNNING while a worker runs it, FINISHED; ``cancel()`` cancels only a task
that has not started. ``TaskFuture.stop()`` stops a running one too (its worker is killed and
replaced). ``Executor`` is a drop-in for ``ProcessPoolExecutor``; the README says where it differs.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .crashes import InitializerFailed
from .errors import SerializationError
from .kernel.tasks import Task, TaskFuture, await_at_exit, call_label, catch_up_with_runner, new_group
from .payload.initializing import Chunked, Initialized
from .progress.tracking import track_future

__all__ = ["submit", "Executor", "TaskFuture"]

#: concurrent.futures' logger: a failed initializer is reported there, as its executors do.
LOGGER = logging.getLogger("concurrent.futures")


def _describe_call(fn: Callable[..., Any]) -> str:
    return f"submit({getattr(fn, '__qualname__', type(fn).__name__)})"


def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future`` (a
    ``TaskFuture``: ``stop()`` stops it even while it runs). Raises ``SerializationError`` at once
    if the function or an argument cannot be sent."""
    future = Task(fn, args, kwargs, 0, None).future
    track_future(future, _describe_call(fn))
    return future


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` on the shared pool, a drop-in for ``ProcessPoolExecutor``.

    ``max_workers`` caps how many of its tasks run at once (None: every worker of the pool; a pool
    smaller than that grows to it while the executor has work). ``initializer(*initargs)`` runs in
    a worker before the first of this executor's tasks it runs; if it raises, the executor is
    broken: its pending tasks and every later ``submit`` fail with ``InitializerFailed`` (a
    ``BrokenProcessPool``), and concurrent.futures' logger says why. ``max_tasks_per_child``: a
    worker is replaced after running that many of this executor's tasks. ``mp_context`` is accepted
    and ignored: workers are always fresh interpreters started by the sidecar (like "spawn"), never
    forks of this process.

    ``submit`` returns a ``TaskFuture``; one whose function or arguments cannot be pickled fails
    with ``SerializationError`` (a ``PicklingError``) rather than raising. ``map`` submits every
    item at once (``buffersize``: only that many ahead, reading the input lazily). The interpreter
    waits for pending tasks before it exits.
    """

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 max_tasks_per_child: int | None = None) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int or None, got {max_workers!r}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._group = new_group()
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._initializer_key = uuid.uuid4().hex  # this executor's own: its workers run it anew
        self._max_tasks_per_child = max_tasks_per_child
        # Its tasks not finished yet (each is held by the runner until then; a result is the
        # caller's alone once it has it, as concurrent.futures' tests check).
        self._tasks: weakref.WeakSet[Task] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._shutdown = False
        #: Why the executor cannot take more work (a failed initializer), as ProcessPoolExecutor's.
        self._broken: str | bool = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        with self._lock:
            if self._broken:
                raise InitializerFailed(str(self._broken))
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            task_fn = fn
            if self._initializer is not None:
                task_fn = Initialized(fn, self._initializer_key, self._initializer, self._initargs)
            try:
                task = Task(task_fn, args, kwargs, self._max_workers or 0, self._group,
                            label=call_label(fn, args, kwargs), max_tasks=self._max_tasks_per_child,
                            on_error=self._task_failed)
            except SerializationError as error:  # as ProcessPoolExecutor: the future fails, a PicklingError
                failed: cf.Future[Any] = TaskFuture()
                failed.set_exception(error)
                return failed
            future: cf.Future[Any] = task.future
            self._tasks.add(task)
        await_at_exit(future)
        track_future(future, _describe_call(fn))
        return future

    def _task_failed(self, error: BaseException) -> None:
        # On the results thread, as the future fails (kernel/tasks.py): no user code, no waiting.
        if isinstance(error, InitializerFailed):
            self._break(error)

    def _break(self, error: InitializerFailed) -> None:
        """The initializer failed: say so, fail what is pending, take no more (ProcessPoolExecutor's
        behaviour, but the shared pool itself stays whole)."""
        with self._lock:
            if self._broken:
                return
            LOGGER.critical("Exception in initializer:\n%s", error.remote_traceback or error)
            self._broken = f"{error.reason or error}; this Executor is not usable anymore (make a new one)"
            pending = [task for task in list(self._tasks) if not task.future.done()]
        for task in pending:
            task.fail(InitializerFailed(str(self._broken)))

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        """As ``concurrent.futures.Executor.map``: every item is submitted now (``buffersize``:
        only that many ahead of the results taken, the input read lazily, as in Python 3.14); the
        results come in order, each dropped once yielded; an item's exception is raised when its
        place is reached; ``timeout`` counts from this call. ``chunksize`` items travel as one task."""
        if buffersize is not None and (isinstance(buffersize, bool) or not isinstance(buffersize, int)):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return _map(self, fn, zip(*iterables), timeout, buffersize)
        chunks = ((chunk,) for chunk in _chunks(zip(*iterables), chunksize))
        return _flatten(_map(self, Chunked(fn), chunks, timeout, buffersize))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; ``cancel_futures``: cancel the tasks not yet running; ``wait``: wait
        for the others."""
        with self._lock:
            self._shutdown = True
            pending = [task.future for task in list(self._tasks) if not task.future.done()]
        if cancel_futures:
            catch_up_with_runner()  # the tasks a worker was given are running: those are not cancelled
            for future in pending:
                future.cancel()  # only those not running yet
        if wait:
            cf.wait(pending)


def _map(executor: Executor, fn: Callable[..., Any], arguments: Iterator[tuple[Any, ...]],
         timeout: float | None, buffersize: int | None) -> Iterator[Any]:
    """concurrent.futures' ``Executor.map`` (Python 3.14's, with ``buffersize``)."""
    end_time = None if timeout is None else timeout + time.monotonic()
    if buffersize:
        futures = deque(executor.submit(fn, *args) for args in itertools.islice(arguments, buffersize))
    else:
        futures = deque(executor.submit(fn, *args) for args in arguments)
    owner = weakref.ref(executor)  # the iterator does not keep the executor alive

    def results() -> Iterator[Any]:  # a closure: everything above ran before the first next()
        __tracebackhide__ = True  # as in _result_or_cancel
        try:
            futures.reverse()  # pop() then takes them in input order
            while futures:
                if buffersize and (submitter := owner()) is not None and (args := next(arguments, None)) is not None:
                    futures.appendleft(submitter.submit(fn, *args))
                if end_time is None:
                    yield _result_or_cancel(futures.pop())
                else:
                    yield _result_or_cancel(futures.pop(), end_time - time.monotonic())
        finally:
            for future in futures:
                future.cancel()

    return results()


def _result_or_cancel(future: cf.Future[Any], timeout: float | None = None) -> Any:
    __tracebackhide__ = True  # IPython shows the caller's line and the task's exception, not our plumbing
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future  # the caller holds the result only


def _chunks(arguments: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    while chunk := list(itertools.islice(arguments, size)):
        yield chunk


def _flatten(lists: Iterator[list[Any]]) -> Iterator[Any]:
    for values in lists:
        values.reverse()
        while values:
            yield values.pop()  # dropped once yielded
