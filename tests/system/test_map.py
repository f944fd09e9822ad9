"""map and imap against a real sidecar and real workers."""

from __future__ import annotations

import itertools
import os
import time

import pytest

import nbparallel


def square(x: int) -> int:
    return x * x


def test_map_in_order() -> None:
    assert nbparallel.map(square, range(200)) == [x * x for x in range(200)]


def test_lambda_closure_and_local_class_travel_by_value() -> None:
    offset = 7

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    results = nbparallel.map(lambda x: Point(x + offset), range(5))
    assert [p.x for p in results] == [7, 8, 9, 10, 11]
    assert type(results[0]).__name__ == "Point"


def test_several_iterables_shortest_wins() -> None:
    assert nbparallel.map(pow, [2, 3, 4], [5, 6], ) == [32, 729]
    assert nbparallel.map(lambda a, b, c: a + b + c, "ab", "cd", "ef") == ["ace", "bdf"]


def test_empty_input() -> None:
    assert nbparallel.map(square, []) == []
    assert list(nbparallel.imap(square, iter(()))) == []


def test_runs_in_other_processes() -> None:
    pids = set(nbparallel.map(lambda _: os.getpid(), range(50), chunksize=1))
    assert os.getpid() not in pids
    workers = {w["pid"] for w in nbparallel.status()["workers"]}
    assert pids <= workers


def test_unordered_map_has_every_result() -> None:
    results = nbparallel.map(square, range(100), ordered=False)
    assert sorted(results) == [x * x for x in range(100)]


def test_imap_ordered_yields_while_work_goes_on() -> None:
    def slow_last(x: int) -> int:
        if x == 9:
            time.sleep(1.5)
        return x

    start = time.monotonic()
    stream = nbparallel.imap(slow_last, range(10), chunksize=1)
    first = next(stream)
    assert first == 0
    assert time.monotonic() - start < 1.4, "the first result waited for the slow last item"
    assert [first, *stream] == list(range(10))


def test_imap_unordered_streams_as_completed() -> None:
    def slow_first(x: int) -> int:
        if x == 0:
            time.sleep(1.5)
        return x

    seen = list(nbparallel.imap(slow_first, range(8), ordered=False, chunksize=1))
    assert sorted(seen) == list(range(8))
    # Fast items stream past the slow one; at most one short chunk may have been queued behind it.
    assert seen.index(0) >= len(seen) - 2, seen


def test_fixed_chunksize_and_bad_chunksize() -> None:
    assert nbparallel.map(square, range(10), chunksize=3) == [x * x for x in range(10)]
    with pytest.raises(ValueError, match="chunksize"):
        nbparallel.map(square, range(3), chunksize=0)


def test_workers_limit_caps_concurrency() -> None:
    def who(_: int) -> int:
        time.sleep(0.05)
        return os.getpid()

    assert len(set(nbparallel.map(who, range(8), workers=1, chunksize=1))) == 1


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(TypeError, match="not iterable"):
        nbparallel.map(square, 5)
    with pytest.raises(TypeError, match="callable"):
        nbparallel.map(5, [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="errors must be"):
        nbparallel.map(square, [1], errors="ignore")
    with pytest.raises(ValueError, match="leaves no worker"):
        nbparallel.map(square, [1], workers=-1000)
    with pytest.raises(TypeError, match="at least one iterable"):
        nbparallel.map(square)


def test_generator_of_a_million_items_streams_with_bounded_memory() -> None:
    pulled = 0

    def source():  # type: ignore[no-untyped-def]
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield i

    import psutil

    me = psutil.Process()
    rss_before = me.memory_info().rss
    total = consumed = max_ahead = 0
    for value in nbparallel.imap(lambda x: x & 7, source()):
        total += value
        consumed += 1
        if not consumed & 1023:
            max_ahead = max(max_ahead, pulled - consumed)
    grown = me.memory_info().rss - rss_before
    assert consumed == 1_000_000
    assert total == sum(i & 7 for i in range(1_000_000))
    # Only a window of items is ever read ahead of the consumer...
    assert max_ahead < 400_000, max_ahead
    # ...so the caller never holds the input at once (a list of 1M ints alone is ~36 MB).
    assert grown < 30 * 2**20, f"the caller grew by {grown / 2**20:.1f} MiB"
    # The sidecar routes bytes and stays small.
    assert nbparallel.status()["rss_peak"] < 30 * 2**20


def test_abandoning_imap_cancels_the_rest() -> None:
    stream = nbparallel.imap(lambda x: (time.sleep(0.05), x)[1], itertools.count(), chunksize=1)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()  # type: ignore[attr-defined]
    status = nbparallel.status()
    assert status["queued"] == 0
    assert nbparallel.map(square, [3]) == [9]


def test_lines_printed_inside_big_chunks_are_tagged_with_their_item(capsys: pytest.CaptureFixture[str]) -> None:
    def noisy(x: int) -> int:
        if x % 50 == 7:
            print("value", x)
        if x == 120:
            raise ValueError("one bad item")
        return x

    results = nbparallel.map(noisy, range(300), chunksize=150, errors="return")
    out = capsys.readouterr().out
    for x in range(7, 300, 50):
        assert f"[item {x}] value {x}" in out
    assert isinstance(results[120], ValueError) and results[121] == 121
