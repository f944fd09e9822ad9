"""The crash table: every way a task can go wrong ends in the right outcome, never a hang."""

from __future__ import annotations

import ctypes
import sys
import os
import signal
import threading
import time
import warnings
from typing import Any

import pytest

import nbparallel
from nbparallel.crashes import WorkerCrashed
from nbparallel.errors import RemoteTraceback, SerializationError, SidecarDied, TaskError, details


def _fail_at(bad: int, how: str) -> Any:
    def task(x: int) -> Any:
        if x == bad:
            if how == "raise":
                raise ValueError(f"bad item {x}")
            if how == "segfault":
                ctypes.string_at(0)
            if how == "exit":
                os._exit(3)
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "sys.exit":
                import sys

                sys.exit(4)
            if how == "unpicklable result":
                return threading.Lock()
        return x * 10

    return task


CASES = [
    ("raise", ValueError, "bad item 3"),
    ("segfault", WorkerCrashed, "SIGSEGV|segmentation fault"),
    ("exit", WorkerCrashed, "status 3"),
    ("sigkill", WorkerCrashed, "SIGKILL"),
    ("sys.exit", SystemExit, "4"),
    ("unpicklable result", SerializationError, "cannot be sent back"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, expected, message", CASES, ids=[c[0] for c in CASES])
def test_one_bad_item_fails_alone(how: str, expected: type, message: str) -> None:
    results = nbparallel.map(_fail_at(3, how), range(40), errors="return")
    assert isinstance(results[3], expected)
    found = details(results[3])
    assert found is not None and found.index == 3
    import re

    assert re.search(message, str(results[3]) + repr(results[3])), str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [x * 10 for x in range(40) if x != 3]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how, expected, message", CASES, ids=[c[0] for c in CASES])
def test_errors_raise_stops_and_keeps_completed(how: str, expected: type, message: str) -> None:
    with pytest.raises(expected) as caught:
        nbparallel.map(_fail_at(3, how), range(40), chunksize=1)
    found = details(caught.value)
    assert found is not None and found.index == 3
    assert all(found.completed[i] == i * 10 for i in found.completed)
    assert 3 not in found.completed
    # The pool is whole again and the next call works at once.
    assert nbparallel.map(abs, [-1, -2]) == [1, 2]


def test_task_error_keeps_type_traceback_and_item() -> None:
    def parse(text: str) -> int:
        return int(text)

    with pytest.raises(ValueError) as caught:
        nbparallel.map(parse, ["1", "2", "x3"])
    error = caught.value
    assert type(error) is ValueError and error.args == ("invalid literal for int() with base 10: 'x3'",)
    found = details(error)
    assert isinstance(found, RemoteTraceback) and error.__cause__ is found  # as concurrent.futures chains it
    assert found.index == 2 and found.item == "'x3'" and found.attempts == 1
    assert "return int(text)" in found.remote_traceback and "return int(text)" in found.tb
    assert "worker.py" not in found.remote_traceback, "our own frames are noise to the user"
    assert found.completed == {0: 1, 1: 2}
    assert any("item 2" in note for note in getattr(error, "__notes__", [])) or sys.version_info < (3, 11)
    assert "item 2" in found.tb or sys.version_info >= (3, 11)


def test_crash_inside_a_big_chunk_blames_only_that_item() -> None:
    results = nbparallel.map(_fail_at(500, "exit"), range(1000), chunksize=1000, errors="return")
    assert isinstance(results[500], WorkerCrashed)
    assert results[500].exitcode == 3
    assert [r for i, r in enumerate(results) if i != 500] == [x * 10 for x in range(1000) if x != 500]


@pytest.mark.timeout(60)
def test_worker_killed_from_outside() -> None:
    def sleepy(x: int) -> int:
        time.sleep(30 if x == 0 else 0.01)
        return x

    def kill_busy_worker() -> None:
        for _ in range(100):
            busy = [w for w in nbparallel.status()["workers"] if w["index"] == 0]
            if busy:
                os.kill(busy[0]["pid"], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_busy_worker)
    killer.start()
    results = nbparallel.map(sleepy, range(6), chunksize=1, errors="return")
    killer.join()
    assert isinstance(results[0], WorkerCrashed) and results[0].signal == "SIGKILL"
    assert results[1:] == [1, 2, 3, 4, 5]


def test_unpicklable_function_fails_before_anything_runs() -> None:
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    before = nbparallel.status()["workers"]
    with pytest.raises(SerializationError, match="closure variable 'lock'"):
        nbparallel.map(uses_lock, range(3))
    assert sum(w["tasks_done"] for w in nbparallel.status()["workers"]) == sum(w["tasks_done"] for w in before)


def test_unpicklable_item_is_named() -> None:
    with pytest.raises(SerializationError, match=r"item 2 .*cannot be sent") as caught:
        nbparallel.map(id, [1, 2, threading.Lock()])
    assert caught.value.index == 2


class _OtherInit(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickling calls __init__ with args=(message,) only
        super().__init__(f"{a}-{b}")
        self.a = a


def test_an_exception_whose_init_takes_other_arguments_is_rebuilt() -> None:
    def boom(x: int) -> None:
        raise _OtherInit(x, 1)

    [error] = nbparallel.map(boom, [1], errors="return")
    assert type(error) is _OtherInit and error.args == ("1-1",) and error.a == 1


def _only_in(pid: int) -> Exception:
    if os.getpid() != pid:
        raise RuntimeError("this exception can be rebuilt in its worker only")
    return KeyError("rebuilt")


class _WorkerOnly(Exception):
    def __reduce__(self) -> tuple[Any, ...]:
        return (_only_in, (os.getpid(),))


def test_an_exception_that_cannot_be_rebuilt_here_is_a_task_error() -> None:
    def boom(x: int) -> None:
        raise _WorkerOnly("in the worker")

    [error] = nbparallel.map(boom, [1], errors="return")
    assert isinstance(error, TaskError)
    assert error.type_name.endswith("_WorkerOnly") and error.message == "in the worker"
    assert "this exception can be rebuilt in its worker only" in str(error)
    assert "raise _WorkerOnly" in error.remote_traceback and details(error) is error
    assert error.index == 0


@pytest.mark.timeout(60)
def test_sidecar_killed_mid_call_gives_sidecar_died_and_next_call_recovers() -> None:
    sidecar = nbparallel.status()["pid"]

    def slow(x: int) -> int:
        time.sleep(0.05)
        return x

    threading.Timer(0.5, os.kill, (sidecar, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(SidecarDied) as caught:
        nbparallel.map(slow, range(200), chunksize=1)
    assert time.monotonic() - started < 10
    assert caught.value.completed, "results that had arrived are kept"
    assert all(caught.value.completed[i] == i for i in caught.value.completed)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert nbparallel.map(abs, [-5]) == [5]
    assert any("started a new one" in str(w.message) for w in seen)
    assert nbparallel.status()["pid"] != sidecar


def test_crashes_and_pickling_errors_are_what_process_pool_code_catches() -> None:
    import pickle
    from concurrent.futures.process import BrokenProcessPool

    [crashed] = nbparallel.map(_fail_at(0, "exit"), [0], errors="return")
    assert isinstance(crashed, WorkerCrashed) and isinstance(crashed, BrokenProcessPool)
    with pytest.raises(pickle.PicklingError):
        nbparallel.map(lambda x: x, [threading.Lock()])
    assert nbparallel.map(abs, [-1, -2]) == [1, 2], "the pool itself stays whole"


def test_the_sidecar_and_workers_do_not_pay_for_the_crash_types() -> None:
    import subprocess

    code = ("import sys, nbparallel.errors, nbparallel.worker.loop, nbparallel.sidecar.loop\n"
            "print('concurrent.futures.process' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
