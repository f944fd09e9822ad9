"""Exception types. Each message says what happened, why, and what to try.

The hierarchy::

    NbParallelError
     ├── TaskError          the user's function raised (also an instance of the original type)
     ├── WorkerCrashed      the worker process died while running the item
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

import signal
from typing import Any

__all__ = [
    "NbParallelError",
    "TaskError",
    "WorkerCrashed",
    "MemoryLimitExceeded",
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


def describe_exit(exitcode: int | None) -> tuple[int | None, str | None, str]:
    """(exit status, signal name, likely cause) for a subprocess return code."""
    if exitcode is None:
        return None, None, "the worker stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        causes = {
            "SIGSEGV": "a segmentation fault, usually a bug in a C extension",
            "SIGBUS": "a bus error, usually a bug in a C extension or a truncated memory map",
            "SIGABRT": "an abort, usually a failed assertion in a C extension",
            "SIGKILL": "it was killed with SIGKILL, most often by the out-of-memory killer",
            "SIGTERM": "it was asked to terminate by another process",
        }
        return None, name, causes.get(name, f"it was killed by {name}")
    return exitcode, None, f"it exited with status {exitcode} (os._exit or sys.exit in the task?)"


def _which(index: int | None, item: str | None) -> str:
    if index is None:
        return f"the task{' (' + item + ')' if item else ''}"
    return f"item {index}{' (' + item + ')' if item else ''}"


class WorkerCrashed(NbParallelError):
    """The worker running the item died: a signal, an exit, or the out-of-memory killer."""

    def __init__(
        self,
        *,
        index: int | None = None,
        item: str | None = None,
        pid: int | None = None,
        exitcode: int | None = None,
        memory: int | None = None,
        attempts: int = 1,
        cause: str | None = None,
        worker: str | None = None,
    ):
        status, self.signal, exit_cause = describe_exit(exitcode)
        self.exitcode = status
        self.pid = pid
        self.memory = memory
        self.attempts = attempts
        #: The Dask worker's address, when the work ran on a Dask cluster.
        self.worker = worker
        if cause is not None:  # a Dask cluster says what happened in its own terms
            last = f" (last on the Dask worker {worker})" if worker else ""
            message = f"{_which(index, item)} was lost on the Dask cluster{last}: {cause}."
        else:
            mem = f"; last seen using {memory / 2**20:.0f} MiB" if memory else ""
            hint = " If the item needs much memory, use fewer workers or set memory_limit=." if self.signal == "SIGKILL" else ""
            tries = f" (tried {attempts} times)" if attempts > 1 else ""
            message = (f"the worker (pid {pid}) running {_which(index, item)} died{tries}: {exit_cause}{mem}. "
                       f"The worker was replaced.{hint}")
        super().__init__(message, index=index, item=item)


class MemoryLimitExceeded(WorkerCrashed):
    """The worker passed ``memory_limit`` and was killed before the machine ran short."""

    def __init__(self, *, index: int | None = None, item: str | None = None, pid: int | None = None,
                 limit: int = 0, memory: int = 0, attempts: int = 1):
        NbParallelError.__init__(
            self,
            f"{_which(index, item)} made its worker (pid {pid}) use {memory / 2**20:.0f} MiB, past the "
            f"memory_limit of {limit / 2**20:.0f} MiB; the worker was killed and replaced"
            f"{f' (tried {attempts} times)' if attempts > 1 else ''}. Give it a higher memory_limit, or "
            "split the item.",
            index=index,
            item=item,
        )
        self.exitcode, self.signal = None, "SIGKILL"
        self.pid, self.memory, self.limit, self.attempts = pid, memory, limit, attempts


class TaskTimeout(NbParallelError):
    """The item ran longer than its time limit; its worker was killed and replaced.

    Also raised when a whole call runs past ``total_timeout`` (then ``index`` is None).
    """

    def __init__(self, message: str = "", *, index: int | None = None, item: str | None = None,
                 limit: float | None = None, attempts: int = 1):
        super().__init__(message or (
            f"{_which(index, item)} ran past its time limit of {limit:g} s"
            f"{f' (tried {attempts} times)' if attempts > 1 else ''}; its worker was killed and replaced. "
            "Raise timeout= if it needs longer."
        ), index=index, item=item)
        self.limit = limit
        self.attempts = attempts


class SidecarDied(NbParallelError):
    """The sidecar process went away. The next call starts a new one."""


class ClusterUnavailable(SidecarDied):
    """The Dask cluster named by ``configure(cluster=...)`` could not be reached or started."""


class SerializationError(NbParallelError):
    """Something could not be pickled or unpickled; the message names it and where it was."""


class ProtocolError(NbParallelError):
    """A message on the wire was malformed or came from an incompatible version."""


class Interrupted(KeyboardInterrupt):
    """The call was interrupted (Ctrl-C or the stop button) and cancelled.

    ``completed`` holds ``{index: result}`` of every item that had finished.
    """

    def __init__(self, message: str = "", completed: dict[int, Any] | None = None):
        super().__init__(message)
        self.completed: dict[int, Any] = completed or {}
