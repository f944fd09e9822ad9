"""The work every peer runs. Module-level, so every start method can import them by name.

They live apart from the scenario modules so a spawned worker imports nothing heavy to find them.
"""

from __future__ import annotations

import os
import time
from typing import Any

# Set by the S2 caller before its pool starts. A forked worker inherits the caller's list; a
# spawned one (and every nbparallel worker) imports this module afresh and sees it empty.
FAT_OBJECTS: list[Any] = []
# Set by the S3 "shared read" reference before a fork pool starts: the array the workers share.
SHARED_ARRAY: Any = None


def tiny(x: int) -> int:
    """S1: almost no work, so the time is the peer's per-item overhead."""
    return x * 2


def small(x: int) -> int:
    """S2: a little work (tens of microseconds); returns the worker's PID so the caller knows its workers."""
    total = 0
    for i in range(1000):
        total += i
    return os.getpid() if total else -1


def touch_objects(_: int) -> tuple[int, int, int, int]:
    """S2: walk the caller's objects (refcounts written: copy-on-write in a forked worker).

    Returns (pid, objects seen, USS before, USS after), measured inside the worker itself.
    The short sleep lets every worker take one of these tasks.
    """
    import psutil

    me = psutil.Process()
    before = me.memory_full_info().uss
    seen = 0
    for _obj in FAT_OBJECTS:
        seen += 1
    after = me.memory_full_info().uss
    time.sleep(0.3)
    return os.getpid(), seen, before, after


def slice_sum(part: Any) -> float:
    """S3: reduce one slice of the big array (the slice travels however the peer moves arrays)."""
    return float(part.sum())


def shared_slice_sum(bounds: tuple[int, int]) -> float:
    """S3 reference: reduce a slice of the array the forked workers already share; nothing is copied."""
    start, stop = bounds
    return float(SHARED_ARRAY[start:stop].sum())


def busy(iterations: int) -> int:
    """S4: pure-Python CPU work of a fixed size (not a fixed time, so contention shows as slowness)."""
    total = 0
    for i in range(iterations):
        total += i ^ (i >> 3)
    return total
