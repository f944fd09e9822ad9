"""Hostile tasks: whatever a task does to its worker, every item ends in exactly one right outcome,
and the pool comes back whole (processes, descriptors, shared memory)."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest
from _support import gone, leaves_nothing, pool, two_workers, wait_for  # two_workers: the pool they run on

import nbparallel
from nbparallel.crashes import MemoryLimitExceeded, WorkerCrashed
from nbparallel.errors import TaskTimeout

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("two_workers")]


def raised(outcome: Any) -> BaseException | None:
    """The exception a task raised, as the caller got it in its item's place (or None)."""
    if not isinstance(outcome, BaseException):
        return None
    inner = getattr(outcome, "exception", None)  # a TaskError wrapper, where the type could not be mixed in
    return inner if isinstance(inner, BaseException) else outcome


# -- exceptions a task raises -----------------------------------------------------------------


class Custom(BaseException):
    pass


def _raises_at_sevens(kind: str) -> Any:
    def task(x: int, y: int = 0) -> int:
        if x % 100 == 7:
            if kind == "StopIteration":
                next(iter([]))
            if kind == "StopIteration(value)":
                raise StopIteration(x)
            if kind == "GeneratorExit":
                raise GeneratorExit(x)
            if kind == "SystemExit":
                sys.exit(x)
            if kind == "KeyboardInterrupt":
                raise KeyboardInterrupt(x)
            if kind == "BaseException":
                raise Custom(x)
            if kind == "RuntimeError from StopIteration":
                try:
                    next(iter([]))
                except StopIteration as exc:
                    raise RuntimeError("generator raised StopIteration") from exc
        return x * 2 + y

    return task


KINDS = {"StopIteration": StopIteration, "StopIteration(value)": StopIteration, "GeneratorExit": GeneratorExit,
         "SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt, "BaseException": Custom,
         "RuntimeError from StopIteration": RuntimeError}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("path", ["fast", "careful", "star"])
def test_any_exception_a_task_raises_is_its_own_items_outcome(kind: str, path: str) -> None:
    """The fast path runs items through a generator: a StopIteration is the item's outcome, never
    the end of the run (map() would take it so, and shift every later result to the wrong index)."""
    n = 1000
    options: dict[str, Any] = {"errors": "return", "progress": False}
    if path == "careful":
        options["timeout"] = 60  # every item marked: the careful path
    args: tuple[Any, ...] = (range(n),) if path != "star" else (range(n), [1] * n)
    results = nbparallel.map(_raises_at_sevens(kind), *args, **options)
    assert len(results) == n
    extra = 1 if path == "star" else 0
    for index, outcome in enumerate(results):
        if index % 100 == 7:
            error = raised(outcome)
            assert type(error) is KINDS[kind], (index, outcome)
        else:
            assert outcome == index * 2 + extra, (index, outcome)


@pytest.mark.parametrize("kind", ["StopIteration", "GeneratorExit", "BaseException"])
def test_raise_stops_at_the_first_failure_and_keeps_what_finished(kind: str) -> None:
    with pytest.raises(KINDS[kind]) as caught:
        nbparallel.map(_raises_at_sevens(kind), range(1000), chunksize=50, progress=False)
    completed = nbparallel.errors.completed_of(caught.value) if hasattr(nbparallel.errors, "completed_of") else \
        getattr(caught.value, "completed", None)
    assert completed is not None and completed, "the finished results must come with the error"
    assert all(value == index * 2 for index, value in completed.items())
    assert 7 not in completed


def test_a_task_that_forks_leaves_no_copy_of_its_worker() -> None:
    """A child forked in a task that returns into the worker's loop must not pose as the worker
    (no second result, no frames on the worker's socket): it exits, and every item has one value."""

    def fork_and_return(x: int) -> int:
        child = os.fork()
        if child == 0:
            print(f"child of item {x}")  # goes to the inherited descriptor, not the worker's socket
            return -1  # back into the worker's loop: it must exit there
        os.waitpid(child, 0)
        return x

    def fork_and_exit(x: int) -> int:
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        return x

    with leaves_nothing():
        for fn in (fork_and_return, fork_and_exit):
            for options in ({}, {"timeout": 60}):
                assert nbparallel.map(fn, range(40), progress=False, **options) == list(range(40))


