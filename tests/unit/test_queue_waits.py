"""Waits on the kernel's queues end when they should, even when nothing is ever put again.

CPython's SimpleQueue before 3.13 can block past a short timeout until the next put (a timeout of 0
on Python 3.10, a few microseconds on 3.10 to 3.12: kernel/feeding.py's ``get_within`` says why).
Past a call's deadline nothing more is put, so an imap over an infinite input with total_timeout
waited forever (tests/adversarial/test_inputs.py::test_an_infinite_input_with_total_timeout, on the
lowest leg). Without processes: the waits never hand SimpleQueue.get a short blocking timeout, and
a stress run on a real queue never blocks.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from nbparallel.kernel import mapping
from nbparallel.kernel.feeding import SHORTEST_WAIT, Feeder, get_within


class Recording:
    """A queue that is always empty and records how it was asked: (block, timeout). It raises Empty
    at once, so a wait on it spins until its deadline, asking for ever shorter timeouts."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, float | None]] = []

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self.calls.append((block, timeout))
        raise queue.Empty

    def put(self, item: Any) -> None:
        pass  # dropped: the tests here only wait

    def unsafe(self) -> list[tuple[bool, float | None]]:
        """The calls that could block past their time on CPython < 3.13: short blocking timeouts."""
        return [(block, t) for block, t in self.calls if block and (t is None or t < SHORTEST_WAIT)]


@pytest.mark.parametrize("timeout", [0.0, -1.0, 1e-9, 1e-6, SHORTEST_WAIT / 2])
def test_get_within_never_asks_for_a_short_blocking_wait(timeout: float) -> None:
    source = Recording()
    with pytest.raises(queue.Empty):
        get_within(source, timeout)  # type: ignore[arg-type]  # duck-typed like a SimpleQueue
    assert source.calls and not source.unsafe()
    assert source.calls == [(False, None)] if timeout <= 0 else [(True, SHORTEST_WAIT)]


def test_a_wait_past_the_deadline_times_out_without_blocking() -> None:
    """MapRun.wait between the deadline and the end of its grace: it used to call
    ``events.get(timeout=0.0)``, which on Python 3.10 can block until a frame comes, and none does."""
    run = mapping.MapRun.__new__(mapping.MapRun)  # only what wait() reads
    run.events = Recording()  # type: ignore[assignment]
    run.client = SimpleNamespace(dead=None)  # type: ignore[assignment]
    run.deadline = time.monotonic() - 0.01  # just past, within DRAIN_GRACE
    with pytest.raises(cf.TimeoutError):
        run.wait()
    assert run.events.calls and not run.events.unsafe()  # type: ignore[attr-defined]
    run.deadline = time.monotonic() + 0.002  # a sliver of time left: waited with a floor, then times out
    with pytest.raises(cf.TimeoutError):
        run.wait()
    assert not run.events.unsafe()  # type: ignore[attr-defined]


def test_the_feeder_never_asks_for_a_short_blocking_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = threading.Event()

    def blocking() -> Any:
        blocked.wait()  # an input that blocks: only the deadline ends the take
        yield 0

    feeder = Feeder(blocking())
    answers = Recording()
    monkeypatch.setattr(feeder, "answers", answers)
    with pytest.raises(cf.TimeoutError):
        feeder.take(5, time.monotonic() + 0.1)
    assert answers.calls and not answers.unsafe()
    blocked.set()
    feeder.close()


def test_get_within_returns_at_once_on_an_empty_queue_however_often() -> None:
    """A stress run on a real SimpleQueue: each time its internal lock is free (an item was just
    taken), a wait of 0 must raise Empty at once. ``source.get(timeout=0.0)`` does not on Python
    3.10: some thousand calls in, one blocks until the next put (here the watchdog's)."""
    source: queue.SimpleQueue[object] = queue.SimpleQueue()
    wake = object()
    stop = threading.Event()

    def watchdog() -> None:
        while not stop.wait(0.5):
            source.put(wake)

    threading.Thread(target=watchdog, name="queue-watchdog", daemon=True).start()
    stuck: list[float] = []
    try:
        ends = time.monotonic() + 1.5
        while time.monotonic() < ends and not stuck:
            for _ in range(2000):
                source.put(1)
                source.get()  # leaves the queue's lock free: what the bug needs
                started = time.monotonic()
                try:
                    if get_within(source, 0.0) is wake and time.monotonic() - started > 0.2:
                        stuck.append(time.monotonic() - started)
                except queue.Empty:
                    pass
    finally:
        stop.set()
    assert not stuck, f"a wait of 0 blocked for {stuck[0]:.2f} s, until the next put"

