"""The errors ProcessPoolExecutor reports as a broken pool: WorkerCrashed and MemoryLimitExceeded
(the worker died), ResultUnreadable (a result that cannot be unpickled here), InitializerFailed.

They are also ``concurrent.futures.process.BrokenProcessPool``, so code written for
ProcessPoolExecutor catches them; here the pool itself stays whole (the worker is replaced). Apart
from errors.py because importing that base costs ~30 ms and 2.6 MB, which the sidecar and the
workers, who never raise these, should not pay.
"""

from __future__ import annotations

import signal
from concurrent.futures.process import BrokenProcessPool

from .errors import NbParallelError, Unreadable, which_item

__all__ = ["WorkerCrashed", "MemoryLimitExceeded", "ResultUnreadable", "InitializerFailed", "describe_exit"]


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


class WorkerCrashed(NbParallelError, BrokenProcessPool):
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
        if cause is not None and worker is None and not pid:  # the sidecar: no worker could even start
            message = f"{which_item(index, item)} could not run: {cause}"
        elif cause is not None:  # a Dask cluster says what happened in its own terms
            last = f" (last on the Dask worker {worker})" if worker else ""
            message = f"{which_item(index, item)} was lost on the Dask cluster{last}: {cause}."
        else:
            mem = f"; last seen using {memory / 2**20:.0f} MiB" if memory else ""
            hint = " If the item needs much memory, use fewer workers or set memory_limit=." if self.signal == "SIGKILL" else ""
            tries = f" (tried {attempts} times)" if attempts > 1 else ""
            message = (f"the worker (pid {pid}) running {which_item(index, item)} died{tries}: {exit_cause}{mem}. "
                       f"The worker was replaced.{hint}")
        super().__init__(message, index=index, item=item)


class MemoryLimitExceeded(WorkerCrashed):
    """The worker passed ``memory_limit`` and was killed before the machine ran short."""

    def __init__(self, *, index: int | None = None, item: str | None = None, pid: int | None = None,
                 limit: int = 0, memory: int = 0, attempts: int = 1):
        NbParallelError.__init__(
            self,
            f"{which_item(index, item)} made its worker (pid {pid}) use {memory / 2**20:.0f} MiB, past the "
            f"memory_limit of {limit / 2**20:.0f} MiB; the worker was killed and replaced"
            f"{f' (tried {attempts} times)' if attempts > 1 else ''}. Give it a higher memory_limit, or "
            "split the item.",
            index=index,
            item=item,
        )
        self.exitcode, self.signal = None, "SIGKILL"
        self.pid, self.memory, self.limit, self.attempts = pid, memory, limit, attempts


class ResultUnreadable(Unreadable, BrokenProcessPool):
    """A task's input could not be unpickled in its worker, or its result in the kernel (its class is
    not importable there, or unpickling it raised, SystemExit included). Only that item fails (or,
    when a whole result frame cannot be read, that frame's items); the message says why."""


class InitializerFailed(NbParallelError, BrokenProcessPool):
    """An ``Executor``'s ``initializer`` (or a joblib call's) raised in a worker: that executor is
    broken, as a ProcessPoolExecutor is (its pending tasks fail with this, and it takes no more).
    The message names the initializer's exception; ``remote_traceback`` is its traceback."""

    #: What the initializer raised, in words ("the initializer setup raised ValueError: ...").
    reason: str = ""
