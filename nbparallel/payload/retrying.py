"""Retrying a task in its worker when it raises one of the exception types the caller named; for a
coroutine function also when an attempt runs past its time limit, with backoff between attempts."""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable
from typing import Any

from ..errors import TaskTimeout

ATTEMPTS_ATTR = "_nbparallel_attempts"  # set on the exception that ends the last attempt
BACKOFF_MAX = 60.0  # seconds: exponential backoff stops growing here
RETRY_AFTER_MAX = 3600.0  # seconds: a longer Retry-After is taken as this


def retry_after(exc: BaseException) -> float | None:
    """The delay ``exc`` asks for before the next attempt, or None: its ``retry_after`` attribute
    (seconds), else a ``Retry-After`` header (seconds or an HTTP date) in its ``headers`` or its
    ``response.headers`` (what aiohttp's and httpx's errors carry)."""
    value = getattr(exc, "retry_after", None)
    if value is None:
        headers = getattr(exc, "headers", None)
        if headers is None:
            headers = getattr(getattr(exc, "response", None), "headers", None)
        try:
            value = headers.get("Retry-After") if headers is not None else None
        except Exception:  # an odd headers object: no delay asked for
            value = None
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        # heavy (email, datetime: ~5 ms at a cold start), and only for a Retry-After given as a date
        import datetime
        import email.utils  # heavy, as above

        try:  # an HTTP date: "Wed, 21 Oct 2015 07:28:00 GMT"
            when = email.utils.parsedate_to_datetime(str(value))
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX)


def backoff_delay(attempt: int, base: float, exc: BaseException | None) -> float:
    """Seconds to wait after attempt number ``attempt`` failed with ``exc``: the delay ``exc`` asks
    for (``retry_after``), else ``base * 2 ** (attempt - 1)`` (at most ``BACKOFF_MAX``) times a random
    factor between 0.5 and 1, so the retries of many items that failed together spread out."""
    asked = retry_after(exc) if exc is not None else None
    if asked is not None:
        return asked
    if base <= 0:
        return 0.0
    return float(min(BACKOFF_MAX, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))


class RetryOn:
    """Calls ``fn`` up to ``1 + retries`` times while it raises one of ``exceptions``, waiting
    ``backoff_delay`` between attempts (no wait with ``backoff=0`` unless the exception asks).

    Only errors the caller named are retried: an ordinary bug should fail at once. Crashes and
    timeouts are retried by the sidecar instead, on a fresh worker.
    """

    def __init__(self, fn: Callable[..., Any], retries: int, exceptions: tuple[type[BaseException], ...],
                 backoff: float = 0.0):
        self.fn = fn
        self.retries = retries
        self.exceptions = exceptions
        self.backoff = backoff

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        attempt = 1
        while True:
            try:
                return self.fn(*args, **kwargs)
            except self.exceptions as exc:
                if attempt > self.retries:
                    setattr(exc, ATTEMPTS_ATTR, attempt)
                    raise
                delay = backoff_delay(attempt, self.backoff, exc)
                if delay:
                    time.sleep(delay)
                attempt += 1


class Attempts:
    """Runs one item of a coroutine function (or of a function returning awaitables): each attempt
    limited to ``timeout`` seconds (past it its coroutine is cancelled, not the worker), retried up
    to ``retries`` more times when it ran out of time or raised one of ``retry_on``, with
    ``backoff_delay`` between attempts. The last failure records the attempts: a ``TaskTimeout``'s
    ``attempts``, or the exception's, which the kernel copies to its ``TaskError``."""

    nbparallel_async = True  # for aiocall.is_async: calling it gives a coroutine

    def __init__(self, fn: Callable[..., Any], *, timeout: float | None, retries: int,
                 retry_on: tuple[type[BaseException], ...], backoff: float) -> None:
        self.fn = fn
        self.timeout = timeout
        self.retries = retries
        self.retry_on = retry_on
        self.backoff = backoff
        self.__qualname__ = getattr(fn, "__qualname__", type(fn).__qualname__)  # how displays name the call

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        attempt = 1
        while True:
            try:
                return await self.attempt(args, kwargs)
            except _TimedOut:
                if attempt > self.retries:
                    raise TaskTimeout(limit=self.timeout, attempts=attempt) from None
                failure: BaseException | None = None
            except self.retry_on as exc:
                if attempt > self.retries:
                    setattr(exc, ATTEMPTS_ATTR, attempt)
                    raise
                failure = exc
            await _sleep(backoff_delay(attempt, self.backoff, failure))
            attempt += 1

    async def attempt(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        __tracebackhide__ = True
        import asyncio  # loaded already: we are inside a running loop

        value = self.fn(*args, **kwargs)
        if not inspect.isawaitable(value):
            return value
        if self.timeout is None:
            return await value
        task = asyncio.ensure_future(value)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except BaseException:  # this item is being cancelled: its coroutine goes too
            task.cancel()
            raise
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)  # let it clean up (close its connection), briefly
        raise _TimedOut


class _TimedOut(Exception):
    """An attempt ran past its time limit (only ever seen inside ``Attempts``)."""


async def _sleep(seconds: float) -> None:
    import asyncio  # loaded already: we are inside a running loop

    await asyncio.sleep(seconds)
