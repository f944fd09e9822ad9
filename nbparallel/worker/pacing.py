"""Pacing a plain function's items to the start times the sidecar gave their chunk (``rate=``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Paced:
    """Calls ``fn``, its k-th call no earlier than ``not_before + k * spacing`` (``time.monotonic()``,
    one clock for every process of the machine; the sidecar hands out disjoint start times across the
    job's workers, so the job never starts more than ``rate`` items per second)."""

    def __init__(self, fn: Callable[..., Any], pace: list[float]) -> None:
        self.fn = fn
        self.not_before, self.spacing = float(pace[0]), float(pace[1])
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        delay = self.not_before + self.calls * self.spacing - time.monotonic()
        self.calls += 1
        if delay > 0:
            time.sleep(delay)
        return self.fn(*args, **kwargs)
