"""Hostile objects at every stage: pickling and unpickling the function, the items, the results and
the exceptions, in the kernel and in the worker; raising anything, hanging, huge. Each one costs its
own item its outcome (or, for the function, the call before anything runs), never another's."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _support import leaves_nothing, two_workers  # two_workers: the pool they run on

import nbparallel
from nbparallel.crashes import WorkerCrashed
from nbparallel.errors import SerializationError, TaskTimeout

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("two_workers")]

IN_WORKER = "NBPARALLEL_POOL"  # set in the workers' environment, not in the kernel's


def in_worker() -> bool:
    return IN_WORKER in os.environ


def do(action: str) -> Any:
    """What a hostile object does when it is (un)pickled somewhere it should not be."""
    if action == "raise":
        raise ValueError("hostile")
    if action == "exit":
        sys.exit(7)
    if action == "interrupt":
        raise KeyboardInterrupt("hostile")
    if action == "base":
        raise GeneratorExit("hostile")
    if action == "die":
        os._exit(9)
    if action == "hang":
        time.sleep(3600)
    raise AssertionError(action)


class PickleHostile:
    """Raises (or worse) when pickled: in the kernel (``where="kernel"``) or in a worker."""

    def __init__(self, action: str, where: str, value: int = 0) -> None:
        self.action, self.where, self.value = action, where, value

    def __reduce__(self) -> Any:
        if (self.where == "worker") == in_worker():
            do(self.action)
        return (PickleHostile, (self.action, self.where, self.value))


def _load_hostile(action: str, where: str, value: int) -> Any:
    if (where == "worker") == in_worker():
        do(action)
    return LoadHostile(action, where, value)


class LoadHostile:
    """Pickles fine; unpickling it runs ``action`` in the kernel or in a worker."""

    def __init__(self, action: str, where: str, value: int = 0) -> None:
        self.action, self.where, self.value = action, where, value

    def __reduce__(self) -> Any:
        return (_load_hostile, (self.action, self.where, self.value))


# -- the function -------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["raise", "exit", "base"])
def test_a_function_that_cannot_be_pickled_fails_before_anything_runs(action: str) -> None:
    hostile = PickleHostile(action, "kernel")

    def fn(x: int) -> Any:
        return hostile, x

    with leaves_nothing():
        with pytest.raises(SerializationError, match="cannot be sent to the workers"):
            nbparallel.map(fn, range(3), progress=False)


@pytest.mark.parametrize("action", ["raise", "exit", "base", "die"])
def test_a_function_that_cannot_be_unpickled_in_the_worker_fails_every_item_once(action: str) -> None:
    hostile = LoadHostile(action, "worker")

    def fn(x: int) -> Any:
        return hostile.value + x

    with leaves_nothing():
        started = time.monotonic()
        results = nbparallel.map(fn, range(300), errors="return", progress=False)
        expected = WorkerCrashed if action == "die" else SerializationError
        assert len(results) == 300 and all(isinstance(r, expected) for r in results), results
        assert time.monotonic() - started < 15  # not two dead workers per chunk


# -- the items ----------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["raise", "exit", "base"])
def test_an_item_that_cannot_be_pickled_fails_alone(action: str) -> None:
    items: list[Any] = list(range(50))
    items[17] = PickleHostile(action, "kernel")
    with leaves_nothing():
        results = nbparallel.map(lambda x: x, items, errors="return", chunksize=10, progress=False)
        assert isinstance(results[17], SerializationError) and results[17].index == 17
        assert [r for i, r in enumerate(results) if i != 17] == [i for i in range(50) if i != 17]
        with pytest.raises(SerializationError) as caught:
            nbparallel.map(lambda x: x, items, chunksize=10, progress=False)
        assert caught.value.index == 17


@pytest.mark.parametrize("action", ["raise", "exit", "interrupt", "base"])
def test_an_item_that_cannot_be_unpickled_in_the_worker_fails_alone(action: str) -> None:
    items: list[Any] = list(range(40))
    items[9] = LoadHostile(action, "worker", 9)
    with leaves_nothing():
        results = nbparallel.map(lambda x: x, items, errors="return", chunksize=40, progress=False)
        assert isinstance(results[9], SerializationError) and results[9].index == 9
        assert [r for i, r in enumerate(results) if i != 9] == [i for i in range(40) if i != 9]


def test_an_item_whose_unpickling_kills_the_worker_fails_its_chunk_with_workercrashed() -> None:
    """No item was running: the chunk runs again once, then what is left of it fails."""
    items: list[Any] = list(range(20))
    items[4] = LoadHostile("die", "worker", 4)
    with leaves_nothing():
        results = nbparallel.map(lambda x: x, items, errors="return", chunksize=5, progress=False)
        assert all(isinstance(results[i], WorkerCrashed) for i in range(5)), results[:5]
        assert results[5:] == list(range(5, 20))


def test_an_item_whose_unpickling_hangs_is_ended_by_total_timeout() -> None:
    items: list[Any] = list(range(8))
    items[0] = LoadHostile("hang", "worker")
    with leaves_nothing():
        # 8 s: the other items, on the other worker, finish well within it on a loaded machine (3 s
        # did not once, with three test processes on 2 cores)
        results = nbparallel.map(lambda x: x, items, errors="return", chunksize=1, total_timeout=8, progress=False)
        assert isinstance(results[0], TaskTimeout)
        assert results[1:] == list(range(1, 8))


# -- the results --------------------------------------------------------------------------------


RAISED_BY = {"raise": SerializationError, "exit": SystemExit, "interrupt": KeyboardInterrupt, "base": GeneratorExit}


@pytest.mark.parametrize("action", ["raise", "exit", "interrupt", "base"])
def test_a_result_that_cannot_be_pickled_in_the_worker_fails_alone(action: str) -> None:
    """An Exception while pickling a result is a SerializationError of its item; SystemExit and the
    like are the item's outcome themselves (as ProcessPoolExecutor reports them)."""

    def fn(x: int) -> Any:
        return PickleHostile(action, "worker") if x == 6 else x

    with leaves_nothing():
        results = nbparallel.map(fn, range(30), errors="return", chunksize=30, progress=False)
        assert isinstance(results[6], RAISED_BY[action]), results[6]
        assert [r for i, r in enumerate(results) if i != 6] == [i for i in range(30) if i != 6]


