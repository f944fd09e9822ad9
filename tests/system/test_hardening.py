"""Limits and hostile input: every case ends in the right outcome, and nothing leaks after it."""

from __future__ import annotations

import glob
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbparallel
from nbparallel.crashes import MemoryLimitExceeded, WorkerCrashed
from nbparallel.errors import TaskError, TaskTimeout, details
from nbparallel.payload import placement


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _pool_snapshot() -> dict[str, Any]:
    status = nbparallel.status()
    return {
        "sidecar": status["pid"],
        "sidecar_fds": _fds(status["pid"]),
        "workers": len(status["workers"]),
        "my_fds": _fds(os.getpid()),
        "shm": sorted(glob.glob("/dev/shm/*nbp*")),
    }


@pytest.fixture
def leak_check() -> Iterator[None]:
    """After the test: same sidecar, pool back to size, no fd or /dev/shm segment leaked."""
    before = _pool_snapshot()
    yield
    placement.clear()  # segments the kernel pools for its next calls (bounded, given back in 30 s) are no leak
    deadline = time.monotonic() + 10
    while True:
        after = _pool_snapshot()
        same = (after["workers"] == before["workers"] and after["sidecar_fds"] <= before["sidecar_fds"]
                and after["my_fds"] <= before["my_fds"] and after["shm"] == before["shm"])
        if same or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["sidecar"] == before["sidecar"], "the sidecar was replaced"
    assert after["workers"] == before["workers"], (before, after)
    assert after["sidecar_fds"] <= before["sidecar_fds"], (before, after)
    assert after["my_fds"] <= before["my_fds"], (before, after)
    assert after["shm"] == before["shm"], (before, after)


def _sleep_at(bad: int, seconds: float) -> Callable[[int], int]:
    def task(x: int) -> int:
        if x == bad:
            time.sleep(seconds)
        return x

    return task


def _stop_self_at(bad: int) -> Callable[[int], int]:
    def task(x: int) -> int:
        if x == bad:
            os.kill(os.getpid(), signal.SIGSTOP)  # frozen: only the timeout can end it
        return x

    return task


def _hog_at(bad: int) -> Callable[[int], int]:
    def task(x: int) -> int:
        if x == bad:
            block = bytearray(300 * 2**20)
            time.sleep(3)
            return len(block)
        return x

    return task


def _exit_at(bad: int) -> Callable[[int], int]:
    def task(x: int) -> int:
        if x == bad:
            sys.exit("leaving")
        return x

    return task


def _chatty(x: int) -> int:
    print("x" * 100_000)
    return x


FAULTS: list[tuple[str, Callable[[int], int], dict[str, Any], type]] = [
    ("timeout", _sleep_at(2, 30), {"timeout": 1}, TaskTimeout),
    ("sigstop past timeout", _stop_self_at(2), {"timeout": 1}, TaskTimeout),
    ("memory limit", _hog_at(2), {"memory_limit": "150MB"}, MemoryLimitExceeded),
    ("sys.exit", _exit_at(2), {}, SystemExit),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name, fn, options, expected", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_table(leak_check: None, name: str, fn: Callable[[int], int], options: dict[str, Any],
                     expected: type) -> None:
    started = time.monotonic()
    results = nbparallel.map(fn, range(6), chunksize=1, errors="return", **options)
    assert isinstance(results[2], expected), results[2]
    assert details(results[2]).index == 2  # type: ignore[union-attr]
    assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]
    assert time.monotonic() - started < 30


