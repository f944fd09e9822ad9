"""Misuse of the API: calls from many threads at once, from callbacks, from inside tasks (nested),
inside the input of another call; shutdown and configure while a call runs."""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from _support import descendants, leaves_nothing, pool, two_workers  # two_workers: the pool they run on

import nbparallel
from nbparallel.errors import SidecarDied

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("two_workers")]


def square(x: int) -> int:
    return x * x


def test_many_threads_map_at_once() -> None:
    results: dict[int, list[int]] = {}

    def run(k: int) -> None:
        results[k] = nbparallel.map(lambda x: x + k, range(300), progress=False)

    with leaves_nothing():
        threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert {k: v for k, v in results.items()} == {k: [x + k for x in range(300)] for k in range(6)}


def _nested(x: int) -> dict[str, Any]:
    import nbparallel as nbp

    inner = nbp.map(lambda y: y * 10, range(x + 1), progress=False)
    unordered = sorted(nbp.imap(lambda y: -y, range(3), ordered=False, progress=False))
    submitted = nbp.submit(pow, 2, x).result()
    with nbp.Executor(max_workers=4) as executor:
        mapped = list(executor.map(square, range(3)))
    errors = nbp.map(lambda y: 1 // (y - 1), range(3), errors="return", progress=False)
    return {"inner": inner, "unordered": unordered, "submitted": submitted, "mapped": mapped,
            "error": type(errors[1]).__name__, "children": len(psutil.Process().children(recursive=True)),
            "pid": os.getpid(), "runner": nbp.status()["pid"]}


def test_nested_calls_run_in_the_calling_worker_and_never_multiply_processes() -> None:
    with leaves_nothing() as base:
        before = len(descendants())
        out = nbparallel.map(_nested, range(4), progress=False)
        assert len(descendants()) == before
    for x, got in enumerate(out):
        assert got["inner"] == [y * 10 for y in range(x + 1)]
        assert got["unordered"] == [-2, -1, 0]
        assert got["submitted"] == 2 ** x
        assert got["mapped"] == [0, 1, 4]
        assert got["error"] == "ZeroDivisionError"
        assert got["children"] == 0, "a nested call started processes"
        assert got["pid"] in base.workers and got["runner"] == got["pid"]


def test_a_nested_call_whose_item_raises_fails_the_outer_item() -> None:
    def outer(x: int) -> int:
        import nbparallel as nbp

        return sum(nbp.map(lambda y: 1 // (y - x), range(3), progress=False))

    results = nbparallel.map(outer, range(5), errors="return", progress=False)
    assert [type(r).__name__ if isinstance(r, BaseException) else r for r in results] == [
        "ZeroDivisionError", "ZeroDivisionError", "ZeroDivisionError", -3, -3]


def test_map_in_a_done_callback_neither_deadlocks_nor_loses_results() -> None:
    got: list[Any] = []
    finished = threading.Event()

    def callback(future: cf.Future[Any]) -> None:
        try:
            got.append(nbparallel.map(square, range(future.result()), progress=False))
        except BaseException as exc:  # a clear refusal would do too: never a hang
            got.append(exc)
        finished.set()

    future = nbparallel.submit(len, "abcde")
    future.add_done_callback(callback)
    assert finished.wait(30), "map in a done-callback hung"
    assert got[0] == [0, 1, 4, 9, 16] or isinstance(got[0], Exception)


def test_an_input_that_itself_calls_map() -> None:
    def items() -> Iterator[int]:
        for k in range(3):
            yield sum(nbparallel.map(square, range(k + 2), progress=False))

    assert nbparallel.map(lambda x: x + 1, items(), progress=False) == [2, 6, 15]


def test_shutdown_from_another_thread_mid_call() -> None:
    threading.Thread(target=lambda: (time.sleep(0.4), nbparallel.shutdown()), daemon=True).start()

    def slow(x: int) -> int:
        time.sleep(0.01)
        return x

    with pytest.raises(SidecarDied) as caught:
        nbparallel.map(slow, range(3000), progress=False)
    completed = getattr(caught.value, "completed", {})
    assert all(v == i for i, v in completed.items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nbparallel.map(square, range(4), progress=False) == [0, 1, 4, 9]
    nbparallel.configure(workers=2)


def test_configure_from_another_thread_mid_call() -> None:
    def slow(x: int) -> int:
        time.sleep(0.005)
        return x

    def reconfigure() -> None:
        time.sleep(0.2)
        nbparallel.configure(workers=3)
        time.sleep(0.2)
        nbparallel.configure(workers=2)

    thread = threading.Thread(target=reconfigure)
    thread.start()
    assert nbparallel.map(slow, range(400), progress=False) == list(range(400))
    thread.join()
    _, workers = pool()
    assert len(workers) == 2


def test_one_imap_consumed_from_two_threads() -> None:
    iterator = nbparallel.imap(square, range(500), progress=False)
    seen: list[int] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for value in iterator:
                seen.append(value)
        except ValueError as exc:  # "generator already executing": the other thread has it
            errors.append(exc)

    threads = [threading.Thread(target=consume) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(seen) == len(set(seen)) and set(seen) <= {x * x for x in range(500)}
    if not errors:
        assert sorted(seen) == sorted(x * x for x in range(500))
