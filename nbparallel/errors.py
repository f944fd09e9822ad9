"""Exception types. Each message says what happened, why, and what to try.

An exception a task raises reaches the caller as that very exception (unpickled: same type, same
attributes), its remote traceback chained as ``__cause__`` (a ``RemoteTraceback``, as
concurrent.futures does) and the item named in a note; ``details(err)`` gives nbparallel's side
of it. These are nbparallel's own errors::

    NbParallelError
     ├── TaskError          the function raised an exception that cannot be rebuilt here
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
import sys
from typing import Any, Protocol

__all__ = [
    "NbParallelError",
    "TaskError",
    "RemoteTraceback",
    "details",
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
    #: The worker's traceback, where there is one (``TaskError``).
    remote_traceback: str = ""

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
        return which_item(self.index, self.item)


class TaskError(NbParallelError):
    """The function raised an exception that cannot be rebuilt in the kernel: its class is not
    importable here, or unpickling it raised. Carries what is known of it: ``type_name`` (module and
    qualified name), ``message`` (its ``str()``), and ``remote_traceback``.

    Any other exception a task raises reaches the caller as itself (see ``details``).
    """

    type_name: str = ""
    message: str = ""

    def __init__(self, type_name: str, message: str, remote_traceback: str, *, why: str = "",
                 index: int | None = None, item: str | None = None) -> None:
        short = type_name.rpartition(".")[2]
        text = f"{short}: {message}" if message else short
        because = f" ({why})" if why else ""
        super().__init__(f"{which_item(index, item)} raised {text}; it could not be rebuilt here{because}",
                         index=index, item=item)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{super().__str__()}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"


class RemoteTraceback(Exception):
    """The remote side of an exception a task raised: chained as its ``__cause__``, as
    concurrent.futures chains its ``_RemoteTraceback`` (``tb`` is the text it shows), and holding
    nbparallel's details of the item: ``index`` (None for a submitted call), ``item`` (a short repr
    of the input, or the call), ``attempts``, ``completed`` (``{index: result}`` of what had finished
    when the call stopped on this exception) and ``remote_traceback`` (the worker's traceback,
    written out with the notebook's cells). Get it with ``details(err)``."""

    def __init__(self, remote_traceback: str, *, index: int | None = None, item: str | None = None,
                 attempts: int = 1) -> None:
        super().__init__(remote_traceback)
        self.remote_traceback = remote_traceback
        self.index = index
        self.item = item
        self.attempts = attempts
        self.completed: dict[int, Any] = {}

    @property
    def tb(self) -> str:
        """The text shown, as concurrent.futures' ``_RemoteTraceback.tb``."""
        return f'\n"""\n{self.remote_traceback}"""' + _NOTE_IN_TEXT.format(self.note())

    def note(self) -> str:
        """The line added to the exception's notes (PEP 678): which item raised it."""
        return f"nbparallel: raised by {which_item(self.index, self.item)} in a worker"

    def __str__(self) -> str:
        return self.tb

    def __reduce__(self) -> tuple[Any, ...]:
        # Without ``completed``: a stored or resent exception should not carry a whole call's results.
        return (_rebuild_remote, (self.remote_traceback, self.index, self.item, self.attempts))


def _rebuild_remote(remote_traceback: str, index: int | None, item: str | None, attempts: int) -> RemoteTraceback:
    return RemoteTraceback(remote_traceback, index=index, item=item, attempts=attempts)


# Python 3.11+ prints notes after the exception; on 3.10 the remote traceback says it instead.
_NOTE_IN_TEXT = "" if sys.version_info >= (3, 11) else "\n{}"


class Details(Protocol):
    """What ``details(err)`` returns: nbparallel's side of an exception a call raised or returned."""

    index: int | None
    item: str | None
    attempts: int
    completed: dict[int, Any]
    remote_traceback: str


def details(error: BaseException) -> Details | None:
    """nbparallel's details of ``error``, an exception a call raised (or put in an item's place
    with ``errors="return"``, or a future holds): ``.index``, ``.item``, ``.attempts``,
    ``.completed`` and ``.remote_traceback``. None for an exception nbparallel did not hand over.

    For a task's own exception they live in its ``__cause__`` (a ``RemoteTraceback``); nbparallel's
    own errors carry them as attributes."""
    cause = error.__cause__
    if isinstance(cause, RemoteTraceback):
        return cause
    if isinstance(error, NbParallelError):
        return error
    return None


def keep_completed(error: BaseException, completed: dict[int, Any]) -> None:
    """Record ``completed`` (``{index: result}`` of what finished) in ``error``'s details (an
    ``Interrupted``: in itself)."""
    found = error if isinstance(error, Interrupted) else details(error)
    if found is not None:
        found.completed = completed


def completed_of(error: BaseException) -> dict[int, Any] | None:
    """The ``completed`` results ``error`` carries (see ``keep_completed``), or None."""
    found = error if isinstance(error, Interrupted) else details(error)
    return None if found is None else found.completed


def is_failure(outcome: Any) -> bool:
    """Whether an item's outcome in a list made with ``errors="return"`` is its failure (an
    exception nbparallel handed over) rather than a value (an exception the function returned)."""
    return isinstance(outcome, BaseException) and details(outcome) is not None


def attach(error: BaseException, remote: RemoteTraceback) -> BaseException:
    """Chain ``remote`` to ``error``, a task's exception just rebuilt in the kernel, and name the
    item in a note (PEP 678). Only ``__cause__`` and ``__notes__`` change."""
    # Through object's setattr: a frozen dataclass exception refuses its own __setattr__.
    object.__setattr__(error, "__cause__", remote)
    try:
        notes = getattr(error, "__notes__", None)
        object.__setattr__(error, "__notes__", [*(notes if isinstance(notes, list) else []), remote.note()])
    except Exception:  # an exception that takes no attributes: the remote traceback names the item
        pass
    return error


def renumber(error: BaseException, index: int) -> None:
    """Give ``error`` (from a call over part of the caller's items) the caller's ``index``, in its
    details and wherever its message or note names the item."""
    found = details(error)
    if found is None:
        return
    old = found.index
    if old is None or old == index:
        return
    if isinstance(found, RemoteTraceback):
        before = found.note()
        found.index = index
        notes = getattr(error, "__notes__", None)
        if isinstance(notes, list) and before in notes:
            notes[notes.index(before)] = found.note()
        return
    if error.args and isinstance(error.args[0], str):  # our own error: its message names the item
        text = error.args[0].replace(which_item(old, found.item), which_item(index, found.item), 1)
        error.args = (text, *error.args[1:])
    found.index = index


def which_item(index: int | None, item: str | None) -> str:
    """How messages name an item: "item 3 ('x')", "item 3" when its repr says no more than its
    index (``map(f, range(n))``), or "the task" for a submitted call."""
    if index is None:
        return f"the task{' (' + item + ')' if item else ''}"
    return f"item {index}{' (' + item + ')' if item and item != str(index) else ''}"


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


class Unreadable(SerializationError):
    """An item's input (in its worker), or its result (here) could not be unpickled: that item
    alone fails. The kernel raises it as ``crashes.ResultUnreadable``, also a BrokenProcessPool, as
    ProcessPoolExecutor reports it (its pool breaks; ours stays whole)."""


class ProtocolError(NbParallelError):
    """A message on the wire was malformed or came from an incompatible version."""


class Interrupted(KeyboardInterrupt):
    """The call was interrupted (Ctrl-C or the stop button) and cancelled.

    ``completed`` holds ``{index: result}`` of every item that had finished.
    """

    def __init__(self, message: str = "", completed: dict[int, Any] | None = None):
        super().__init__(message)
        self.completed: dict[int, Any] = completed or {}

    def _render_traceback_(self) -> list[str]:
        # What IPython shows for it: the message alone. A stop is no bug to debug, and the only
        # frames under the caller's line are nbparallel's own.
        return [f"{type(self).__name__}: {self}"]
