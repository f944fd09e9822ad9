"""One submitted call on the kernel side: a job of one item, and the Future it settles.

What ``submit``, ``Executor.submit`` and the joblib backend's batches are made of. The Future is a
real ``concurrent.futures.Future``; unlike the standard library's, cancelling one that is already
running stops it: the runner kills the worker running it and starts another. The job itself
(opening it, reading its outcome) is jobs.py's; results are settled on the client's reader thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
from collections.abc import Callable
from typing import Any

from ..errors import NbParallelError, SerializationError, SidecarDied
from ..payload import pickling as ser
from ..wire import messages as msg
from ..wire.frames import Frame
from .jobs import Job
from .output import CellTarget, flush_std
from .runner import get_client

_group_numbers = itertools.count(1)


def new_group() -> int:
    """A fresh group number: tasks of one group share one cap on running tasks (``limit``)."""
    return next(_group_numbers)


class TaskFuture(cf.Future):  # type: ignore[type-arg]  # Future is generic only in stubs
    """A Future whose ``cancel()`` also stops the task if a worker is already running it."""

    _task: Task | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # Waiters in concurrent.futures.wait/as_completed only hear of it once notified.
        self.set_running_or_notify_cancel()
        if self._task is not None:
            self._task.abandon()
        return True


class Task:
    """One submitted call: its job in the runner and the Future it settles."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 limit: int, group: int | None, *, target: CellTarget | None = None, label: str | None = None) -> None:
        """``target``: where worker output goes (default: the cell running now); ``label``: how errors
        name the task (default: its arguments). The joblib backend sets both: it submits from the
        client's reader thread, on behalf of the cell that started the joblib call."""
        engine = self.engine = Job(fn, call="kwargs", numbered=False)  # before the runner is even started
        try:
            payload = ser.pack([(args, kwargs)])
        except Exception:
            engine.discard()
            for position, arg in enumerate(args):
                check_argument(arg, f"argument {position + 1}")
            for name, arg in kwargs.items():
                check_argument(arg, f"keyword argument {name!r}")
            raise
        engine.connect(get_client())
        self.item = label or call_label(fn, args, kwargs)
        self.future = TaskFuture()
        self.future._task = self
        self.target = target or CellTarget.capture()
        self.job = engine.id  # what the progress display matches the runner's worker list against
        self.settled = threading.Lock()
        self.ended = False
        flush_std()
        engine.route(self)
        engine.open(limit=limit, group=group)
        engine.send_chunk(0, 1, payload)

    def describe(self, index: int) -> str:
        return self.item

    def on_frame(self, frame: Frame) -> None:
        if frame.op == "output":
            out = msg.view(frame, msg.Output)
            self.target.stream(out.get("stream", "stdout"), out.get("text", ""))
            return
        if frame.op == "display":
            self.target.show_frame(frame, tagged=False)
            return
        if frame.op == "result":
            try:
                batch = self.engine.outcomes(frame, 0, self.describe)
            except Exception as exc:
                unreadable = self.engine.unreadable(exc, 0, self.describe)
                self._settle(lambda f: f.set_exception(unreadable))
                return
            if batch.values:
                value = batch.values[0]
                self._settle(lambda f: f.set_result(value))
            elif batch.errors:
                error = next(iter(batch.errors.values()))
                self._settle(lambda f: f.set_exception(error))
        elif frame.op == "crashed":
            crash = next(iter(self.engine.crashed(frame, self.describe).values()))
            self._settle(lambda f: f.set_exception(crash))
        else:
            ser.close_fds(frame)

    def on_died(self, error: SidecarDied) -> None:
        self._settle(lambda f: f.set_exception(SidecarDied(str(error))), send_end=False)

    def _settle(self, how: Callable[[cf.Future[Any]], None], send_end: bool = True) -> None:
        with self.settled:
            if not self.future.done():
                try:
                    how(self.future)
                except cf.InvalidStateError:  # cancelled in the meantime
                    pass
        self._end(send_end)

    def abandon(self) -> None:
        """Stop the task wherever it is (``TaskFuture.cancel``): dropped, or its worker killed."""
        self.engine.cancel()
        self._end(True)

    def _end(self, send: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.engine.end(send=send)


def check_argument(value: Any, where: str) -> None:
    """Raise a ``SerializationError`` naming ``where`` if ``value`` cannot be sent to a worker."""
    error = ser.pickling_error(value)
    if error is not None:
        raise SerializationError(
            f"{where} ({ser.describe(value)}, a {type(value).__name__}) cannot be sent to a worker: "
            f"{ser.why(error)}"
        ) from error


def call_label(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """How errors name a submitted call: ``fn(1, key='x')``, each argument a short repr."""
    name = getattr(fn, "__name__", None) or getattr(fn, "__qualname__", None) or type(fn).__name__
    if not args and not kwargs and not name.isidentifier() and name != "<lambda>":
        return str(name)  # an object that names itself, e.g. a %%parallel --bg cell: "%%parallel"
    shown = [ser.describe(arg) for arg in args[:6]]
    shown += [f"{key}={ser.describe(arg)}" for key, arg in list(kwargs.items())[:6]]
    if len(args) > 6 or len(kwargs) > 6:
        shown.append("...")
    return f"{name}({', '.join(shown)})"
