"""Turning user values into bytes and back (cloudpickle, pickle protocol 5), with diagnostics.

Functions defined in a notebook (``__main__``), lambdas and closures travel by value. When something
cannot be pickled, the error names the object and where it was found (a global, a closure cell, an
argument, an item) instead of cloudpickle's bare "cannot pickle '_thread.lock' object".
"""

from __future__ import annotations

import pickle
import reprlib
import signal
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

from . import shm, tracebacks
from ..errors import SerializationError
from ..wire import frames as protocol
from ..wire.frames import Frame

PROTOCOL = 5

# Outcome status codes inside a result payload.
OK = 0  # value
RAISED = 1  # Raised: the exception pickled alone, its traceback as data
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
    exception a ``__reduce__`` raises counts (SystemExit too); Ctrl-C propagates, where it can come
    (a worker ignores SIGINT: a KeyboardInterrupt there is the object's)."""
    try:
        dumps(value)
    except KeyboardInterrupt as exc:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            raise
        return exc
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


class Raised(NamedTuple):
    """An exception a task raised, on its way to the kernel (status ``RAISED``): pickled on its
    own, so one that cannot be rebuilt there fails only its own item; its traceback as plain data
    (the kernel writes it out, ``tracebacks.SourceIndex.render``, where the source is); and, for
    when it cannot be rebuilt, its type's name, its message and why (``blob`` is then None)."""

    blob: bytes | None
    trace: tracebacks.RemoteTrace
    type_name: str
    message: str
    why: str


def encode_exception(exc: BaseException) -> Raised:
    """What a worker sends for an item that raised ``exc`` (see ``Raised``)."""
    trace = tracebacks.capture(exc)
    exc.__traceback__ = None  # frames cannot travel, and hold references we don't want to keep
    kind = type(exc)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    problem = ""
    # As pickle rebuilds it (its class called with its args); failing that, from its args and
    # attributes without calling __init__ (an exception whose __init__ takes other arguments).
    for form in (exc, _ByState(exc)):
        try:
            blob = dumps(form)
            pickle.loads(blob)  # what the kernel will do: check here that it can be done at all
        except BaseException as error:  # a __reduce__ may raise anything, SystemExit included
            problem = problem or f"{type(error).__name__}: {_text(error)}"
            continue
        return Raised(blob, trace, type_name, _text(exc), "")
    return Raised(None, trace, type_name, _text(exc), f"it cannot be pickled in the worker: {problem}")


def rebuild_exception(raised: Raised) -> tuple[BaseException | None, str]:
    """The exception ``raised`` carries, unpickled here; or None and why it cannot be rebuilt."""
    if raised.blob is None:
        return None, raised.why
    try:
        error = pickle.loads(raised.blob)
    except BaseException as problem:  # its class is not importable here, or unpickling raised
        return None, f"unpickling it here raised {type(problem).__name__}: {_text(problem)}"
    if not isinstance(error, BaseException):
        return None, f"it unpickled as a {type(error).__name__}"
    return error, ""


class _ByState:
    """Pickles an exception as its class, args and attributes (see ``rebuild_by_state``)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return (rebuild_by_state, (type(exc), exc.args, dict(getattr(exc, "__dict__", {}))))


def rebuild_by_state(kind: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An exception of ``kind`` with ``args`` and the attributes ``state``, its __init__ not run."""
    error = kind.__new__(kind, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def _text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # a broken __str__ must not hide the error itself
        return "<exception str() failed>"


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
