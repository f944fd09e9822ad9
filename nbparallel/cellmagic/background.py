"""``%%parallel --bg`` jobs: the cell's future, its status line, and its names coming back.

No IPython here. A job publishes into the cell that started it, from the client's reader thread,
through that cell's ``CellTarget`` (kernel/output.py), as the workers' prints do.
"""

from __future__ import annotations

import ast
import itertools
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

from ..errors import details
from ..payload import pickling as ser
from ..kernel.output import CellTarget
from ..kernel.tasks import stop


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
        """The error as the cell's error output: the remote traceback for what the cell raised."""
        found = details(error)
        remote = found.remote_traceback if found is not None else ""
        lines = remote.rstrip().splitlines() if remote else traceback.format_exception_only(type(error), error)
        try:
            text = str(error)
        except Exception:  # the cell's exception, with a broken __str__
            text = ""
        if not self.target.error(type(error).__name__, text, lines):
            print("\n".join(line.rstrip("\n") for line in lines), file=sys.stderr, flush=True)


def shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters at a word boundary, with an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > width // 2 else cut).rstrip(" ,;:(") + "…"


def first_statement(cell: str) -> str:
    """The cell's first line that does something: not blank, a comment or an import."""
    lines = [line.strip() for line in cell.splitlines() if line.strip() and not line.strip().startswith("#")]
    for line in lines:
        if not line.startswith(("import ", "from ")):
            return line
    return lines[0] if lines else ""


def imported_names(cell: str) -> set[str]:
    """The names the cell's import statements bind (a module is no result worth naming)."""
    try:
        tree = ast.parse(cell)
    except SyntaxError:
        return set()
    return {(alias.asname or alias.name).partition(".")[0] for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}


def describe_cell(cell: str, assigns: list[str]) -> str:
    """How a ``--bg`` cell is named: the names it assigns (what the user waits for), else its first
    statement: ``model, history = …`` rather than its first import."""
    modules = imported_names(cell)
    results = [name for name in assigns if name not in modules]
    if results:
        return shorten(", ".join(results), 60) + " = …"
    return shorten(first_statement(cell), 60)


class BackgroundJob:
    """One ``%%parallel --bg`` cell: its future, and where its names and output go."""

    def __init__(self, future: Future[Any], number: int, cell: str, namespace: dict[str, Any],
                 out: str | None, assigns: list[str] | None = None) -> None:
        self.future = future
        self.number = number
        self.will_assign = list(assigns or [])  # names the cell assigns (what comes back if it ends well)
        self.first_line = describe_cell(cell, self.will_assign)
        self.namespace = namespace
        self.out = out
        self.cell = CellOutput()
        self.started = time.monotonic()
        self.wall_started = time.time()
        self.ended: float | None = None
        self.state = "running"  # then "done", "failed" or "cancelled"
        self.assigned: list[str] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()  # set after the names are in place, unlike the future
        self.waited = False  # reported by %nbparallel wait

    def describe(self, *, clock: bool = True) -> str:
        """One line on the job. ``clock=False`` while it runs: a line that stays on screen must not
        show a time that stops (the cell's status line; its widget has the live clock)."""
        if self.state == "running" and not clock:
            return (f"nbparallel job {self.number}: running in the background since "
                    f"{time.strftime('%H:%M:%S', time.localtime(self.wall_started))}; "
                    f"%nbparallel wait {self.number} waits for it")
        seconds = (self.ended or time.monotonic()) - self.started
        text = f"nbparallel job {self.number}: {self.state} ({seconds:.1f} s)"
        if self.state == "done":
            where = f" into {self.out}" if self.out else ""
            text += f"; assigned{where}: {', '.join(self.assigned) or 'nothing'}"
        elif self.state == "failed" and self.error is not None:
            text += f": {type(self.error).__name__}"
        return text

    def finish(self, future: Future[Any]) -> None:
        """Done callback (a callback thread, or the caller of cancel)."""
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


def start(future: Future[Any], cell: str, namespace: dict[str, Any], out: str | None,
          assigns: list[str] | None = None) -> BackgroundJob:
    """Follow ``future`` (a ``submit`` of the cell): show its status, copy its names back when done."""
    job = BackgroundJob(future, next(_numbers), cell, namespace, out, assigns)
    job.cell.status(job.describe(clock=False))  # shown before the done callback can update it
    jobs[job.number] = job
    future.add_done_callback(job.finish)
    return job


def assigning(name: str) -> BackgroundJob | None:
    """A job still running that will assign ``name`` in the notebook when it ends (None if none)."""
    for job in reversed(list(jobs.values())):
        if not job.finished.is_set() and (job.out == name or (not job.out and name in job.will_assign)):
            return job
    return None


def not_yet_assigned(name: str) -> str | None:
    """The hint for a NameError on ``name``, when a running ``--bg`` job will assign it."""
    job = assigning(name)
    if job is None:
        return None
    return (f"nbparallel: {name!r} is not defined yet: background job {job.number} ({job.first_line}) assigns it "
            f"when it finishes, and is still running. Wait for it first: %nbparallel wait {job.number}")


def cancel_running() -> None:
    """Cancel every job still running (before the pool is stopped, so they read "cancelled")."""
    for job in jobs.values():
        if not job.finished.is_set():
            stop(job.future)  # running or not


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