@pytest.mark.parametrize("action", ["raise", "exit", "interrupt", "base"])
def test_a_result_that_cannot_be_unpickled_in_the_kernel_fails_alone(action: str) -> None:
    def fn(x: int) -> Any:
        return LoadHostile(action, "kernel", x) if x % 50 == 6 else x

    with leaves_nothing():
        results = nbparallel.map(fn, range(400), errors="return", chunksize=200, progress=False)
        for index, outcome in enumerate(results):
            if index % 50 == 6:
                assert isinstance(outcome, SerializationError) and outcome.index == index, outcome
            else:
                assert outcome == index


def test_a_result_of_a_class_only_the_worker_can_import_fails_alone(tmp_path: Path) -> None:
    (tmp_path / "workeronly_mod.py").write_text("class Thing:\n    def __init__(self, v):\n        self.v = v\n")
    folder = str(tmp_path)

    def fn(x: int) -> Any:
        if x == 11:
            sys.path.insert(0, folder)
            import workeronly_mod  # type: ignore[import-not-found]

            return workeronly_mod.Thing(x)
        return x

    results = nbparallel.map(fn, range(300), errors="return", chunksize=300, progress=False)
    assert isinstance(results[11], SerializationError) and "workeronly_mod" in str(results[11])
    assert [r for i, r in enumerate(results) if i != 11] == [i for i in range(300) if i != 11]


def test_a_huge_result_and_a_huge_item_travel() -> None:
    big = b"x" * (64 * 2**20)
    with leaves_nothing():
        sizes = nbparallel.map(len, [big, b"small", big], progress=False)
        assert sizes == [len(big), 5, len(big)]
        out = nbparallel.map(lambda n: "é" * n, [3, 20 * 2**20], progress=False)
        assert out[0] == "ééé" and len(out[1]) == 20 * 2**20


# -- the exceptions -----------------------------------------------------------------------------


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class HostileReduce(Exception):
    def __reduce__(self) -> Any:
        sys.exit(3)


class LoadsBadlyInKernel(Exception):
    def __reduce__(self) -> Any:
        return (_load_hostile, ("raise", "kernel", 0))


@pytest.mark.parametrize("cls", [Unpicklable, HostileReduce, LoadsBadlyInKernel])
def test_an_exception_that_cannot_travel_still_fails_its_item_and_says_what_it_was(cls: type) -> None:
    def fn(x: int) -> int:
        if x == 2:
            raise cls(f"bad {x}")
        return x

    with leaves_nothing():
        results = nbparallel.map(fn, range(10), errors="return", chunksize=10, progress=False)
        assert isinstance(results[2], BaseException)
        assert cls.__name__ in f"{type(results[2]).__name__} {results[2]!r} {results[2]}"
        assert [r for i, r in enumerate(results) if i != 2] == [i for i in range(10) if i != 2]


def test_an_item_whose_repr_raises_is_still_named() -> None:
    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    items = [1, BadRepr(), 3]
    results = nbparallel.map(lambda x: 1 / 0 if not isinstance(x, int) else x, items, errors="return",
                             progress=False)
    assert results[0] == 1 and results[2] == 3 and isinstance(results[1], ZeroDivisionError)