def test_a_task_that_closes_every_descriptor_fails_alone() -> None:
    def closes_all(x: int) -> int:
        if x == 5:
            os.closerange(3, 4096)
            time.sleep(30)  # still running when the sidecar notices: it kills the worker
        return x

    with leaves_nothing():
        started = time.monotonic()
        results = nbparallel.map(closes_all, range(20), errors="return", progress=False)
        assert time.monotonic() - started < 15
        assert isinstance(results[5], WorkerCrashed) and results[5].index == 5
        assert [r for i, r in enumerate(results) if i != 5] == [i for i in range(20) if i != 5]


def test_a_task_that_writes_into_its_workers_socket_fails_alone() -> None:
    """A corrupt stream from one worker costs that worker (its item fails), never the sidecar."""

    def scribble(x: int) -> int:
        if x == 3:
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                try:
                    if stat.S_ISSOCK(os.fstat(fd).st_mode):
                        os.write(fd, b"\xff" * 64 + b"not a frame")
                except OSError:
                    continue
            time.sleep(30)
        return x

    with leaves_nothing():
        results = nbparallel.map(scribble, range(12), errors="return", progress=False)
        assert isinstance(results[3], WorkerCrashed)
        assert [r for i, r in enumerate(results) if i != 3] == [i for i in range(12) if i != 3]


def test_a_result_read_with_the_garbage_after_it_still_counts() -> None:
    """The race in the test above, made certain: the result of the chunk before and the garbage of
    the next chunk's task reach the sidecar in one read. The result counts, and the item whose task
    wrote the garbage alone fails: not the one whose result came with it (once blamed twice)."""

    def sockets() -> list[int]:
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                if stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                    found.append(int(name))
            except OSError:
                continue
        return found

    def scribble_after(x: int) -> int:
        sidecar = os.getppid()
        if x == 2:
            # Item 3's chunk already waits on this worker's socket (prefetched): stop the sidecar
            # until item 3 has written, so this item's result and the garbage arrive together.
            ready, _, _ = select.select(sockets(), [], [], 5)
            if ready:
                os.kill(sidecar, signal.SIGSTOP)
                threading.Timer(2, os.kill, (sidecar, signal.SIGCONT)).start()  # should item 3 not follow
        if x == 3:
            for fd in sockets():
                os.write(fd, b"\xff" * 64 + b"not a frame")
            os.kill(sidecar, signal.SIGCONT)
            time.sleep(30)
        return x

    with leaves_nothing():
        results = nbparallel.map(scribble_after, range(6), workers=1, chunksize=1, errors="return", progress=False)
        assert isinstance(results[3], WorkerCrashed) and results[3].index == 3
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]


def test_setsid_and_signals_in_a_task() -> None:
    def setsid(x: int) -> int:
        os.setsid()  # a worker leads its process group: this fails, and is the item's outcome
        return x

    def ignores_term_and_hangs(x: int) -> int:
        if x == 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            time.sleep(60)
        return x

    with leaves_nothing():
        results = nbparallel.map(setsid, range(3), errors="return", progress=False)
        assert all(isinstance(raised(r), PermissionError) for r in results)
        results = nbparallel.map(ignores_term_and_hangs, range(4), errors="return", timeout=1, progress=False)
        assert isinstance(results[1], TaskTimeout) and results[1].index == 1
        assert [results[0], results[2], results[3]] == [0, 2, 3]


def _spawn_leftovers(x: int) -> list[int]:
    """Start a plain child, one in its own session, and a non-daemon thread that never ends."""
    plain = subprocess.Popen(["sleep", "300"])
    detached = subprocess.Popen(["sleep", "301"], start_new_session=True)
    threading.Thread(target=time.sleep, args=(300,)).start()
    return [plain.pid, detached.pid]


