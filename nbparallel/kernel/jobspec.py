"""What a call tells the sidecar beyond its function and items: limits, the caller's context, the
function's cache key."""

from __future__ import annotations

import sys
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from .. import config


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
