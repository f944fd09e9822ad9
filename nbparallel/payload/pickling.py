"""Turning user values into bytes and back (cloudpickle, pickle protocol 5), with diagnostics.

Functions defined in a notebook (``__main__``), lambdas and closures travel by value. When something
cannot be pickled, the error names the object and where it was found (a global, a closure cell, an
argument, an item) instead of cloudpickle's bare "cannot pickle '_thread.lock' object".
"""

from __future__ import annotations

import pickle
import reprlib
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import shm, tracebacks
from ..errors import SerializationError
from ..wire import frames as protocol
from ..wire.frames import Frame

PROTOCOL = 5

# Outcome status codes inside a result payload.
OK = 0  # value
RAISED = 1  # (exception, tracebacks.RemoteTrace)
FAILED = 2  # NbParallelError made by the machinery (e.g. the result could not be pickled)

_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlist = 6
_short.maxtuple = 6
_short.maxdict = 4


def describe(value: Any) -> str:
    """A short, safe repr for messages (never raises)."""
    try:
        return _short.repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        return f"<{type(value).__name__} object>"


def dumps(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=PROTOCOL)  # type: ignore[no-any-return]


def loads(data: bytes | bytearray | memoryview) -> Any:
    return pickle.loads(data)


def pickling_error(value: Any) -> BaseException | None:
    """Why ``value`` cannot be pickled, or None. For naming the culprit after a batch failed. Any
    exception a ``__reduce__`` raises counts (SystemExit too); Ctrl-C propagates."""
    try:
        dumps(value)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        return exc
    return None


def why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def pack(value: Any) -> shm.Packed:
    """Pickle a value for the kernel to send: its large buffers are placed in shared memory when the
    runner sends the frame (``Packed.place``), once per call however often they appear."""
    return shm.dumps(value, deferred=True)


def unpack(frame: Frame, *, private: bool = False) -> Any:
    """The value a frame carries (see ``pack``); takes ownership of the frame's descriptors."""
    fds, frame.fds = frame.fds, []
    return shm.loads(frame.payload, fds, frame.get("oob") or [], private=private)


def close_fds(frame: Frame) -> None:
    """Release the descriptors of a frame nobody will unpack."""
    protocol.close_fds(frame.fds)
    frame.fds = []


def dumps_function(fn: Callable[..., Any]) -> shm.Packed:
    """Pickle the mapped function, or say which object inside it cannot travel."""
    if not callable(fn):
        raise TypeError(f"nbparallel needs a callable to run, got {describe(fn)} ({type(fn).__name__})")
    try:
        packed = pack(fn)
        packed.group_is_one_call = type(fn).__name__ == "BatchedCalls" and type(fn).__module__.startswith("joblib")
        return packed
    except (shm.SharedMemoryLimit, KeyboardInterrupt):
        raise  # it names the limit; blaming pickling would mislead
    except BaseException as exc:  # whatever a __reduce__ raises, SystemExit too, is a pickling failure
        culprit = find_unpicklable(fn)
        where = f": {culprit}" if culprit else ""
        raise SerializationError(
            f"the function {getattr(fn, '__qualname__', describe(fn))} cannot be sent to the workers"
            f"{where} ({type(exc).__name__}: {exc}). Create that object inside the function, or pass "
            "what it needs as arguments."
        ) from exc


def dumps_items(items: list[Any], first_index: int) -> shm.Packed:
    """Pickle a chunk of input items, naming the item that cannot be pickled."""
    try:
        return pack(items)
    except (shm.SharedMemoryLimit, KeyboardInterrupt):
        raise  # it names the limit; blaming an item would mislead
    except BaseException as exc:  # whatever a __reduce__ raises, SystemExit too, is a pickling failure
        for offset, item in enumerate(items):
            item_error = pickling_error(item)
            if item_error is not None:
                raise SerializationError(
                    f"item {first_index + offset} ({describe(item)}) cannot be sent to a worker "
                    f"({why(item_error)}). Pass something picklable, e.g. a path or the data the item "
                    "stands for.",
                    index=first_index + offset,
                    item=describe(item),
                ) from item_error
        raise SerializationError(f"a chunk of items cannot be pickled: {exc}") from exc


def find_unpicklable(fn: Any, _seen: set[int] | None = None) -> str | None:
    """Walk a function's closure, globals and defaults; name the first object that fails."""
    seen = _seen if _seen is not None else set()
    if id(fn) in seen:
        return None
    seen.add(id(fn))
    code = getattr(fn, "__code__", None)
    candidates: list[tuple[str, Any]] = []
    if code is not None:
        cells = getattr(fn, "__closure__", None) or ()
        for name, cell in zip(code.co_freevars, cells):
            try:
                candidates.append((f"the closure variable {name!r}", cell.cell_contents))
            except ValueError:  # an empty cell
                continue
        globals_ = getattr(fn, "__globals__", {})
        for name in _names_used(code):
            if name in globals_:
                candidates.append((f"the global {name!r}", globals_[name]))
        for i, default in enumerate(getattr(fn, "__defaults__", None) or ()):
            candidates.append((f"default argument #{i + 1}", default))
    elif hasattr(fn, "__dict__"):
        candidates.extend((f"the attribute {k!r}", v) for k, v in vars(fn).items())
    for where, value in candidates:
        if pickling_error(value) is None:
            continue
        if callable(value) and hasattr(value, "__code__"):
            inner = find_unpicklable(value, seen)
            if inner:
                return f"{inner}, used by {where}"
        return f"{where} ({type(value).__module__}.{type(value).__qualname__})"
    return None


def _names_used(code: Any) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names.extend(_names_used(const))
    return names


def encode_exception(exc: BaseException) -> tuple[BaseException, tracebacks.RemoteTrace]:
    """The (exception, remote traceback as plain data) pair a worker sends for a raised item; the
    kernel writes the traceback out (``tracebacks.SourceIndex.render``), where the source is."""
    trace = tracebacks.capture(exc)
    exc.__traceback__ = None  # frames cannot travel, and hold references we don't want to keep
    try:
        # The exception must survive the round trip, or the kernel could not rebuild it.
        pickle.loads(dumps(exc))
    except Exception:
        return RemoteException(type(exc), str(exc)), trace
    return exc, trace


class RemoteException(Exception):
    """Stands in for an exception that could not be pickled or unpickled on the way back."""

    def __init__(self, original_type: type | str, message: str):
        name = original_type if isinstance(original_type, str) else (
            f"{original_type.__module__}.{original_type.__qualname__}"
        )
        super().__init__(f"{name}: {message}")
        self.original_type = name
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteException, (self.original_type, self.message))
