"""Calling the user's function on one item, in each of the protocol's call modes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..wire.messages import CallMode


def call_item(fn: Callable[..., Any], call: CallMode | str, item: Any) -> Any:
    """``fn(item)``, ``fn(*item)`` or, for submit's ``(args, kwargs)``, ``fn(*args, **kwargs)``.

    The worker's loop keeps these three lines inline (its per-item hot path); the Dask task and
    nested calls run in the caller's worker share this one."""
    __tracebackhide__ = True  # our plumbing: remote tracebacks start at the user's function
    if call == "one":
        return fn(item)
    if call == "star":
        return fn(*item)
    return fn(*item[0], **item[1])
