"""Reading a call's input: a few items at a time, as the workers need them.

In the caller's thread, unless the call has a deadline (``total_timeout``, ``Executor.map``'s
``timeout``): then on a thread of its own, so an input that blocks (a queue, a socket, a slow
generator) cannot keep the call waiting past it. Such a thread is left where the input blocks it,
and stops when the input yields or ends; what it read then is dropped, as the call is over.
Ctrl-C reaches the caller either way (a wait here is interruptible).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

WAIT_SLICE = 0.25  # seconds: how often a wait for the reading thread looks at the clock
PAUSE = 0.02  # seconds without a new item after which the items read so far are taken as they are
SHORTEST_WAIT = 0.01  # seconds: a shorter blocking wait on a queue waits this long (see get_within)

T = TypeVar("T")

Taken = tuple[list[Any], BaseException | None]  # the items read, and what the input raised, if it did


def get_within(source: queue.SimpleQueue[T], timeout: float) -> T:
    """``source.get(timeout=timeout)``, sure to return or raise ``queue.Empty`` within
    ``max(timeout, SHORTEST_WAIT)`` seconds even if nothing is ever put again; ``timeout <= 0``:
    without blocking.

    CPython's SimpleQueue before 3.13 (Modules/_queuemodule.c) takes its internal lock on an empty
    queue, then computes the time left again; when the deadline passed in between (a timeout of 0
    on Python 3.10, a few microseconds on 3.10 to 3.12, with the thread preempted or slow there),
    the time left is negative, which the lock takes as "no limit": the get returns only at the next
    put. Past a call's deadline nothing more is put, so the caller waited forever (an imap over an
    infinite input with total_timeout; on 3.10 one get(timeout=0) in 10,000 to 50,000 on an idle
    machine, more often under load). A get that must not block does no time arithmetic at all
    (``block=False``), and a shorter wait is lengthened, so that only a preemption longer than
    SHORTEST_WAIT, at that very instruction, could still do it."""
    if timeout <= 0:
        return source.get(block=False)
    return source.get(timeout=max(timeout, SHORTEST_WAIT))


class Feeder:
    """Takes items from an iterator; see the module's doc."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items = items
        self.thread: threading.Thread | None = None
        self.requests: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        # From the reading thread: ("item", x) for each item read, then ("done", None) once a request
        # is met or the input ended, or ("error", what it raised).
        self.answers: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.asked = False  # a request is out to the thread, not yet met

    def take(self, count: int, deadline: float | None) -> Taken:
        """Up to ``count`` items (fewer at the input's end), and what the input raised, if it did:
        the items read before it are kept. At ``deadline`` (``time.monotonic()``), the items read so
        far, or, if there are none, ``TimeoutError``; the items read so far also when the input pauses."""
        if deadline is None and self.thread is None:
            return self.read(count)
        if self.thread is None:
            self.thread = threading.Thread(target=self.serve, name="nbparallel-input", daemon=True)
            self.thread.start()
        if not self.asked:
            self.requests.put(count)
            self.asked = True
        items: list[Any] = []
        while True:
            timeout = WAIT_SLICE
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    if items:
                        return items, None
                    raise cf.TimeoutError("the input gave no item before the deadline")
            if items:  # an input that pauses: the workers get what came so far (the request stays out)
                timeout = min(timeout, PAUSE)
            try:
                kind, value = get_within(self.answers, timeout)
            except queue.Empty:
                if items:
                    return items, None
                continue
            if kind == "item":
                items.append(value)
                continue
            self.asked = False
            return items, value if kind == "error" else None

    def read(self, count: int) -> Taken:
        """In the caller's thread."""
        items: list[Any] = []
        try:
            items.extend(itertools.islice(self.items, count))  # keeps what it got if the input raises
        except KeyboardInterrupt:  # Ctrl-C while the input ran
            raise
        except BaseException as error:
            return items, error
        return items, None

    def serve(self) -> None:
        answer = self.answers.put
        while True:
            count = self.requests.get()
            if count is None:
                return
            try:
                for item in itertools.islice(self.items, count):
                    answer(("item", item))
            except BaseException as error:  # KeyboardInterrupt too: no Ctrl-C lands in this thread
                answer(("error", error))
            else:
                answer(("done", None))

    def close(self) -> None:
        """The call is over: the reading thread stops once the input lets it."""
        if self.thread is not None:
            self.requests.put(None)
