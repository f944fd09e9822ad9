"""``%%parallel --bg`` jobs: the cell's future, its status line, and its names coming back.

No IPython here. A job publishes into the cell that started it, from the client's reader thread,
through that cell's ``CellTarget`` (kernel/output.py), as the workers' prints do.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from ..payload import pickling as ser
from ..kernel.output import CellTarget


class CellOutput:
    """Publishes into the cell that was running when this was made, from any thread later.

    In a kernel it goes to that cell (its ``CellTarget``); elsewhere (terminal IPython, a script)
    it prints.
    """

    def __init__(self) -> None:
        self.target = CellTarget.capture()
        self.display_id = uuid.uuid4().hex

    def stream(self, name: str, text: str) -> None:
        """Lines on stdout or stderr: the same route as the workers' prints."""
        self.target.stream(name, text)

    def status(self, text: str, *, update: bool = False) -> None:
        """Show (or replace) this cell's one-line status."""
        if not self.target.display({"text/plain": text}, {}, self.display_id, update=update):
            print(text, flush=True)

    def error(self, error: BaseException) -> None:
        """The error as the cell's error output: the remote traceback for a task error."""
        render = getattr(error, "_render_traceback_", None)
        lines = render() if render is not None else traceback.format_exception_only(type(error), error)
        original = _original(error)
        if not self.target.error(type(original).__name__, str(original), lines):
            print("\n".join(line.rstrip("\n") for line in lines), file=sys.stderr, flush=True)


def _original(error: BaseException) -> BaseException:
    """What the cell raised, for a TaskError (whose own type name is "TaskError")."""
    return getattr(error, "exception", error)


class BackgroundJob:
    """One ``%%parallel --bg`` cell: its future, and where its names and output go."""

    def __init__(self, future: Future[Any], number: int, cell: str, namespace: dict[str, Any],
                 out: str | None) -> None:
        self.future = future
        self.number = number
        self.first_line = next((line.strip() for line in cell.splitlines() if line.strip()), "")
        self.namespace = namespace
        self.out = out
        self.cell = CellOutput()
        self.started = time.monotonic()
        self.ended: float | None = None
        self.state = "running"  # then "done", "failed" or "cancelled"
        self.assigned: list[str] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()  # set after the names are in place, unlike the future
        self.waited = False  # reported by %nbparallel wait

    def describe(self) -> str:
        seconds = (self.ended or time.monotonic()) - self.started
        text = f"nbparallel job {self.number}: {self.state} ({seconds:.1f} s)"
        if self.state == "done":
            where = f" into {self.out}" if self.out else ""
            text += f"; assigned{where}: {', '.join(self.assigned) or 'nothing'}"
        elif self.state == "failed" and self.error is not None:
            text += f": {type(_original(self.error)).__name__}"
        return text

    def finish(self, future: Future[Any]) -> None:
        """Done callback (the client's reader thread, or the caller of cancel)."""
        try:
            if future.cancelled():
                self.state = "cancelled"
            elif (error := future.exception()) is not None:
                self.state, self.error = "failed", error
                self.cell.error(error)
            else:
                blob, skipped = future.result()
                names: dict[str, Any] = ser.loads(blob)
                if self.out:
                    self.namespace[self.out] = SimpleNamespace(**names)
                else:
                    self.namespace.update(names)
                self.assigned = list(names)
                for name, why in skipped.items():
                    self.cell.stream("stderr", f"nbparallel: {name} was not copied back: {why}\n")
                self.state = "done"
        except BaseException as exc:  # an exception here would only reach a logger
            self.state, self.error = "failed", exc
            self.cell.error(exc)
        finally:
            self.ended = time.monotonic()
            self.cell.status(self.describe(), update=True)
            self.finished.set()


#: every job of this process, by number
jobs: dict[int, BackgroundJob] = {}
_numbers = itertools.count(1)


def start(future: Future[Any], cell: str, namespace: dict[str, Any], out: str | None) -> BackgroundJob:
    """Follow ``future`` (a ``submit`` of the cell): show its status, copy its names back when done."""
    job = BackgroundJob(future, next(_numbers), cell, namespace, out)
    job.cell.status(job.describe())  # shown before the done callback can update it
    jobs[job.number] = job
    future.add_done_callback(job.finish)
    return job


def cancel_running() -> None:
    """Cancel every job still running (before the pool is stopped, so they read "cancelled")."""
    for job in jobs.values():
        if not job.finished.is_set():
            job.future.cancel()


def wait(chosen: list[BackgroundJob]) -> None:
    """Wait for those jobs, print how each ended, and raise the first failure."""
    for job in chosen:
        while not job.finished.wait(0.1):  # short waits keep the stop button working
            pass
        job.waited = True
        print(job.describe())
    for job in chosen:
        if job.state == "failed" and job.error is not None:
            raise job.error
