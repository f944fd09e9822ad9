"""Where a submitted task's outcome is read and its future settled, and where done-callbacks run:
never on the client's reader thread.

The reader thread only routes frames. Reading a result runs the user's code (a ``__reduce__``, a
``__setstate__``), and so does a done-callback; either may block, or raise anything. So results are
read on one ``nbparallel-results`` thread, in the order they arrived, and the callbacks of the
futures it settles run on ``nbparallel-callbacks`` threads: a callback that waits for another
future blocks neither the reading of frames nor the delivery of results (another callback thread
starts while every one is busy, up to ``MAX_CALLBACK_THREADS``). A future settled by the user's own
thread (``cancel()``) runs its callbacks there, as concurrent.futures does.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from collections.abc import Callable

IDLE_EXIT = 5.0  # seconds an idle thread waits for work before it ends
MAX_CALLBACK_THREADS = 32


class Lane:
    """Runs the callables given to ``put`` on daemon threads of its own, started as needed: at most
    ``threads`` at once (one: in the order they were put)."""

    def __init__(self, name: str, threads: int, *, internal: bool) -> None:
        self.name = name
        self.limit = threads
        self.internal = internal  # its threads run no user code that may block (see is_internal)
        self.queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0
        self.idle = 0
        self.waiting = 0  # put, not yet taken

    def put(self, work: Callable[[], None]) -> None:
        self.queue.put(work)
        with self.lock:
            self.waiting += 1
            if self.waiting <= self.idle or self.threads >= self.limit:
                return
            self.threads += 1
        try:
            threading.Thread(target=self._run, name=self.name, daemon=True).start()
        except RuntimeError:
            # Python 3.12 starts no thread once the interpreter is shutting down, while the exit
            # still waits for pending futures (tasks.py): their results are read here instead.
            with self.lock:
                self.threads -= 1
            self._run_here()

    def _run_here(self) -> None:
        while True:
            try:
                work = self.queue.get_nowait()
            except queue.Empty:
                return
            with self.lock:
                self.waiting -= 1
            self._call(work)

    def _call(self, work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException:  # a bug of ours (the work catches what the user's code raises)
            print(f"nbparallel: internal error on {self.name}:\n{traceback.format_exc()}", file=sys.stderr)

    def _run(self) -> None:
        _internal.flag = self.internal
        while True:
            with self.lock:
                self.idle += 1
            try:
                work = self.queue.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self.lock:
                    self.idle -= 1
                    if self.waiting == 0:
                        self.threads -= 1
                        return
                continue
            with self.lock:
                self.idle -= 1
                self.waiting -= 1
            self._call(work)
            work = _done  # the future it settled, and its result, are the caller's alone now


_internal = threading.local()


def _done() -> None:
    pass


def mark_internal() -> None:
    """Say that the calling thread is one of nbparallel's own (the client's reader thread)."""
    _internal.flag = True


def is_internal() -> bool:
    """Whether the calling thread is one of nbparallel's own: no user code may block it."""
    return bool(getattr(_internal, "flag", False))


results = Lane("nbparallel-results", 1, internal=True)
callbacks = Lane("nbparallel-callbacks", MAX_CALLBACK_THREADS, internal=False)


def deliver(work: Callable[[], None]) -> None:
    """Read a result or settle a future on the results thread (in the order given)."""
    results.put(work)


def run_callbacks(invoke: Callable[[], None]) -> None:
    """Run a settled future's callbacks (``invoke`` calls them all, in order): on a callback
    thread when nbparallel's own thread settled it, else right here."""
    if is_internal():
        callbacks.put(invoke)
    else:
        invoke()


def _after_fork() -> None:
    # The threads did not survive the fork: new lanes start their own when needed.
    global results, callbacks
    results = Lane("nbparallel-results", 1, internal=True)
    callbacks = Lane("nbparallel-callbacks", MAX_CALLBACK_THREADS, internal=False)


os.register_at_fork(after_in_child=_after_fork)
