"""What a call tells the sidecar beyond its function and items: limits, the caller's context, the
function's cache key."""

from __future__ import annotations

import sys
import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import config
from ..payload.aiocall import is_async
from ..payload.retrying import Attempts, RetryOn


@dataclass(frozen=True)
class Limits:
    """Per-call limits the sidecar enforces (see ``nbparallel.map``)."""

    timeout: float | None = None
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = ()
    memory_limit: int | None = None

    @staticmethod
    def make(timeout: float | None, retries: int, retry_on: Any, memory_limit: int | str | None) -> Limits:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout must be a positive number of seconds per item, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        retry_on = tuple(retry_on or ())
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise TypeError(f"retry_on must be exception types, got {retry_on!r}")
        memory = None if memory_limit is None else config.parse_size(memory_limit)
        return Limits(None if timeout is None else float(timeout), retries, retry_on, memory)


_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hr": 3600.0,
        "hour": 3600.0, "d": 86400.0, "day": 86400.0}


def parse_rate(rate: str | float) -> float:
    """Item starts per second from ``"50/s"``, ``"3000/min"``, ``"10/hour"``, ``"1/2s"`` or a number
    (per second)."""
    if isinstance(rate, bool):
        raise TypeError(f'rate must be a string like "50/s" or "3000/min", or a number per second, got {rate!r}')
    if isinstance(rate, (int, float)):
        value = float(rate)
    elif isinstance(rate, str):
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*/\s*([0-9]*\.?[0-9]*)\s*([a-z]+)\s*",
                             rate.lower())
        if found is None or found.group(3).rstrip("s") not in _PER and found.group(3) not in _PER:
            raise ValueError(f'cannot read the rate {rate!r}; write e.g. "50/s", "3000/min" or "10/hour"')
        unit = found.group(3) if found.group(3) in _PER else found.group(3).rstrip("s")
        value = float(found.group(1)) / (float(found.group(2) or 1) * _PER[unit])
    else:
        raise TypeError(f'rate must be a string like "50/s" or "3000/min", or a number per second, got {rate!r}')
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"rate must be positive, got {rate!r}")
    return value


@dataclass(frozen=True)
class Flow:
    """How the items of an IO-bound call flow (see ``nbparallel.map``): items in flight across the
    call (coroutine functions), item starts per second, the base of the backoff between retries."""

    concurrency: int | None = None
    rate: float | None = None
    backoff: float | None = None

    @staticmethod
    def make(concurrency: int | None, rate: str | float | None, backoff: float | None) -> Flow:
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                        or concurrency < 1):
            raise ValueError(f"concurrency must be a positive int (items in flight across the call), got "
                             f"{concurrency!r}")
        if backoff is not None and (isinstance(backoff, bool) or not isinstance(backoff, (int, float))
                                    or not backoff >= 0):
            raise ValueError(f"backoff must be a number of seconds >= 0, got {backoff!r}")
        return Flow(concurrency, None if rate is None else parse_rate(rate),
                    None if backoff is None else float(backoff))

    def plan(self, workers: int, chunksize: int | str) -> tuple[int, int, int | str]:
        """For a coroutine function: ``(workers, in flight per worker, chunk size)`` so that the
        workers times their items in flight never exceed ``concurrency`` (default
        ``config.ASYNC_CONCURRENCY``). A chunk is one worker's share (a paced call's carries about
        ``config.PACED_CHUNK_SECONDS`` of starts instead): the sidecar keeps a second one queued in
        the worker, so its items start as the first one's places free up."""
        total = self.concurrency or config.ASYNC_CONCURRENCY
        share = max(1, min(workers, total))
        each = total // share
        size: int | str = chunksize
        if chunksize == "auto":
            size = each if self.rate is None else max(1, min(each, math.ceil(self.rate * config.PACED_CHUNK_SECONDS)))
        return share, each, size


def wrap(fn: Callable[..., Any], limits: Limits, flow: Flow) -> tuple[Callable[..., Any], bool]:
    """The function a map call's job runs, and whether it runs on the workers' event loops (a
    coroutine function, ``concurrency=`` given, or a paced call: ``rate=`` is kept there, for plain
    functions too, one item at a time): then its items' timeouts and retries, with backoff, run there
    (``Attempts``); otherwise ``retry_on`` is retried in place (``RetryOn``)."""
    if flow.concurrency is not None or flow.rate is not None or is_async(fn):
        if limits.timeout or limits.retries or limits.retry_on:
            backoff = config.ASYNC_BACKOFF if flow.backoff is None else flow.backoff
            fn = Attempts(fn, timeout=limits.timeout, retries=limits.retries, retry_on=limits.retry_on,
                          backoff=backoff)
        return fn, True
    if limits.retry_on:
        fn = RetryOn(fn, limits.retries, limits.retry_on, flow.backoff or 0.0)
    return fn, False


def function_key(packed: Any) -> str:
    """Workers cache functions by this key. A function whose closure holds arrays in shared
    memory is keyed per call: the same pickle stream may then stand for other array contents."""
    digest = hashlib.blake2b(packed.data, digest_size=16)
    if packed.specs:
        digest.update(os.urandom(16))
    return digest.hexdigest()


def caller_context() -> dict[str, Any]:
    """Where the caller runs: workers chdir there and import from the same sys.path."""
    return {"cwd": _cwd(), "path": _sys_path()}


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def _sys_path() -> list[str]:

    return [os.path.abspath(p) if p else _cwd() or "" for p in sys.path]
