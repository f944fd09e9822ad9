"""Coroutine functions and IO-bound work (issue 16): an event loop in each worker with many items in
flight, ``concurrency``, ``rate``, per-item ``timeout`` (the coroutine is cancelled, not the worker),
retries with backoff, ``errors="return"``, the stop button, output tagged by item; submit, Executor,
joblib and a ``%%parallel`` cell with top-level ``await`` in a real kernel.

Times are measured against the clock with wide margins: the machine running the suite may be busy.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import nbparallel
from nbparallel.kernel.jobspec import Flow, parse_rate


async def span(x: int, delay: float = 0.1) -> tuple[int, float, float, int]:
    """Awaits ``delay``; returns (x, when it started, when it ended, the worker's pid)."""
    began = time.time()
    await asyncio.sleep(delay)
    return x, began, time.time(), os.getpid()


def info(error: BaseException) -> Any:
    """nbparallel's details of an error it handed over (index, attempts, completed)."""
    details = getattr(nbparallel.errors, "details", None)
    return details(error) if details is not None else error


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most spans open at one instant (an end at the same time as a start counts first)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def most_in_a_window(starts: list[float], window: float) -> int:
    starts = sorted(starts)
    return max(sum(1 for t in starts[i:] if t < first + window) for i, first in enumerate(starts))


def test_coroutines_run_many_at_once_and_keep_their_order() -> None:
    began = time.monotonic()
    results = nbparallel.map(span, range(200), [0.2] * 200, concurrency=100)
    elapsed = time.monotonic() - began
    assert [r[0] for r in results] == list(range(200))
    at_once = most_at_once([(r[1], r[2]) for r in results])
    assert 50 <= at_once <= 100, at_once
    assert elapsed < 4.0, f"{elapsed:.2f} s for 200 x 0.2 s at 100 in flight"  # one at a time: 40 s
    assert os.getpid() not in {r[3] for r in results}


def test_default_concurrency_is_64_across_the_call() -> None:
    results = nbparallel.map(span, range(160), [0.2] * 160)
    assert 32 <= most_at_once([(r[1], r[2]) for r in results]) <= 64


def test_concurrency_caps_items_in_flight_whatever_the_workers() -> None:
    began = time.monotonic()
    results = nbparallel.map(span, range(30), [0.05] * 30, concurrency=5, workers=4)
    assert most_at_once([(r[1], r[2]) for r in results]) <= 5
    assert time.monotonic() - began >= 0.25  # 30 items of 50 ms, 5 at a time


def test_imap_executor_and_submit_take_coroutines() -> None:
    assert sorted(r[0] for r in nbparallel.imap(span, range(50), ordered=False)) == list(range(50))
    assert [r[0] for r in nbparallel.imap(span, range(20), [0.01] * 20)] == list(range(20))
    with nbparallel.Executor(max_workers=2) as pool:
        assert [r[0] for r in pool.map(span, range(10))] == list(range(10))
        assert pool.submit(span, 7, delay=0.01).result()[0] == 7
    assert nbparallel.submit(span, 3).result()[0] == 3


async def flaky_value(x: int) -> int:
    await asyncio.sleep(0.01)
    if x % 7 == 3:
        raise ValueError(f"bad {x}")
    return x


def test_errors_return_and_raise() -> None:
    results = nbparallel.map(flaky_value, range(30), errors="return")
    for x, value in enumerate(results):
        if x % 7 == 3:
            assert isinstance(value, ValueError) and f"bad {x}" in str(value)
        else:
            assert value == x
    with pytest.raises(ValueError) as caught:
        nbparallel.map(flaky_value, range(30))
    assert info(caught.value).index in (3, 10, 17, 24)
    assert all(value == index for index, value in info(caught.value).completed.items())


def plain_returning_a_coroutine(x: int) -> Any:
    return span(x, 0.2)


def test_a_plain_function_returning_awaitables() -> None:
    assert [r[0] for r in nbparallel.map(lambda x: span(x, 0.01), range(10))] == list(range(10))
    began = time.monotonic()
    results = nbparallel.map(plain_returning_a_coroutine, range(60), concurrency=30)
    assert [r[0] for r in results] == list(range(60))
    assert most_at_once([(r[1], r[2]) for r in results]) > 5
    assert time.monotonic() - began < 5.0


async def slow_once(x: int, folder: str) -> int:
    """Item 1 hangs (until cancelled, which it notes in a file); the others are quick."""
    if x == 1:
        try:
            await asyncio.sleep(30)
        finally:
            Path(folder, "cancelled").write_text("yes")
    await asyncio.sleep(0.01)
    return os.getpid()


def test_timeout_cancels_the_coroutine_not_the_worker(tmp_path: Path) -> None:
    before = {w["pid"] for w in nbparallel.status()["workers"]}
    began = time.monotonic()
    results = nbparallel.map(slow_once, range(8), [str(tmp_path)] * 8, timeout=0.5, errors="return")
    assert time.monotonic() - began < 10
    error = results[1]
    assert isinstance(error, nbparallel.TaskTimeout), error
    assert error.index == 1 and error.limit == 0.5 and "coroutine was cancelled" in str(error)
    assert (tmp_path / "cancelled").read_text() == "yes"  # its finally block ran: it was cancelled
    pids = {pid for x, pid in enumerate(results) if x != 1}
    after = {w["pid"] for w in nbparallel.status()["workers"]}
    assert pids <= after and before <= after, "no worker was killed"


class Transient(Exception):
    """What a flaky service raises (an OSError subclass such as ConnectionError works as well)."""


async def attempt_logged(x: int, folder: str, failures: int, kind: str) -> int:
    """Fails its first ``failures`` attempts (Transient, or a timeout); logs each attempt."""
    log = Path(folder, f"{x}.log")
    with log.open("a") as out:
        out.write(f"{time.time()}\n")
    attempt = len(log.read_text().split())
    if attempt <= failures:
        if kind == "timeout":
            await asyncio.sleep(30)
        error = Transient(f"attempt {attempt}")
        if kind == "retry_after":
            error.retry_after = 0.7  # type: ignore[attr-defined]
        raise error
    return attempt


def attempt_times(folder: Path, x: int) -> list[float]:
    return [float(t) for t in (folder / f"{x}.log").read_text().split()]


def test_retries_back_off_exponentially_with_jitter(tmp_path: Path) -> None:
    results = nbparallel.map(attempt_logged, range(4), [str(tmp_path)] * 4, [2] * 4, ["error"] * 4,
                             retries=3, retry_on=Transient, backoff=0.2)
    assert results == [3, 3, 3, 3]
    for x in range(4):
        first, second, third = attempt_times(tmp_path, x)
        assert second - first >= 0.09  # 0.2 s x a random 50-100%
        assert third - second >= 0.19  # then doubled
    with pytest.raises(Transient) as caught:
        nbparallel.map(attempt_logged, [9], [str(tmp_path)], [5], ["error"], retries=1, retry_on=Transient,
                       backoff=0.01)
    assert info(caught.value).attempts == 2
    assert len(attempt_times(tmp_path, 9)) == 2


def test_a_retry_after_carried_by_the_exception_is_honoured(tmp_path: Path) -> None:
    assert nbparallel.map(attempt_logged, [0], [str(tmp_path)], [1], ["retry_after"], retries=1,
                          retry_on=Transient, backoff=0.01) == [2]
    first, second = attempt_times(tmp_path, 0)
    assert second - first >= 0.65


def test_a_timed_out_attempt_is_retried(tmp_path: Path) -> None:
    assert nbparallel.map(attempt_logged, [0, 1], [str(tmp_path)] * 2, [1, 0], ["timeout"] * 2, timeout=0.3,
                          retries=1, backoff=0.01) == [2, 1]
    results = nbparallel.map(attempt_logged, [5], [str(tmp_path)], [9], ["timeout"], timeout=0.2, retries=1,
                             backoff=0.01, errors="return")
    assert isinstance(results[0], nbparallel.TaskTimeout) and results[0].attempts == 2


async def started(x: int) -> float:
    now = time.time()
    await asyncio.sleep(0.05)
    return now


def started_plain(x: int) -> float:
    return time.time()


@pytest.mark.parametrize("fn", [started, started_plain], ids=["coroutines", "plain"])
def test_rate_caps_starts_across_the_workers(fn: Any) -> None:
    began = time.monotonic()
    starts = nbparallel.map(fn, range(30), rate="20/s", workers=2)
    elapsed = time.monotonic() - began
    assert elapsed >= 1.3, f"30 starts at 20/s took {elapsed:.2f} s"
    # Wide margins (a loaded 2-core machine delays some starts): without the cap all 30 start at once.
    assert most_in_a_window(starts, 1.0) <= 26
    assert most_in_a_window(starts, 0.25) <= 10  # evenly spaced, no burst


async def started_uneven(x: int) -> float:
    now = time.time()
    await asyncio.sleep(0.4 if x % 5 == 0 else 0.02)
    return now


def slow_plain(x: int) -> float:
    now = time.time()
    time.sleep(0.06)  # longer than the spacing of 20/s: each worker falls behind its start times
    return now


def test_rate_holds_when_items_cannot_start_on_time() -> None:
    """Start times missed (every place taken, a plain function running long) never pile up into a
    burst: the items that missed theirs go back for new ones."""
    starts = nbparallel.map(started_uneven, range(120), concurrency=12, rate="50/s")
    assert most_in_a_window(starts, 1.0) <= 60 and most_in_a_window(starts, 0.2) <= 16
    starts = nbparallel.map(slow_plain, range(40), rate="20/s", workers=2)
    assert most_in_a_window(starts, 1.0) <= 26 and most_in_a_window(starts, 0.25) <= 10


def test_rate_continues_across_calls_of_the_same_function() -> None:
    first = nbparallel.map(started, range(5), rate="600/min")
    second = nbparallel.map(started, range(5), rate="600/min")
    starts = sorted(first + second)
    assert starts[-1] - starts[0] >= 0.8  # 10 starts at 10/s; a fresh bucket per call would burst


async def talk(x: int) -> int:
    await asyncio.sleep(0.01 * (x % 3))
    print(f"fetched {x}")
    await asyncio.sleep(0.01)
    print(f"parsed {x}")
    return x


def test_output_is_tagged_by_item(capsys: pytest.CaptureFixture[str]) -> None:
    nbparallel.map(talk, range(12), concurrency=12)
    out = capsys.readouterr().out
    for x in range(12):
        assert f"[item {x}] fetched {x}" in out and f"[item {x}] parsed {x}" in out, out


def test_progress_shows_items_in_flight_and_the_rate_limit(capsys: pytest.CaptureFixture[str]) -> None:
    from nbparallel.progress.driver import rate_text  # the display's own words for a limit

    nbparallel.map(span, range(200), [0.3] * 200, concurrency=40, rate="100/s", progress=True)
    drawn = capsys.readouterr().err
    assert re.search(r"map\(span\) · \d+ in flight · at most 100/s: ", drawn), drawn
    assert (rate_text(50.0), rate_text(0.5), rate_text(1 / 7200)) == ("50/s", "30/min", "0.5/h")


async def quick_or_stuck(x: int, folder: str) -> int:
    if x >= 10:
        await asyncio.sleep(30)
        Path(folder, f"late-{x}").write_text("still running")
    return x


def test_interrupt_cancels_in_flight_coroutines_and_keeps_results(tmp_path: Path) -> None:
    timer = threading.Timer(1.5, _thread.interrupt_main)  # the stop button, as a KeyboardInterrupt here
    timer.start()
    began = time.monotonic()
    try:
        with pytest.raises(nbparallel.Interrupted) as caught:
            nbparallel.map(quick_or_stuck, range(40), [str(tmp_path)] * 40, concurrency=40)
    finally:
        timer.cancel()
    latency = time.monotonic() - began - 1.5
    assert latency < 1.5, f"Interrupted came {latency:.2f} s after the interrupt"
    assert caught.value.completed == {x: x for x in range(10)}
    time.sleep(0.5)
    assert not list(tmp_path.iterdir())  # nothing in flight went on
    assert nbparallel.map(span, range(4), [0.01] * 4)[3][0] == 3  # the pool is ready


async def blocks_its_loop(x: int) -> int:
    if x == 0:
        time.sleep(30)  # a blocking call in a coroutine: the loop stops
    await asyncio.sleep(0.01)
    return x


def test_a_coroutine_blocking_its_loop_past_the_timeout_costs_its_worker() -> None:
    began = time.monotonic()
    results = nbparallel.map(blocks_its_loop, range(20), timeout=1.0, errors="return")
    assert time.monotonic() - began < 15
    assert isinstance(results[0], nbparallel.TaskTimeout), results[0]
    assert results[1:] == list(range(1, 20))


def test_joblib_runs_coroutine_functions() -> None:
    joblib = pytest.importorskip("joblib")
    with joblib.parallel_config(backend="nbparallel"):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(span)(x, 0.05) for x in range(300))
    assert [r[0] for r in out] == list(range(300))
    assert most_at_once([(r[1], r[2]) for r in out]) > 4


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        nbparallel.map(span, range(3), concurrency=0)
    with pytest.raises(ValueError, match="cannot read the rate"):
        nbparallel.map(span, range(3), rate="fast")
    with pytest.raises(ValueError, match="backoff"):
        nbparallel.map(span, range(3), backoff=-1)
    assert parse_rate("3000/min") == 50.0 and parse_rate("10/hour") == 10 / 3600 and parse_rate(5) == 5.0
    assert Flow(concurrency=200).plan(16, "auto") == (16, 12, 12)  # never above 200 in flight
    assert Flow().plan(2, "auto") == (2, 32, 32)
    assert Flow(concurrency=3).plan(8, "auto") == (3, 1, 1)
    assert Flow(rate=50.0).plan(2, "auto") == (2, 32, 13)


