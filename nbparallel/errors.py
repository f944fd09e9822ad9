"""Exception types. Each message says what happened, why, and what to try.

The hierarchy::

    NbParallelError
     ├── TaskError          the user's function raised (also an instance of the original type)
     ├── WorkerCrashed      the worker process died while running the item (crashes.py; also
     │    │                 concurrent.futures.process.BrokenProcessPool)
     │    └── MemoryLimitExceeded   killed on purpose: it passed ``memory_limit``
     ├── TaskTimeout        the item ran past its time limit
     ├── SidecarDied        the runner process went away
     │    └── ClusterUnavailable    the Dask cluster could not be reached or started
     ├── SerializationError something could not be pickled or unpickled
     └── ProtocolError      a malformed or incompatible message on the wire
    Interrupted (KeyboardInterrupt)  the call was cancelled; carries what completed

Every per-item error carries ``item`` (a short repr of the input), ``index`` (its position in the
input) and, once a call stopped, ``completed``: ``{index: result}`` of everything that finished.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = [
    "NbParallelError",
    "TaskError",
    "TaskTimeout",
    "SidecarDied",
    "ClusterUnavailable",
    "SerializationError",
    "ProtocolError",
    "Interrupted",
]


def _rebuild(cls: type[NbParallelError], args: tuple[Any, ...], state: dict[str, Any]) -> NbParallelError:
    error = Exception.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class NbParallelError(Exception):
    """Base class of every error nbparallel raises."""

    #: ``{index: result}`` of the items that had finished when the call stopped.
    completed: dict[int, Any]
    index: int | None = None
    item: str | None = None
    #: How many times the item was tried (``retries=`` gives crashed or timed-out items more).
    attempts: int = 1

    def __init__(self, message: str = "", *, index: int | None = None, item: str | None = None):
        super().__init__(message)
        self.index = index
        self.item = item
        self.completed = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take keyword-only fields; rebuild from the state rather than calling __init__.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))

    def _where(self) -> str:
        if self.index is None:  # a submitted call: ``item`` says what ran, e.g. "fn(1, key='x')"
            return self.item or "the task"
        return f"item {self.index}" + (f" ({self.item})" if self.item else "")


class TaskError(NbParallelError):
    """The mapped function raised for one item.

    The object raised is also an instance of the original exception's type, so
    ``except ValueError`` keeps working; the original is ``exception`` (and ``__cause__``), and the
    worker's formatted traceback is ``remote_traceback``.
    """

    exception: BaseException
    remote_traceback: str

    def __str__(self) -> str:
        original = self.exception
        text = f"{type(original).__name__}: {original}" if str(original) else type(original).__name__
        return f"{self._where()} raised {text}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of the local traceback, which is only our waiting loop.
        original = self.exception
        head = f"nbparallel: {self._where()} raised {type(original).__name__} in a worker"
        return [head, "", *self.remote_traceback.rstrip().splitlines()]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_task_error, (self.exception, self.remote_traceback, self.index, self.item))


_task_error_classes: dict[type[BaseException], type[TaskError]] = {}


def _task_error_class(original: type[BaseException]) -> type[TaskError]:
    """A subclass of both TaskError and the original type, made once per type."""
    cls = _task_error_classes.get(original)
    if cls is None:
        try:
            if not issubclass(original, Exception) or issubclass(original, NbParallelError):
                raise TypeError("not mixed")
            # Named after the original, so a notebook's error line reads "ValueError: ...".
            cls = type(original.__name__, (TaskError, original), {"__module__": __name__,
                                                                   "__qualname__": original.__qualname__})
        except TypeError:  # a final class, or an incompatible layout: plain TaskError
            cls = TaskError
        _task_error_classes[original] = cls
    return cls


def make_task_error(
    exception: BaseException, remote_traceback: str, index: int | None, item: str | None
) -> TaskError:
    """Wrap ``exception`` raised remotely for one item."""
    cls = _task_error_class(type(exception))
    error = Exception.__new__(cls)
    # The mixed-in type's own __init__ may need other arguments; fill the fields by hand.
    error.args = exception.args
    error.exception = exception
    error.remote_traceback = remote_traceback
    error.index = index
    error.item = item
    error.completed = {}
    error.__cause__ = exception
    return error


def _rebuild_task_error(
    exception: BaseException, remote_traceback: str, index: int | None, item: str | None
) -> TaskError:
    return make_task_error(exception, remote_traceback, index, item)


def which_item(index: int | None, item: str | None) -> str:
    """How messages name an item: "item 3 ('x')", or "the task" for a submitted call."""
    if index is None:
        return f"the task{' (' + item + ')' if item else ''}"
    return f"item {index}{' (' + item + ')' if item else ''}"


class TaskTimeout(NbParallelError):
    """The item ran longer than its time limit; its worker was killed and replaced.

    Also raised when a whole call runs past ``total_timeout`` (then ``index`` is None).
    """

    def __init__(self, message: str = "", *, index: int | None = None, item: str | None = None,
                 limit: float | None = None, attempts: int = 1):
        super().__init__(message or (
            f"{which_item(index, item)} ran past its time limit of {limit:g} s"
            f"{f' (tried {attempts} times)' if attempts > 1 else ''}; its worker was killed and replaced. "
            "Raise timeout= if it needs longer."
        ), index=index, item=item)
        self.limit = limit
        self.attempts = attempts


class SidecarDied(NbParallelError):
    """The sidecar process went away. The next call starts a new one."""


class ClusterUnavailable(SidecarDied):
    """The Dask cluster named by ``configure(cluster=...)`` could not be reached or started."""


class SerializationError(NbParallelError, pickle.PicklingError):
    """Something could not be pickled or unpickled; the message names it and where it was.

    Also a ``pickle.PicklingError``, so code written for ProcessPoolExecutor catches it."""


class ProtocolError(NbParallelError):
    """A message on the wire was malformed or came from an incompatible version."""


class Interrupted(KeyboardInterrupt):
    """The call was interrupted (Ctrl-C or the stop button) and cancelled.

    ``completed`` holds ``{index: result}`` of every item that had finished.
    """

    def __init__(self, message: str = "", completed: dict[int, Any] | None = None):
        super().__init__(message)
        self.completed: dict[int, Any] = completed or {}
