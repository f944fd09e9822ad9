"""Coroutine functions: telling them apart, and running their items on an event loop.

What the kernel (is this call async?), a worker's event loop (worker/aio.py) and a Dask task
(cluster/task.py) share. asyncio is imported on first use only: a worker that never runs a
coroutine does not pay for it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import TaskTimeout
from . import pickling as ser
from .calls import call_item

if TYPE_CHECKING:
    from .outcomes import Batch

#: The index of the item whose coroutine is running (each item's task has its own context), so what
#: it prints is tagged with it although many items are in flight in one thread.
CURRENT_INDEX: contextvars.ContextVar[int | None] = contextvars.ContextVar("nbparallel_item", default=None)


def is_async(fn: Any) -> bool:
    """Whether calling ``fn`` gives an awaitable: an ``async def`` function or method (also through
    ``functools.partial``), an object whose ``__call__`` is one, or an object that says so with
    ``nbparallel_async = True`` (a %%parallel cell with top-level ``await``). A plain function that
    happens to return awaitables (a lambda calling an async function) cannot be told apart before it
    runs: pass ``concurrency=`` for it."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if getattr(fn, "nbparallel_async", False) is True:
        return True
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn) or isinstance(fn, type):
        return False
    return inspect.iscoroutinefunction(getattr(type(fn), "__call__", None))


async def outcome(fn: Callable[..., Any], mode: str, item: Any) -> tuple[int, Any]:
    """Run one item to its outcome: ``(ser.OK, value)``, ``(ser.RAISED, encoded exception)``, or
    ``(ser.FAILED, error)`` for a ``TaskTimeout`` (payload/retrying.py's ``Attempts`` raises it
    when an attempt ran past ``timeout=``: the machinery's verdict, not the function's)."""
    __tracebackhide__ = True
    try:
        value = call_item(fn, mode, item)
        if inspect.isawaitable(value):
            value = await value
    except TaskTimeout as exc:
        return ser.FAILED, exc
    except BaseException as exc:  # the item's outcome, KeyboardInterrupt and CancelledError included
        import asyncio  # loaded already: we are inside a running loop

        if isinstance(exc, asyncio.CancelledError) and _cancelling():
            raise  # the loop is stopping this task (not the function cancelling itself): let it
        return ser.RAISED, ser.encode_exception(exc)
    return ser.OK, value


def _cancelling() -> bool:
    import asyncio  # loaded already: we are inside a running loop

    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


def resolve(batch: Batch, loop: Any, concurrency: int) -> None:
    """Await, on ``loop``, the awaitables among ``batch``'s values (a plain function that returned
    coroutines), at most ``concurrency`` at once; each becomes its value or its problem."""
    import asyncio  # only for functions that returned awaitables

    pending = [(k, v) for k, v in enumerate(batch.values) if inspect.isawaitable(v)]
    if not pending:
        return

    async def settle() -> list[tuple[int, Any]]:
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(offset: int, awaitable: Any) -> tuple[int, Any]:
            async with gate:
                token = CURRENT_INDEX.set(batch.start + offset)
                try:
                    return await outcome(lambda _: awaitable, "one", None)
                finally:
                    CURRENT_INDEX.reset(token)

        return await asyncio.gather(*(one(batch.offsets[k], v) for k, v in pending))

    settled = loop.run_until_complete(settle())
    failed: set[int] = set()
    for (k, _), (status, value) in zip(pending, settled):
        if status == ser.OK:
            batch.values[k] = value
        else:
            batch.add_problem(batch.offsets[k], status, value)
            failed.add(k)
    if failed:
        kept = [(o, v) for k, (o, v) in enumerate(zip(batch.offsets, batch.values)) if k not in failed]
        batch.offsets = [o for o, _ in kept]
        batch.values = [v for _, v in kept]
