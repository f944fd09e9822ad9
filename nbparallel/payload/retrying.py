"""Retrying a task in its worker when it raises one of the exception types the caller named."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ATTEMPTS_ATTR = "_nbparallel_attempts"  # set on the exception that ends the last attempt


class RetryOn:
    """Calls ``fn`` up to ``1 + retries`` times while it raises one of ``exceptions``.

    Only errors the caller named are retried: an ordinary bug should fail at once. Crashes and
    timeouts are retried by the sidecar instead, on a fresh worker.
    """

    def __init__(self, fn: Callable[..., Any], retries: int, exceptions: tuple[type[BaseException], ...]):
        self.fn = fn
        self.retries = retries
        self.exceptions = exceptions

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        attempt = 1
        while True:
            try:
                return self.fn(*args, **kwargs)
            except self.exceptions as exc:
                if attempt > self.retries:
                    setattr(exc, ATTEMPTS_ATTR, attempt)
                    raise
                attempt += 1
