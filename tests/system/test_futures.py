"""submit and Executor: real concurrent.futures objects on the shared sidecar."""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest

import nbparallel
from nbparallel.crashes import WorkerCrashed
from nbparallel.errors import details


def test_submit_returns_a_real_future() -> None:
    future = nbparallel.submit(divmod, 17, 5)
    assert isinstance(future, cf.Future)
    assert future.result(timeout=30) == (3, 2)


def test_submit_keywords_and_closures() -> None:
    scale = 3

    def f(a: int, *, b: int = 0) -> int:
        return (a + b) * scale

    assert nbparallel.submit(f, 1, b=2).result(timeout=30) == 9


def test_submit_exception_is_the_original_type() -> None:
    future = nbparallel.submit(int, "not a number")
    with pytest.raises(ValueError) as caught:
        future.result(timeout=30)
    assert type(caught.value) is ValueError
    assert "invalid literal" in str(caught.value)
    found = details(caught.value)
    assert found is not None and found.index is None and found.item == "int('not a number')"


def test_submit_crash() -> None:
    future = nbparallel.submit(os._exit, 9)
    error = future.exception(timeout=30)
    assert isinstance(error, WorkerCrashed) and error.exitcode == 9


def test_as_completed_and_wait_work() -> None:
    futures = [nbparallel.submit(time.sleep, d) for d in (0.3, 0.0, 0.1)]
    done = list(cf.as_completed(futures, timeout=30))
    assert set(done) == set(futures)
    finished, pending = cf.wait(futures, timeout=30)
    assert not pending


@pytest.mark.timeout(60)
def test_stop_stops_a_running_task_which_cancel_leaves_alone() -> None:
    future = nbparallel.submit(time.sleep, 60)
    deadline = time.monotonic() + 10
    while not any(w["state"] == "busy" for w in nbparallel.status()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert future.running()
    assert not future.cancel()  # concurrent.futures: a running future cannot be cancelled
    assert future.stop()
    assert future.cancelled()
    # The worker that ran it was killed and replaced: nothing stays busy.
    deadline = time.monotonic() + 10
    while any(w["state"] == "busy" for w in nbparallel.status()["workers"]):
        assert time.monotonic() < deadline, "the cancelled task is still running"
        time.sleep(0.05)
    assert nbparallel.submit(abs, -4).result(timeout=30) == 4


def test_executor_is_a_real_executor() -> None:
    with nbparallel.Executor(max_workers=2) as pool:
        assert isinstance(pool, cf.Executor)
        futures = [pool.submit(pow, 2, k) for k in range(10)]
        assert list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]
        assert list(pool.map(pow, [2, 3], [3, 2])) == [8, 9]
    assert [f.result() for f in futures] == [2**k for k in range(10)]
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, 1)


def test_executor_map_raises_in_order_and_honours_timeout() -> None:
    def maybe(x: int) -> int:
        if x == 2:
            raise KeyError(x)
        return x

    with nbparallel.Executor() as pool:
        results = pool.map(maybe, range(5))
        assert next(results) == 0
        assert next(results) == 1
        with pytest.raises(KeyError):
            next(results)
        with pytest.raises(cf.TimeoutError):
            list(pool.map(time.sleep, [5, 5], timeout=0.5))


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures() -> None:
    pool = nbparallel.Executor(max_workers=1)
    futures = [pool.submit(time.sleep, 0.5) for _ in range(6)]
    started = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - started < 5
    assert all(f.done() for f in futures)
    assert any(f.cancelled() for f in futures)


def test_max_workers_caps_the_executor() -> None:
    def span(_: int) -> tuple[float, float]:
        began = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes on one machine
        time.sleep(0.1)
        return began, time.monotonic()

    with nbparallel.Executor(max_workers=1) as pool:
        spans = sorted(f.result() for f in [pool.submit(span, i) for i in range(4)])
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.005, f"two tasks overlapped: {spans}"
