"""Large arrays travel through shared memory: no copies per task, nothing left behind."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import nbparallel
from nbparallel.payload import shm

pytestmark = pytest.mark.skipif(not shm.AVAILABLE, reason="memfd_create is Linux-only; elsewhere arrays go in band")

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
    mine, theirs = _memfds(os.getpid()), _memfds(sidecar)
    data = [np.ones(2 * MB // 8) * k for k in range(6)]
    nbparallel.map(lambda a: float(a[0]), data)
    with pytest.raises(ZeroDivisionError):
        nbparallel.map(lambda a: 1 / 0, data)
    nbparallel.map(lambda a: os._exit(1) if a[0] == 2 else a[0], data, errors="return", chunksize=1)
    nbparallel.map(lambda a: time.sleep(5) if a[0] == 3 else a[0], data, errors="return", chunksize=1, timeout=0.5)
    deadline = time.monotonic() + 10
    while (_memfds(os.getpid()), _memfds(sidecar)) != (mine, theirs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _memfds(os.getpid()) == mine, "the kernel keeps no segment it sent"
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
