"""The rule of the session's /dev/shm leftover check (tests/support/_shm_leftovers.py), with real processes:
an entry counts only when a process of this session held it; another program's entries never do."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _shm_leftovers import (FOREIGN, OURS, SHM, TAG_VARIABLE, UNKNOWN, ShmWatcher, is_sem_open_temporary, pid_in_name,
                            verdict, wait_for)

pytestmark = pytest.mark.skipif(not (SHM.is_dir() and Path("/proc/self/maps").exists()),
                                reason="needs /dev/shm and /proc (Linux)")

# Creates /dev/shm/NAME, maps it (as sem_open and SharedMemory do), says "ready", and holds it until its
# standard input closes; then exits without unlinking it: a leak. With "orphan", it first forks and
# its parent exits, so it is re-parented away from the test.
HOLDER = textwrap.dedent("""
    import mmap, os, sys, time
    path, orphan = "/dev/shm/" + sys.argv[1], sys.argv[2] == "orphan"
    if orphan:
        parent = os.getpid()
        if os.fork():
            os._exit(0)
        while os.getppid() == parent:  # re-parented before it makes anything
            time.sleep(0.01)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    mapping = mmap.mmap(fd, 4096)
    os.close(fd)
    print(os.getpid(), flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Fresh /dev/shm names for one test, all removed afterwards."""
    made = [f"nbp-rule-{uuid.uuid4().hex[:12]}-{i}" for i in range(4)]
    yield made
    for name in made:
        try:
            os.unlink(SHM / name)
        except FileNotFoundError:
            pass


class Holder:
    """A process holding one entry; ``tagged``: it carries the session's tag; ``orphan``: not our child."""

    def __init__(self, name: str, *, tag: str | None, orphan: bool) -> None:
        env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
        if tag is not None:
            env[TAG_VARIABLE] = tag
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, name, "orphan" if orphan else "child"],
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.pid = int(self.process.stdout.readline())

    def release(self) -> None:
        """Close its standard input: it exits and leaves its entry behind."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)  # the orphan's parent already exited; the orphan sees EOF too
        wait_for(lambda: not Path(f"/proc/{self.pid}").exists() or _zombie(self.pid), timeout=10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(("holders", "name_pid", "expected"), [
    ([True], None, OURS),
    ([False, True], None, OURS),  # held by another program too: still ours
    ([False], None, FOREIGN),
    ([False], True, OURS),  # loky-PID-… of a process of ours
    ([], False, FOREIGN),
    ([], None, UNKNOWN),
])
def test_the_rule(holders: list[bool], name_pid: bool | None, expected: str) -> None:
    assert verdict(holders, name_pid) == expected


def test_pids_in_names() -> None:
    assert pid_in_name("sem.loky-4242-a1b2c3") == 4242
    assert pid_in_name("loky-7-x") == 7
    assert pid_in_name("sem.mp-3x7d_0k2") is None and pid_in_name("psm_4242") is None


def test_sem_open_temporaries_are_told_from_named_semaphores() -> None:
    assert is_sem_open_temporary("sem.pmZrbA") and is_sem_open_temporary("sem.0a9Z1x")
    assert not is_sem_open_temporary("sem.mp-3x7d_0k2") and not is_sem_open_temporary("sem.loky-42-abc")
    assert not is_sem_open_temporary("sem.abcdefg") and not is_sem_open_temporary("psm_abcdef")


def test_only_entries_held_by_this_sessions_processes_count(names: list[str]) -> None:
    ours_child, ours_orphan, foreign, nobody = names
    tag = uuid.uuid4().hex
    watcher = ShmWatcher(tag=tag)
    watcher.start()
    try:
        holders = [Holder(ours_child, tag=None, orphan=False),    # our child: ours by descent
                   Holder(ours_orphan, tag=tag, orphan=True),     # re-parented away, but tagged
                   Holder(foreign, tag=None, orphan=True)]        # another program's
        (SHM / nobody).write_bytes(b"")                           # made and let go at once
        settled = lambda: all(n in watcher.seen and watcher.seen[n].verdict != UNKNOWN  # noqa: E731
                              for n in (ours_child, ours_orphan, foreign))
        assert wait_for(settled, timeout=10), {n: watcher.seen.get(n) for n in names}
        for holder in holders:
            holder.release()
    finally:
        watcher.stop()
    left = {kind: [n for n in found if n in names] for kind, found in watcher.leftovers().items()}
    assert left == {OURS: sorted([ours_child, ours_orphan]), FOREIGN: [foreign], UNKNOWN: [nobody]}
    for name in names:
        os.unlink(SHM / name)
    assert not any(n in names for found in watcher.leftovers().values() for n in found)


def test_an_entry_made_before_the_start_never_counts(names: list[str]) -> None:
    (SHM / names[0]).write_bytes(b"")
    watcher = ShmWatcher(tag=uuid.uuid4().hex)
    holder = Holder(names[0], tag=None, orphan=False)  # opens the existing file: ours now, but not new
    try:
        watcher.look()
        assert not any(names[0] in found for found in watcher.leftovers().values())
    finally:
        holder.release()
