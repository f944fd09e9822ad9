"""Hostile inputs: iterators that raise, block, never end, or lie about their length. What
finished is never lost, and every item read gets exactly one outcome in its own place."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _support import leaves_nothing, two_workers  # two_workers: the pool they run on

import nbparallel
from nbparallel.errors import TaskTimeout

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("two_workers")]


class InputBroke(Exception):
    pass


def raising_at(n: int, bad: int) -> Iterator[int]:
    for i in range(n):
        if i == bad:
            raise InputBroke(f"the input broke at {i}")
        yield i


def completed_of(error: BaseException) -> dict[int, Any]:
    getter = getattr(nbparallel.errors, "completed_of", None)
    found = getter(error) if getter is not None else None
    return found if found is not None else getattr(error, "completed")


def double(x: int) -> int:
    return x * 2


@pytest.mark.parametrize("errors", ["raise", "return"])
def test_an_input_that_raises_keeps_every_finished_result(errors: str) -> None:
    with leaves_nothing():
        with pytest.raises(InputBroke) as caught:
            nbparallel.map(double, raising_at(1000, 500), errors=errors, progress=False)
        completed = completed_of(caught.value)
        assert completed and all(completed[i] == 2 * i for i in completed)
        assert set(completed) <= set(range(500))
        if errors == "return":  # every item read before the failure got its outcome
            assert set(completed) == set(range(500))


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("errors", ["raise", "return"])
def test_imap_yields_what_came_before_an_input_that_raises(ordered: bool, errors: str) -> None:
    seen: list[int] = []
    with pytest.raises(InputBroke):
        for value in nbparallel.imap(double, raising_at(300, 200), errors=errors, ordered=ordered, progress=False):
            seen.append(value)
    if errors == "return":
        assert sorted(seen) == [2 * i for i in range(200)]
    else:
        assert set(seen) <= {2 * i for i in range(200)}
    if ordered:
        assert seen == sorted(seen)


def test_an_input_that_raises_at_once() -> None:
    with pytest.raises(InputBroke):
        nbparallel.map(double, raising_at(10, 0), errors="return", progress=False)


def test_total_timeout_with_errors_return_gives_every_place_an_outcome() -> None:
    def slow(x: int) -> int:
        time.sleep(0.02)
        return x

    with leaves_nothing():
        results = nbparallel.map(slow, range(1000), errors="return", total_timeout=1, progress=False)
        assert len(results) == 1000
        done = [i for i, r in enumerate(results) if not isinstance(r, TaskTimeout)]
        assert done and all(results[i] == i for i in done)
        timed_out = [r for r in results if isinstance(r, TaskTimeout)]
        assert timed_out and all(results[r.index] is r for r in timed_out)
        for _ in range(3):  # results also arrive while the call is being cancelled: they count too
            unordered = nbparallel.map(slow, range(500), errors="return", total_timeout=0.7, ordered=False,
                                       progress=False)
            values = sorted(v for v in unordered if not isinstance(v, TaskTimeout))
            stopped = sorted(v.index for v in unordered if isinstance(v, TaskTimeout))
            assert len(unordered) == 500 and sorted(values + stopped) == list(range(500))


def blocks_after(n: int) -> Iterator[int]:
    yield from range(n)
    threading.Event().wait()  # forever


def test_total_timeout_holds_while_the_input_blocks() -> None:
    started = time.monotonic()
    results = nbparallel.map(double, blocks_after(50), errors="return", total_timeout=1.5, progress=False)
    assert time.monotonic() - started < 6
    assert results[:50] == [2 * i for i in range(50)] or all(r == 2 * i or isinstance(r, TaskTimeout)
                                                            for i, r in enumerate(results))
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as caught:
        nbparallel.map(double, blocks_after(20), total_timeout=1.5, progress=False)
    assert time.monotonic() - started < 6
    assert all(v == 2 * i for i, v in completed_of(caught.value).items())


def test_an_input_that_waits_on_a_queue_is_read_as_items_come() -> None:
    items: queue.Queue[int | None] = queue.Queue()

    def feed() -> None:
        for i in range(30):
            items.put(i)
            time.sleep(0.01)
        items.put(None)

    threading.Thread(target=feed, daemon=True).start()
    assert nbparallel.map(double, iter(items.get, None), total_timeout=30, progress=False) == [2 * i for i in range(30)]


def test_an_infinite_input_with_total_timeout() -> None:
    started = time.monotonic()
    results = nbparallel.map(double, itertools.count(), errors="return", total_timeout=1.5, progress=False)
    assert time.monotonic() - started < 10
    assert results and all(r == 2 * i or isinstance(r, TaskTimeout) for i, r in enumerate(results))
    seen = []
    with pytest.raises(TaskTimeout):
        for value in nbparallel.imap(double, itertools.count(), total_timeout=1, progress=False):
            seen.append(value)
    assert seen == [2 * i for i in range(len(seen))]


class LyingLength:
    """Says it has 100 items, has 10."""

    def __len__(self) -> int:
        return 100

    def __iter__(self) -> Iterator[int]:
        return iter(range(10))


def test_an_input_that_lies_about_its_length() -> None:
    assert nbparallel.map(double, LyingLength(), progress=False) == [2 * i for i in range(10)]


class LenRaises:
    def __len__(self) -> int:
        raise RuntimeError("no len")

    def __iter__(self) -> Iterator[int]:
        return iter(range(5))


def test_an_input_whose_len_raises() -> None:
    with pytest.raises(RuntimeError):
        nbparallel.map(double, LenRaises(), progress=False)


def test_several_inputs_of_which_one_raises() -> None:
    with pytest.raises(InputBroke) as caught:
        nbparallel.map(lambda a, b: a + b, range(100), raising_at(100, 40), errors="return", progress=False)
    assert completed_of(caught.value) == {i: 2 * i for i in range(40)}
