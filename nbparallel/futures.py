"""``submit`` and ``Executor``: one task per Future, on the shared sidecar.

A Future here is a real ``concurrent.futures.Future`` (a ``TaskFuture``, kernel/tasks.py). Unlike the
standard library's, cancelling one that is already running stops it: the sidecar kills the worker
running it and starts another.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import config
from .kernel.collect import imap_in_order
from .kernel.tasks import Task, TaskFuture, new_group
from .progress.tracking import track_future

__all__ = ["submit", "Executor", "TaskFuture"]


def _describe_call(fn: Callable[..., Any]) -> str:
    return f"submit({getattr(fn, '__qualname__', type(fn).__name__)})"


def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``."""
    future = Task(fn, args, kwargs, 0, None).future
    track_future(future, _describe_call(fn))
    return future


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` on the shared sidecar.

    ``max_workers`` caps how many of its tasks run at once (None: every worker of the pool).
    ``map`` streams lazily and chunks like ``nbparallel.imap``.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self._limit = config.resolve_workers(max_workers) if max_workers is not None else 0
        self._group = new_group()
        self._futures: set[cf.Future[Any]] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = Task(fn, args, kwargs, self._limit, self._group).future
            self._futures.add(future)
        track_future(future, _describe_call(fn))
        future.add_done_callback(self._forget)  # outside the lock: it runs at once if already done
        return future

    def _forget(self, future: cf.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | str = "auto",
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: results in order; an exception is raised when
        its item is reached; ``timeout`` counts from this call."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return imap_in_order(fn, iterables, workers=self._limit or None, chunksize=chunksize, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            cf.wait(pending)
