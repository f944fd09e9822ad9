"""``submit`` and ``Executor``: one task per Future, on the shared sidecar.

A Future here is a real ``concurrent.futures.Future``. Unlike the standard library's, cancelling one
that is already running stops it: the sidecar kills the worker running it and starts another.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import config
from .api import imap_in_order
from .payload import tracebacks
from .payload import pickling as ser
from .kernel.runner import get_client
from .errors import NbParallelError, SerializationError, SidecarDied, make_task_error
from .kernel.jobspec import caller_context, crash_error, function_key
from .kernel.output import CellTarget, flush_std
from .progress.tracking import track_future
from .wire.frames import Frame

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
    """One submitted call: its job in the sidecar and the Future it settles."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 limit: int, group: int | None, *, target: CellTarget | None = None, label: str | None = None) -> None:
        """``target``: where worker output goes (default: the cell running now); ``label``: how errors
        name the task (default: its arguments). The joblib backend sets both: it submits from the
        client's reader thread, on behalf of the cell that started the joblib call."""
        function = ser.dumps_function(fn)  # before the sidecar is even started: fail fast
        self.sources = tracebacks.SourceIndex(fn)
        try:
            payload = ser.pack([(args, kwargs)])
        except Exception:
            function.close()
            for position, arg in enumerate(args):
                _check_argument(arg, f"argument {position + 1}")
            for name, arg in kwargs.items():
                _check_argument(arg, f"keyword argument {name!r}")
            raise
        client = self.client = get_client()
        self.item = label or _call_label(fn, args, kwargs)
        self.future = TaskFuture()
        self.future._task = self
        self.target = target or CellTarget.capture()
        self.job = client.new_job_id()
        self.settled = threading.Lock()
        self.ended = False
        flush_std()
        client.register(self.job, self)
        header: dict[str, Any] = {
            "op": "job",
            "job": self.job,
            "key": function_key(function),
            "call": "kwargs",
            "limit": limit,
            **caller_context(),
        }
        if group is not None:
            header["group"] = group
        client.send_packed(header, function)
        client.send_packed({"op": "chunk", "job": self.job, "chunk": client.new_chunk_id(), "start": 0, "count": 1},
                           payload)

    def on_frame(self, frame: Frame) -> None:
        if frame.op == "output":
            self.target.stream(frame.get("stream", "stdout"), frame.get("text", ""))
            return
        if frame.op == "result":
            try:
                offsets, values, problems = ser.unpack(frame, private=True)
            except Exception as exc:
                unreadable = SerializationError(f"the result of {self.item} could not be unpickled here: "
                                                f"{type(exc).__name__}: {exc}")
                self._settle(lambda f: f.set_exception(unreadable))
                return
            if values:
                self._settle(lambda f: f.set_result(values[0]))
            elif problems:
                status, value = problems[0]
                error: NbParallelError
                if status == ser.RAISED:
                    error = make_task_error(value[0], self.sources.render(value[1]), None, self.item)
                else:
                    error = value
                self._settle(lambda f: f.set_exception(error))
        elif frame.op == "crashed":
            crash = crash_error(frame, None, self.item)
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
        if self.client.dead is None:
            try:
                self.client.send({"op": "cancel", "job": self.job})
            except SidecarDied:
                pass
        self._end(True)

    def _end(self, send: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.client.unregister(self.job)
        if send and self.client.dead is None:
            try:
                self.client.send({"op": "end", "job": self.job})
            except SidecarDied:
                pass


def _check_argument(value: Any, where: str) -> None:
    error = ser.pickling_error(value)
    if error is not None:
        raise SerializationError(
            f"{where} ({ser.describe(value)}, a {type(value).__name__}) cannot be sent to a worker: "
            f"{ser.why(error)}"
        ) from error


def _call_label(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """How errors name a submitted call: ``fn(1, key='x')``, each argument a short repr."""
    name = getattr(fn, "__name__", None) or getattr(fn, "__qualname__", None) or type(fn).__name__
    if not args and not kwargs and not name.isidentifier() and name != "<lambda>":
        return str(name)  # an object that names itself, e.g. a %%parallel --bg cell: "%%parallel"
    shown = [ser.describe(arg) for arg in args[:6]]
    shown += [f"{key}={ser.describe(arg)}" for key, arg in list(kwargs.items())[:6]]
    if len(args) > 6 or len(kwargs) > 6:
        shown.append("...")
    return f"{name}({', '.join(shown)})"


def _describe_call(fn: Callable[..., Any]) -> str:
    return f"submit({getattr(fn, '__qualname__', type(fn).__name__)})"


def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
    """Run ``fn(*args, **kwargs)`` in a worker; return a ``concurrent.futures.Future``."""
    future = Task(fn, args, kwargs, 0, None).future
    track_future(future, _describe_call(fn))
    return future


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` on the shared sidecar.

    ``max_workers`` caps how many of its tasks run at once (None: every worker of the pool).
    ``map`` streams lazily and chunks like ``nbparallel.imap``.
    """

    def __init__(self, max_workers: int | None = None) -> None:
        self._limit = config.resolve_workers(max_workers) if max_workers is not None else 0
        self._group = new_group()
        self._futures: set[cf.Future[Any]] = set()
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = Task(fn, args, kwargs, self._limit, self._group).future
            self._futures.add(future)
        track_future(future, _describe_call(fn))
        future.add_done_callback(self._forget)  # outside the lock: it runs at once if already done
        return future

    def _forget(self, future: cf.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | str = "auto",
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``: results in order; an exception is raised when
        its item is reached; ``timeout`` counts from this call."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        return imap_in_order(fn, iterables, workers=self._limit or None, chunksize=chunksize, timeout=timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._futures)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            cf.wait(pending)
