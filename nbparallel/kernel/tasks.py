"""One submitted call on the kernel side: a job of one item, and the Future it settles.

What ``submit``, ``Executor.submit`` and the joblib backend's batches are made of. The Future is a
real ``concurrent.futures.Future`` that keeps its contract: PENDING while queued, RUNNING once the
runner says a worker started it (``started``), then FINISHED; ``cancel()`` only cancels it while
pending. ``TaskFuture.stop()`` also stops one that is running: the runner kills the worker running
it and starts another. The job itself (opening it, reading its outcome) is jobs.py's; outcomes are
read and futures settled on the results thread, callbacks run on callback threads (delivery.py):
never on the client's reader thread, whatever the user's code does.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any

from ..errors import SerializationError, SidecarDied
from ..payload import pickling as ser
from ..wire import messages as msg
from ..wire.frames import Frame
from . import delivery
from .jobs import Job
from .output import CellTarget, flush_std
from .runner import current_client, get_client

_group_numbers = itertools.count(1)


def new_group() -> int:
    """A fresh group number: tasks of one group share one cap on running tasks (``limit``)."""
    return next(_group_numbers)


class TaskFuture(cf.Future):  # type: ignore[type-arg]  # Future is generic only in stubs
    """A ``concurrent.futures.Future`` of a task running in nbparallel's workers.

    As the standard library's, ``cancel()`` cancels a task that has not started and returns False
    once it runs. ``stop()`` stops it in either case: a running task's worker is killed (and
    replaced), and the future is cancelled."""

    _task: Task | None = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        with self._condition:
            # Waiters in concurrent.futures.wait/as_completed only hear of it once notified.
            if self._state == CANCELLED:
                self.set_running_or_notify_cancel()
        if self._task is not None:
            self._task.abandon()  # dropped from the queue (killed if it started meanwhile)
        return True

    def stop(self) -> bool:
        """Cancel the task whatever its state: queued, it is dropped; running, its worker is killed
        and replaced. The future is then cancelled. False if it had finished already."""
        if self.cancel():
            return True
        with self._condition:
            if self._state != RUNNING:
                return self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        if self._task is not None:
            self._task.abandon()
        self._invoke_callbacks()
        return True

    def _invoke_callbacks(self) -> None:
        if not self._done_callbacks:  # type: ignore[attr-defined]  # a private list of Future's
            return
        # Settled by nbparallel's own thread: the callbacks run on a thread of their own (delivery.py).
        delivery.run_callbacks(super()._invoke_callbacks)  # type: ignore[misc]


def catch_up_with_runner(timeout: float = 2.0) -> None:
    """Return once the runner has said which of the tasks sent so far it handed to workers (their
    ``started`` notices are read): two round trips, since the runner schedules what it read after
    answering the first. For ``Executor.shutdown(cancel_futures=True)``: it cancels what no worker
    has been given, not merely what this side has not heard about yet."""
    client = current_client()
    if client is None or client.dead is not None:
        return
    for _ in range(2):
        try:
            client.ask_status(timeout)
        except (SidecarDied, TimeoutError):  # gone or slow: cancel what is known to be pending
            return


def stop(future: cf.Future[Any]) -> bool:
    """Stop ``future``'s task wherever it is (``TaskFuture.stop``); a future of another kind is
    cancelled (``cancel()``). False if it had finished."""
    if isinstance(future, TaskFuture):
        return future.stop()
    return future.cancel()


class Task:
    """One submitted call: its job in the runner and the Future it settles."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 limit: int, group: int | None, *, target: CellTarget | None = None, label: str | None = None,
                 max_tasks: int | None = None, on_error: Callable[[BaseException], None] | None = None) -> None:
        """``target``: where worker output goes (default: the cell running now); ``label``: how errors
        name the task (default: its arguments). The joblib backend sets both: it submits from a
        callback thread, on behalf of the cell that started the joblib call. ``max_tasks``: a
        worker is replaced after that many tasks of ``group`` (an Executor's max_tasks_per_child).
        ``on_error(exception)``: called when the future fails, before its callbacks, on the thread
        that settles it (ours: it must not block). Raises RuntimeError once the interpreter is
        shutting down."""
        check_accepting()
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
        self.on_error = on_error
        flush_std()
        engine.route(self)
        engine.open(limit=limit, group=group, report_started=True, max_tasks=max_tasks)
        engine.send_chunk(0, 1, payload)

    def describe(self, index: int) -> str:
        return self.item

    # -- the reader thread: route, never run the user's code ------------------------------------

    def on_frame(self, frame: Frame) -> None:
        if frame.op == "output":
            out = msg.view(frame, msg.Output)
            self.target.stream(out.get("stream", "stdout"), out.get("text", ""))
        elif frame.op == "display":
            self.target.show_frame(frame, tagged=False)
        elif frame.op == "started":
            self.started()
        elif frame.op in ("result", "crashed"):
            delivery.deliver(lambda: self.read(frame))
        else:
            ser.close_fds(frame)

    def on_died(self, error: SidecarDied) -> None:
        failure = SidecarDied(str(error))
        delivery.deliver(lambda: self._settle(lambda f: f.set_exception(failure), send_end=False))

    def started(self) -> None:
        """A worker started the task: PENDING becomes RUNNING (a cancelled future stays cancelled)."""
        future = self.future
        with future._condition:
            if future._state == PENDING:
                future.set_running_or_notify_cancel()

    # -- the results thread ----------------------------------------------------------------------

    def read(self, frame: Frame) -> None:
        """Settle the future with the outcome ``frame`` carries; whatever reading it raises (a
        result whose unpickling calls ``sys.exit``) fails this future alone."""
        try:
            if frame.op == "crashed":
                error = next(iter(self.engine.crashed(frame, self.describe).values()))
                self._settle(lambda f: f.set_exception(error))
                return
            batch = self.engine.outcomes(frame, 0, self.describe)
        except BaseException as exc:
            unreadable = self.engine.unreadable(exc, 0, self.describe)
            self._settle(lambda f: f.set_exception(unreadable))
            return
        if batch.values:
            value = batch.values[0]
            self._settle(lambda f: f.set_result(value))
        elif batch.errors:
            failure = next(iter(batch.errors.values()))
            self._settle(lambda f: f.set_exception(failure))

    def _settle(self, how: Callable[[cf.Future[Any]], None], send_end: bool = True) -> None:
        future = self.future
        with self.settled:
            if not future.done():
                try:
                    how(future)
                except cf.InvalidStateError:  # cancelled in the meantime
                    pass
                else:
                    failed = future._exception if future._state == FINISHED else None
                    if failed is not None and self.on_error is not None:
                        self.on_error(failed)
        self._end(send_end)

    # -- any thread ------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Settle the future with ``error`` now and drop the task (an Executor that broke)."""
        self.engine.cancel()
        self._settle(lambda f: f.set_exception(error))

    def abandon(self) -> None:
        """Stop the task wherever it is (``TaskFuture.cancel`` and ``stop``): dropped, or its worker killed."""
        self.engine.cancel()
        self._end(True)

    def _end(self, send: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.engine.end(send=send)
        if self.future.done():
            self.future._task = None  # nothing left to stop; the function and its arguments may go


# -- the interpreter's exit ------------------------------------------------------------------------

_exit_lock = threading.Lock()
_exiting = False
# An Executor's futures: the interpreter waits for those pending (their tasks hold them; a weak set,
# so that a result is the caller's alone once it has it).
_awaited: weakref.WeakSet[cf.Future[Any]] = weakref.WeakSet()


def await_at_exit(future: cf.Future[Any]) -> None:
    """Have the interpreter wait for ``future`` before it exits, as it waits for the futures of a
    concurrent.futures executor."""
    with _exit_lock:
        _awaited.add(future)


def check_accepting() -> None:
    """Raise RuntimeError once the interpreter is shutting down, as concurrent.futures does."""
    with _exit_lock:
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")


def _wait_at_exit() -> None:
    # Before atexit handlers (which stop the sidecar), as concurrent.futures waits for its workers.
    global _exiting
    with _exit_lock:
        _exiting = True
        pending = [future for future in list(_awaited) if not future.done()]
    if pending:
        cf.wait(pending)


def _forget_after_fork() -> None:
    global _exit_lock
    _exit_lock = threading.Lock()
    _awaited.clear()  # the parent's futures: this process waits for none of them


getattr(threading, "_register_atexit")(_wait_at_exit)  # concurrent.futures' own hook (3.9+)
os.register_at_fork(after_in_child=_forget_after_fork)


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