def test_a_cell_with_top_level_await_is_run_as_a_coroutine() -> None:
    from nbparallel.cellmagic.cellcode import analyse  # what %%parallel builds
    from nbparallel.cellmagic.cellrunner import CellRunner, capture
    from nbparallel.payload.aiocall import is_async

    code = analyse("import asyncio\nawait asyncio.sleep(0.01)\ny = base + i\nawait asyncio.sleep(0) or y * 2")
    assert code.reads == ["base", "i"] and code.assigns == ["asyncio", "y"]
    runner = CellRunner(code.source, code.filename, ("i",), capture(code, {"base": 10}, ("i",)))
    assert is_async(runner) and not is_async(CellRunner("1 + 1", "<c>", (), {}))
    assert nbparallel.map(runner, [(1,), (2,), (3,)]) == [22, 24, 26]


def test_a_cell_with_await_runs_in_a_real_kernel() -> None:
    from _notebooks import Kernel  # starts a kernel: only this test needs it

    kernel = Kernel()
    try:
        kernel.run("%load_ext nbparallel\n%nbparallel workers 2")
        began = time.monotonic()
        execution = kernel.run("%%parallel --map i=range(40) --concurrency 20 --out res\n"
                               "import asyncio\n"
                               "await asyncio.sleep(0.5)\n"
                               "print('fetched', i)\n"
                               "async with asyncio.Lock():\n"
                               "    await asyncio.sleep(0.01)\n"
                               "i * 2")
        assert time.monotonic() - began < 10  # 40 runs of 0.5 s on 2 workers, one at a time: 10 s
        assert re.search(r"^\[(item 7|i=7)\] fetched 7$", execution.stdout, re.MULTILINE), execution.describe()
        assert kernel.value("res.values") == [i * 2 for i in range(40)]
        kernel.run("%%parallel --bg\nimport asyncio\nawait asyncio.sleep(0.1)\nanswer = 42")
        kernel.run("%nbparallel wait")
        assert kernel.value("answer") == 42
    finally:
        assert not kernel.close()