def test_what_a_task_leaves_behind_goes_with_its_worker() -> None:
    """Leftover subprocesses (in the worker's group or a session of their own) and never-ending
    threads: the worker still exits when it is recycled, and takes them all with it."""
    nbparallel.configure(max_tasks_per_worker=1)
    try:
        with leaves_nothing(same_sidecar=True) as base:
            pids = [pid for pair in nbparallel.map(_spawn_leftovers, range(4), progress=False) for pid in pair]
            wait_for(lambda: gone(pids), 10, "the tasks' subprocesses to be killed")
            wait_for(lambda: not (set(pool()[1]) & set(base.workers)), 10, "the used workers to exit")
    finally:
        nbparallel.configure(max_tasks_per_worker=None)


def test_what_a_task_leaves_behind_goes_when_its_worker_is_killed() -> None:
    def leave_and_hang(x: int) -> int:
        _spawn_leftovers(x)
        time.sleep(60)
        return x

    with leaves_nothing():
        before = {p.pid for p in psutil.process_iter()}
        results = nbparallel.map(leave_and_hang, range(2), errors="return", timeout=1.5, progress=False)
        assert all(isinstance(r, TaskTimeout) for r in results)
        wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                              and p.info["cmdline"] and p.info["cmdline"][:1] == ["sleep"]], 10,
                 "the killed workers' subprocesses to go")


def test_memory_exhaustion_under_a_memory_limit_fails_only_that_item() -> None:
    def hog(x: int) -> int:
        if x == 2:
            blocks = []
            for _ in range(400):
                blocks.append(bytearray(8 * 2**20))  # touched: 8 MiB at a time, up to 3.2 GB
        return x

    with leaves_nothing():
        results = nbparallel.map(hog, range(6), errors="return", memory_limit="300MB", progress=False)
        assert isinstance(results[2], MemoryLimitExceeded) and results[2].index == 2
        assert [r for i, r in enumerate(results) if i != 2] == [0, 1, 3, 4, 5]


def test_megabytes_of_non_ascii_output_are_delivered_or_cut_never_fatal(capsys: pytest.CaptureFixture[str]) -> None:
    """3 MB of non-ASCII text in one print would make a header far past the frame limit: it goes
    in pieces, the call passes on what its cap allows and says it cut the rest."""

    def loud(x: int) -> int:
        print("ü€😀" * 1_000_000)  # 3 million characters, 12 MB escaped in one header
        sys.stdout.write("ß" * 200_000)  # no newline at all
        return x

    with leaves_nothing():
        assert nbparallel.map(loud, range(3), progress=False) == [0, 1, 2]
        assert nbparallel.map(abs, range(-3, 0), progress=False) == [3, 2, 1]
    out, err = capsys.readouterr()
    assert "ü€😀" in out
    assert "output is dropped" in err or "ü€😀" * 1_000_000 in out


def test_a_task_that_kills_its_own_process_group_fails_alone() -> None:
    def killpg(x: int) -> int:
        if x == 4:
            os.killpg(0, signal.SIGKILL)
        return x

    with leaves_nothing():
        results = nbparallel.map(killpg, range(10), errors="return", progress=False)
        assert isinstance(results[4], WorkerCrashed) and "SIGKILL" in str(results[4])
        assert [r for i, r in enumerate(results) if i != 4] == [i for i in range(10) if i != 4]


def test_a_task_that_closes_its_output_goes_on() -> None:
    def closes_std(x: int) -> int:
        for fd in (0, 1, 2):
            try:
                os.close(fd)
            except OSError:  # closed by an earlier item on this worker
                pass
        sys.stdout.close()
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115  # replaced: for this item only
        print(f"still captured {x}")
        return x

    results = nbparallel.map(closes_std, range(4), errors="return", progress=False)
    assert results == [0, 1, 2, 3]
    printed = nbparallel.map(lambda x: print("item", x, file=sys.stderr) or x, range(2), progress=False)
    assert printed == [0, 1]


def test_a_socket_a_task_opens_is_its_own() -> None:
    def opens(x: int) -> int:
        a, b = socket.socketpair()
        a.sendall(b"x")
        return len(b.recv(1)) + x

    assert nbparallel.map(opens, range(5), progress=False) == [1, 2, 3, 4, 5]
