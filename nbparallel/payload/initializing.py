"""An initializer run once in each worker before the tasks that asked for it.

``Executor(initializer=..., initargs=...)`` and joblib's ``initializer``/``initargs`` wrap each task's
function in an ``Initialized``: the first of its tasks a worker runs calls the initializer there
first, as a ProcessPoolExecutor's worker process does when it starts. Workers are shared by every
call, so each initializer is known by a key: an Executor's own (each executor's tasks see their own
initializer run, as each ProcessPoolExecutor has its own processes), or, for joblib, the initializer
and its arguments (a later call with the same ones reuses the workers it ran in, as loky does).
A replaced worker (``max_tasks_per_child``, a crash) runs it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from . import pickling as ser
from .aiocall import is_async

#: The keys whose initializer has run in this process.
_initialized: set[str] = set()


class InitializerError(Exception):
    """The initializer raised in a worker (the exception is its ``__cause__`` there). The kernel
    turns it into ``crashes.InitializerFailed``, and the executor that asked for it is broken."""


class Initialized:
    """Calls ``initializer(*initargs)`` once per worker and ``key``, then ``fn`` with the task's
    arguments."""

    def __init__(self, fn: Callable[..., Any], key: str, initializer: Callable[..., Any],
                 initargs: tuple[Any, ...]) -> None:
        self.fn = fn
        self.key = key
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.nbparallel_async = is_async(fn)  # a coroutine function stays one (aiocall.is_async)
        self.__qualname__ = getattr(fn, "__qualname__", type(fn).__qualname__)  # how displays name the call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # our plumbing: remote tracebacks start at the user's function
        if self.key not in _initialized:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:  # SystemExit in an initializer breaks the executor too
                name = getattr(self.initializer, "__qualname__", type(self.initializer).__qualname__)
                raise InitializerError(f"the initializer {name} raised {type(exc).__name__}: {exc}") from exc
            _initialized.add(self.key)
        return self.fn(*args, **kwargs)


def key_of(initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> str:
    """A key for an initializer and its arguments: the same pair, the same key (joblib)."""
    try:
        data = ser.dumps((initializer, tuple(initargs)))
    except Exception:  # cannot be pickled: the call fails later, naming it; any key will do
        data = repr((id(initializer), id(initargs))).encode()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class Chunked:
    """One task of ``Executor.map(chunksize=n)``: ``fn`` applied to each argument tuple of a chunk,
    the results in order (as ProcessPoolExecutor's chunks)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__qualname__ = getattr(fn, "__qualname__", type(fn).__qualname__)  # how displays name the call

    def __call__(self, chunk: list[tuple[Any, ...]]) -> list[Any]:
        __tracebackhide__ = True  # our plumbing: remote tracebacks start at the user's function
        return [self.fn(*args) for args in chunk]