@pytest.mark.timeout(90)
def test_retries_rerun_crashed_items_on_a_fresh_worker(leak_check: None, tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"

    def crash_once(x: int) -> int:
        if x == 1 and not marker.exists():
            marker.touch()
            os._exit(1)
        return x * 2

    assert nbparallel.map(crash_once, range(4), chunksize=1, retries=1) == [0, 2, 4, 6]
    results = nbparallel.map(_exit_code_always, range(3), chunksize=1, retries=2, errors="return")
    assert isinstance(results[1], WorkerCrashed) and results[1].attempts == 3
    assert "tried 3 times" in str(results[1])


def _exit_code_always(x: int) -> int:
    if x == 1:
        os._exit(5)
    return x


def test_retry_on_only_the_named_exceptions(tmp_path: Path) -> None:
    counter = tmp_path / "calls"

    def flaky(x: int) -> int:
        with counter.open("a") as f:
            f.write(".")
        if len(counter.read_text()) < 3:
            raise ConnectionError("try again")
        return x

    assert nbparallel.map(flaky, [7], retries=5, retry_on=ConnectionError) == [7]
    assert len(counter.read_text()) == 3
    results = nbparallel.map(int, ["x"], retries=5, retry_on=ConnectionError, errors="return")
    assert isinstance(results[0], ValueError) and details(results[0]).attempts == 1, "a plain bug is not retried"  # type: ignore[union-attr]


def test_total_timeout_returns_or_raises_with_what_finished() -> None:
    slow = _sleep_at(5, 30)
    results = nbparallel.map(slow, range(8), chunksize=1, total_timeout=1.5, errors="return")
    assert isinstance(results[5], TaskTimeout)
    assert [results[i] for i in (0, 1, 2, 3, 4)] == [0, 1, 2, 3, 4]
    with pytest.raises(TaskTimeout) as caught:
        nbparallel.map(slow, range(8), chunksize=1, total_timeout=1.5)
    assert caught.value.completed and 5 not in caught.value.completed


def test_max_tasks_per_worker_recycles(leak_check: None) -> None:
    try:
        nbparallel.configure(max_tasks_per_worker=5)
        pids = set(nbparallel.map(lambda _: (time.sleep(0.01), os.getpid())[1], range(40), chunksize=1))
        assert len(pids) >= 4, pids
    finally:
        nbparallel.configure(max_tasks_per_worker=None)


def test_bad_limits_are_clear() -> None:
    with pytest.raises(ValueError, match="timeout"):
        nbparallel.map(abs, [1], timeout=-1)
    with pytest.raises(ValueError, match="retries"):
        nbparallel.map(abs, [1], retries=-1)
    with pytest.raises(TypeError, match="retry_on"):
        nbparallel.map(abs, [1], retry_on="ConnectionError")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory size"):
        nbparallel.map(abs, [1], memory_limit="lots")
    with pytest.raises(ValueError, match="total_timeout"):
        nbparallel.map(abs, [1], total_timeout=0)


@pytest.mark.timeout(90)
def test_huge_result_and_huge_argument(leak_check: None) -> None:
    sizes = nbparallel.map(lambda n: b"\x01" * n, [150 * 2**20, 10])
    assert [len(s) for s in sizes] == [150 * 2**20, 10]
    assert nbparallel.map(len, [b"\x02" * (100 * 2**20)]) == [100 * 2**20]
    # Big pickle streams travel in shared memory too: the sidecar never holds the megabytes.
    assert nbparallel.status()["rss_peak"] < 30 * 2**20


def test_megabytes_of_worker_output_are_capped(capsys: pytest.CaptureFixture[str]) -> None:
    assert nbparallel.map(_chatty, range(40), chunksize=1) == list(range(40))
    out, err = capsys.readouterr()
    assert len(out) < 3 * 2**20
    assert "output is dropped" in err


def test_exception_class_the_kernel_cannot_import(tmp_path: Path) -> None:
    module = tmp_path / "only_in_worker_mod.py"
    module.write_text("class Hidden(Exception):\n    pass\n")
    folder = str(tmp_path)

    def raise_hidden(x: int) -> int:
        sys.path.insert(0, folder)
        import only_in_worker_mod  # type: ignore[import-not-found]

        raise only_in_worker_mod.Hidden(x)

    results = nbparallel.map(raise_hidden, [1, 2], chunksize=1, errors="return")
    assert all(isinstance(r, TaskError) for r in results), results  # what is known of it: type, message, traceback
    assert results[0].type_name == "only_in_worker_mod.Hidden" and results[0].message == "1"
    assert "No module named 'only_in_worker_mod'" in str(results[0]) and "raise_hidden" in results[0].remote_traceback


@pytest.mark.timeout(180)
def test_two_hundred_calls_leak_nothing(leak_check: None) -> None:
    for k in range(200):
        assert nbparallel.map(abs, [-k, k]) == [k, k]


def test_the_channel_is_private() -> None:
    sidecar = psutil.Process(nbparallel.status()["pid"])
    kinds = {c.type for c in sidecar.net_connections(kind="inet")}
    assert not kinds, "no TCP or UDP socket for local work"
    tmpdir = nbparallel.status()["tmpdir"]
    if hasattr(os, "memfd_create"):
        assert tmpdir is None, "with memfd the sidecar writes no file at all"
    else:
        assert os.stat(tmpdir).st_mode & 0o777 == 0o700, "our temp directory is private"
        assert os.listdir(tmpdir) == [], "slot files are unlinked as soon as they are made"


# -- property: every item ends in exactly one outcome, and every good result arrives -------------

KINDS = st.sampled_from(["ok", "ok", "ok", "raise", "exit", "slow"])


def _mixed(plan: tuple[str, ...]) -> Callable[[int], int]:
    def task(i: int) -> int:
        kind = plan[i]
        if kind == "raise":
            raise ArithmeticError(i)
        if kind == "exit":
            os._exit(7)
        if kind == "slow":
            time.sleep(0.05)
        return i * 3

    return task


@pytest.mark.timeout(300)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(KINDS, min_size=0, max_size=25), chunksize=st.sampled_from([1, 3, "auto"]),
       ordered=st.booleans())
def test_every_item_ends_in_exactly_one_outcome(plan: list[str], chunksize: Any, ordered: bool) -> None:
    frozen = tuple(plan)
    if ordered:
        results = nbparallel.map(_mixed(frozen), range(len(frozen)), chunksize=chunksize, errors="return")
        assert len(results) == len(frozen)
        for i, (kind, result) in enumerate(zip(frozen, results)):
            expected = {"raise": ArithmeticError, "exit": WorkerCrashed}.get(kind)
            if expected is None:
                assert result == i * 3
            else:
                assert isinstance(result, expected) and details(result).index == i  # type: ignore[union-attr]
    else:
        seen = list(nbparallel.imap(_mixed(frozen), range(len(frozen)), ordered=False, chunksize=chunksize,
                                    errors="return"))
        assert len(seen) == len(frozen)
        good = sorted(r for r in seen if isinstance(r, int))
        assert good == sorted(i * 3 for i, k in enumerate(frozen) if k in ("ok", "slow"))
        failures = sorted(details(r).index for r in seen if not isinstance(r, int))  # type: ignore[union-attr]
        assert failures == [i for i, k in enumerate(frozen) if k in ("raise", "exit")]


def test_a_thread_in_the_caller_can_map_too() -> None:
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(nbparallel.map(abs, [-1, -2])))
    thread.start()
    thread.join(30)
    assert box == [[1, 2]]
