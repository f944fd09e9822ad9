"""Large arrays travel through shared memory: no copies per task, nothing left behind."""

from __future__ import annotations

import gc
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import nbparallel
from nbparallel.payload import placement, segments, shm

pytestmark = pytest.mark.skipif(not segments.AVAILABLE, reason="memfd_create is Linux-only; elsewhere arrays go in band")

MB = 2**20


def _memfds(pid: int) -> int:
    """Shared-memory segments a process holds open (they never appear in /dev/shm)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:nbparallel"):
                count += 1
        except OSError:
            continue
    return count


def _where(array: np.ndarray) -> tuple[bool, str]:
    """In a worker: is the array backed by a mapping, and is it writable?"""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    kind = type(base).__name__
    return array.flags.writeable, kind


def test_array_arguments_arrive_mapped_read_only() -> None:
    data = np.arange(4 * MB // 8, dtype=np.float64)
    (writable, kind), total = nbparallel.map(lambda a: (_where(a), float(a.sum())), [data])[0]
    assert total == float(data.sum())
    assert not writable, "an argument array is the kernel's memory: read-only in the worker"
    assert kind in ("mmap", "memoryview"), kind


def test_captured_array_travels_once_per_worker_not_per_task() -> None:
    big = np.ones(8 * MB // 8)

    def address(_: int) -> tuple[int, int]:
        return os.getpid(), big.__array_interface__["data"][0]

    seen: dict[int, set[int]] = {}
    for pid, addr in nbparallel.map(address, range(64), chunksize=1):
        seen.setdefault(pid, set()).add(addr)
    assert all(len(addrs) == 1 for addrs in seen.values()), "each worker maps the array once per call"


def test_large_results_come_back_writable_and_correct() -> None:
    results = nbparallel.map(lambda n: np.full(n, 3.0), [3 * MB // 8, 10])
    assert results[0].shape == (3 * MB // 8,) and float(results[0].sum()) == 3.0 * (3 * MB // 8)
    results[0][0] = 7.0  # the caller owns its results
    assert results[1].tolist() == [3.0] * 10


def test_shared_array_is_passed_without_copy_and_filled_in_place() -> None:
    out = nbparallel.shared_array((8, 256 * 1024), dtype=np.float32)
    assert shm.dumps(out[2:6]).owned == [], "a slice of a shared array makes no new segment"

    def fill(row: int) -> int:
        out[row, :] = row + 0.5
        return row

    assert nbparallel.map(fill, range(8)) == list(range(8))
    assert [float(out[r, 0]) for r in range(8)] == [r + 0.5 for r in range(8)]
    assert float(out[7, -1]) == 7.5


def test_share_places_a_value_once_for_many_calls() -> None:
    table = {"weights": np.arange(2 * MB // 8, dtype=np.float64), "name": "model"}
    handle = nbparallel.share(table)
    assert "shared memory" in repr(handle)
    assert handle.value["name"] == "model"
    for _ in range(3):
        sums = nbparallel.map(lambda i: float(handle.value["weights"][i::4].sum()), range(4))
        assert sum(sums) == float(table["weights"].sum())
    flags = nbparallel.map(lambda _: handle.value["weights"].flags.writeable, [0])
    assert flags == [False]


@pytest.mark.timeout(120)
def test_segments_are_released_after_calls_errors_and_interrupts() -> None:
    sidecar = nbparallel.status()["pid"]
    nbparallel.map(abs, [1])  # the last call's function, and what it captured, let go
    gc.collect()  # shared arrays and values of earlier tests that only a reference cycle kept
    placement.clear()
    mine, theirs = _memfds(os.getpid()), _memfds(sidecar)
    data = [np.ones(2 * MB // 8) * k for k in range(6)]
    nbparallel.map(lambda a: float(a[0]), data)
    with pytest.raises(ZeroDivisionError):
        nbparallel.map(lambda a: 1 / 0, data)
    nbparallel.map(lambda a: os._exit(1) if a[0] == 2 else a[0], data, errors="return", chunksize=1)
    nbparallel.map(lambda a: time.sleep(5) if a[0] == 3 else a[0], data, errors="return", chunksize=1, timeout=0.5)
    placement.clear()  # the segments pooled for reuse (bounded; see test_the_pool_is_bounded_...)
    deadline = time.monotonic() + 10
    while (_memfds(os.getpid()), _memfds(sidecar)) != (mine, theirs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _memfds(os.getpid()) == mine, "the kernel keeps no segment it sent, beyond its pool"
    assert _memfds(sidecar) == theirs, "the sidecar lets go of a job's segments when it ends"


def test_workers_keep_their_mapping_of_a_shared_array_across_calls() -> None:
    grid = nbparallel.shared_array((4, 2**19), dtype=np.float64)  # 16 MiB

    def where(_: int) -> tuple[int, int]:
        return os.getpid(), grid.__array_interface__["data"][0]

    seen: dict[int, set[int]] = {}
    for _ in range(3):
        for pid, address in nbparallel.map(where, range(8), chunksize=1):
            seen.setdefault(pid, set()).add(address)
    assert all(len(addresses) == 1 for addresses in seen.values()), seen


# -- a shared array never loses a write (issue 14) ------------------------------------------------

#: Views of a 2-D shared array, each a different layout.
VIEWS = {
    "whole": lambda a: a,
    "rows": lambda a: a[1:3],
    "row": lambda a: a[2],
    "strided": lambda a: a[:, ::2],
    "column": lambda a: a[:, 5],
    "transposed": lambda a: a.T[0:2],
    "reversed": lambda a: a[::-1, ::-3],
    "empty": lambda a: a[2:2],
}
#: Shapes of float64 arrays: 512 bytes, 512 KiB (under the 1 MiB that large buffers start at), 2 MiB.
SIZES = {"tiny": (8, 8), "small": (256, 256), "large": (1024, 256)}


@dataclass
class Box:
    inner: Any


def _unbox(box: Any) -> Any:
    if isinstance(box, list):
        return box[0]
    if isinstance(box, dict):
        return box["view"]
    if isinstance(box, Box):
        return box.inner
    return box


def _expected(shape: tuple[int, int], kind: str, marker: float) -> np.ndarray:
    expected = np.zeros(shape)
    VIEWS[kind](expected)[...] = marker
    return expected


@pytest.mark.parametrize("size", SIZES)
def test_workers_write_into_every_view_of_a_shared_array_in_every_container(size: str) -> None:
    cases = [(kind, container) for kind in VIEWS for container in ("direct", "list", "dict", "dataclass")]
    arrays = [nbparallel.shared_array(SIZES[size], np.float64) for _ in cases]
    boxed: list[Any] = []
    for (kind, container), array in zip(cases, arrays):
        view = VIEWS[kind](array)
        boxed.append({"direct": view, "list": [view], "dict": {"view": view}, "dataclass": Box(view)}[container])

    def write(k: int, box: Any) -> bool:
        view = _unbox(box)
        view[...] = k + 1.0
        return bool(view.flags.writeable)

    assert nbparallel.map(write, range(len(cases)), boxed) == [True] * len(cases)
    for k, ((kind, container), array) in enumerate(zip(cases, arrays)):
        assert np.array_equal(array, _expected(SIZES[size], kind, k + 1.0)), (kind, container)


@pytest.mark.parametrize("size", SIZES)
def test_workers_write_into_views_captured_by_a_closure(size: str) -> None:
    arrays = {kind: nbparallel.shared_array(SIZES[size], np.float64) for kind in VIEWS}
    views = {kind: VIEWS[kind](array) for kind, array in arrays.items()}
    kinds = list(VIEWS)

    def write(k: int) -> bool:
        view = views[kinds[k]]
        view[...] = k + 1.0
        return bool(view.flags.writeable)

    assert nbparallel.map(write, range(len(kinds)), chunksize=1) == [True] * len(kinds)
    for k, kind in enumerate(kinds):
        assert np.array_equal(arrays[kind], _expected(SIZES[size], kind, k + 1.0)), kind


def test_submitted_views_are_written_in_place() -> None:
    grid = nbparallel.shared_array((64, 64), np.int64)
    futures = [nbparallel.submit(np.copyto, grid[:, k], k) for k in range(0, 64, 7)]
    futures += [nbparallel.submit(np.copyto, grid.T[1], -1)]
    for future in futures:
        future.result()
    assert [int(grid[0, k]) for k in range(0, 64, 7)] == list(range(0, 64, 7))
    assert grid[:, 1].tolist() == [-1] * 64


def test_a_shared_value_is_read_only_in_workers_so_a_write_raises() -> None:
    handle = nbparallel.share({"w": np.zeros(1000)})

    def write(_: int) -> None:
        handle.value["w"][0] = 1.0

    with pytest.raises(ValueError, match="read-only"):
        nbparallel.map(write, [0])
    with pytest.raises(ValueError, match="read-only"):
        nbparallel.map(np.copyto, [handle.value["w"][::2]], [1.0])
    assert float(handle.value["w"].sum()) == 0.0


# -- one buffer, one segment -------------------------------------------------------------------------


def _copied() -> int:
    return placement.counters["copied"]


def test_an_array_in_many_items_of_one_call_is_placed_once() -> None:
    data = np.random.default_rng(1).normal(size=(8 * MB // 8))
    before = _copied()
    sums = nbparallel.map(np.sum, [data] * 40, chunksize=1)
    assert sums == [data.sum()] * 40
    assert _copied() - before == data.nbytes, "placed once, referenced by every chunk"
    halves = [data[: len(data) // 2], data[len(data) // 2 :], data]
    before = _copied()
    assert nbparallel.map(np.sum, halves * 4, chunksize=1) == [h.sum() for h in halves] * 4
    assert _copied() - before == 0, "views of an array already placed are found in its segment"


def test_an_array_in_many_submits_is_placed_once_while_it_lives() -> None:
    data = np.arange(4 * MB // 8, dtype=np.float64)
    before, compared = _copied(), placement.counters["compared"]
    futures = [nbparallel.submit(np.sum, data) for _ in range(12)]
    assert [f.result() for f in futures] == [data.sum()] * 12
    assert [nbparallel.submit(np.max, data).result() for _ in range(5)] == [data[-1]] * 5
    assert _copied() - before == data.nbytes, "one copy; later submits compare it, at memory speed"
    assert placement.counters["compared"] > compared
    data[7] = -1.0  # changed in place: the next call must see it
    assert nbparallel.submit(np.min, data).result() == -1.0
    assert nbparallel.map(lambda a: float(a[7]), [data]) == [-1.0]


def test_joblib_batches_of_one_call_place_an_array_once() -> None:
    joblib = pytest.importorskip("joblib")
    data = np.ones(4 * MB // 8)
    before = _copied()
    with joblib.parallel_config(backend="nbparallel", progress=False):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(np.sum)(data) for _ in range(40))
    assert out == [data.sum()] * 40
    assert _copied() - before == data.nbytes


def test_a_segment_is_rewritten_only_when_nobody_maps_it() -> None:
    count = 2 * MB // 8

    def keep(a: np.ndarray) -> float:
        import sys  # the worker keeps the array, and so its mapping of the segment, past the call

        sys.nbp_kept = [*getattr(sys, "nbp_kept", []), a]  # type: ignore[attr-defined]
        return float(a.sum())

    def kept_sums(_: int) -> list[float]:
        import sys  # what the worker kept

        return [float(a.sum()) for a in getattr(sys, "nbp_kept", [])]

    try:
        assert nbparallel.map(keep, [np.full(count, 1.0)] * 2, chunksize=1) == [float(count)] * 2
        for value in (2.0, 3.0, 4.0):  # new arrays of the same size go to pooled segments, but not that one
            assert nbparallel.map(np.sum, [np.full(count, value)]) == [value * count]
        seen = [s for sums in nbparallel.map(kept_sums, range(8), chunksize=1) for s in sums]
        assert seen and set(seen) == {float(count)}, "what a worker kept was never overwritten"
    finally:
        nbparallel.shutdown()  # workers that keep arrays go


def test_the_pool_is_bounded_in_time_given_back_under_pressure_and_at_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    nbparallel.map(np.sum, [np.ones(2 * MB // 8)])
    assert placement.pooled_bytes() >= 2 * MB
    monkeypatch.setattr(segments, "mem_available", lambda: 0)  # memory runs short
    nbparallel.map(np.sum, [np.ones(2 * MB // 8)])
    assert placement.pooled_bytes() == 0
    monkeypatch.undo()
    monkeypatch.setattr(placement, "POOL_SECONDS", 0.3)
    nbparallel.map(np.sum, [np.ones(2 * MB // 8)])
    deadline = time.monotonic() + 5
    while placement.pooled_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert placement.pooled_bytes() == 0, "a pooled segment unused for POOL_SECONDS is given back"
    nbparallel.map(np.sum, [np.ones(2 * MB // 8)])
    nbparallel.shutdown()
    assert placement.pooled_bytes() == 0


# -- no descriptor per kept result ---------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _lowest_free_fd() -> int:
    probe = os.open(os.devnull, os.O_RDONLY)  # a new descriptor takes the lowest free number
    os.close(probe)
    return probe


@pytest.mark.timeout(600)
def test_many_kept_results_hold_no_descriptors_at_the_default_limit() -> None:
    """10,000 kept results of 1 MiB each under `ulimit -n 1024` (fewer where memory is short, never
    under 2,000: the point is many more results than descriptors)."""
    count = min(10_000, (segments.mem_available() or 0) // (2 * MB) // 1000 * 1000)  # half the free memory at most
    if count < 2_000:
        pytest.skip("needs 4 GiB of free memory: 2,000 results of 1 MiB, twice the default descriptor limit")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nbparallel.shutdown()
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        before = _open_fds()
        kept: list[np.ndarray] = []
        for start in range(0, count, 1000):
            kept += nbparallel.map(lambda k: np.full(MB // 8, float(k)), range(start, start + 1000))
        assert len(kept) == count
        assert _open_fds() - before < 50, "results hold mappings, not open files"
        assert all(float(kept[k][-1]) == k for k in range(0, count, 97))
        del kept
    finally:
        nbparallel.shutdown()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_hitting_the_open_file_limit_says_which_limit() -> None:
    data = np.ones(2 * MB // 8) * 5
    nbparallel.map(np.sum, [np.ones(10)])  # the sidecar is up
    placement.clear()  # no pooled segment to reuse: a new one is needed
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))  # not one descriptor more
    try:
        with pytest.raises(shm.SharedMemoryLimit, match="RLIMIT_NOFILE"):
            nbparallel.map(np.sum, [data])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert nbparallel.map(np.sum, [data]) == [data.sum()]


def test_a_worker_at_its_open_file_limit_fails_the_items_naming_the_limit() -> None:
    def crowded(_: int) -> np.ndarray:
        import resource  # in the worker: leave it no descriptor for its result's segment

        probe = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor number
        os.close(probe)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        return np.ones(2 * MB // 8)

    try:
        with pytest.raises(nbparallel.NbParallelError, match="RLIMIT_NOFILE"):
            nbparallel.map(crowded, [0])
    finally:
        nbparallel.shutdown()


def test_the_mapping_limit_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    monkeypatch.setattr(segments, "_mappings", lambda: 65530)
    error = segments.limit_error(OSError(errno.ENOMEM, "Cannot allocate memory"), "could not map")
    assert isinstance(error, shm.SharedMemoryLimit) and "vm.max_map_count" in str(error)


def test_each_submit_sees_the_array_as_it_was_when_submitted() -> None:
    """Changed in place between submits, while the earlier ones still run: each task sees its own
    version (an Executor's tasks are separate calls; only a joblib call's batches are one)."""
    data = np.zeros(2 * MB // 8)

    def slow_max(a: np.ndarray) -> float:
        time.sleep(0.3)
        return float(a.max())

    with nbparallel.Executor(max_workers=2) as pool:
        futures = []
        for value in range(6):
            data[:] = value
            futures.append(pool.submit(slow_max, data))
        assert [f.result() for f in futures] == [float(v) for v in range(6)]


def test_results_that_arrive_at_the_open_file_limit_say_which_limit() -> None:
    nbparallel.map(np.sum, [np.ones(10)])  # the sidecar is up
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))  # no room for a result's segment
    try:
        with pytest.raises(nbparallel.SidecarDied, match="RLIMIT_NOFILE"):
            nbparallel.map(lambda _: np.ones(2 * MB // 8), [0])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        nbparallel.shutdown()
    assert nbparallel.map(lambda _: np.ones(2 * MB // 8).sum(), [0]) == [2 * MB // 8]


@pytest.mark.timeout(300)
def test_a_call_over_many_arrays_keeps_few_descriptors_at_the_default_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nbparallel.shutdown()
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        arrays = [np.full(MB // 8, float(k)) for k in range(1500)]
        before = _open_fds()
        assert nbparallel.map(lambda a: float(a[-1]), arrays) == [float(k) for k in range(1500)]
        assert _open_fds() - before <= placement.max_segments() + 8
        doubled = nbparallel.map(lambda a: a * 2, arrays)
        assert all(float(d[0]) == 2 * k for k, d in enumerate(doubled))
        assert _open_fds() - before <= placement.max_segments() + 8
    finally:
        nbparallel.shutdown()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_changed_view_is_seen_when_another_view_in_its_segment_is_unchanged() -> None:
    data = np.arange(16 * MB // 8, dtype=np.float64)
    eighth = len(data) // 8
    parts = [data[:eighth], data[eighth : 2 * eighth]]  # small views: placed each alone, in one segment
    assert nbparallel.map(np.sum, parts, chunksize=2) == [p.sum() for p in parts]
    data[eighth + 5] = -1.0  # the second view changes, the first does not
    assert nbparallel.map(np.sum, parts, chunksize=2) == [p.sum() for p in parts]
    assert nbparallel.map(np.min, parts, chunksize=2) == [0.0, -1.0]
