"""What the adversarial tests share: a pool of two workers, and a check that what a test did left
nothing behind (processes, descriptors, shared memory come back to where they were)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

import nbparallel
from _waiting import wait_for as wait_for  # the adversarial tests import it from here
from nbparallel.payload import placement
from nbparallel.wire import strays

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def shm_entries() -> set[str]:
    """Named shared memory of ours: there should never be any (our segments are anonymous). The
    machine's other entries come and go with other programs; the session's end checks those its
    own processes held (tests/support/_shm_leftovers.py)."""
    return set(glob.glob("/dev/shm/*nbp*")) | set(glob.glob("/dev/shm/*nbparallel*"))


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if _alive(p)}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def pool() -> tuple[int, list[int]]:
    """The sidecar's pid and its workers' (starting the pool if need be)."""
    status = nbparallel.status()
    return int(status["pid"]), sorted(int(w["pid"]) for w in status["workers"])


def marked(pool_pid: int) -> list[int]:
    """Processes carrying the mark of the sidecar ``pool_pid``'s pool, other than it and its workers."""
    try:
        environ = Path(f"/proc/{pool_pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []
    token = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(strays.POOL_ENV.encode() + b"=")), "")
    return strays.find(token) if token else []


class Baseline:
    """Processes, descriptors and /dev/shm entries now; ``settled()`` waits for them to come back."""

    def __init__(self) -> None:
        placement.clear()
        self.sidecar, self.workers = pool()
        self.my_fds = fds(os.getpid())
        self.sidecar_fds = fds(self.sidecar)
        self.shm = shm_entries()
        self.processes = len(descendants())

    def now(self) -> dict[str, Any]:
        placement.clear()  # the kernel's pool of segments for reuse is a cache, not a leak
        sidecar, workers = pool()
        return {"sidecar": sidecar, "workers": len(workers), "my_fds": fds(os.getpid()),
                "sidecar_fds": fds(sidecar), "new_shm": sorted(shm_entries() - self.shm),
                "processes": len(descendants())}

    def settled(self, *, same_sidecar: bool = True, timeout: float = 10.0) -> None:
        """Wait until the pool is as it was; fail saying what differs."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.now()
            problems = []
            if same_sidecar and now["sidecar"] != self.sidecar:
                problems.append("the sidecar was replaced")
            if now["workers"] != len(self.workers):
                problems.append(f"{now['workers']} workers instead of {len(self.workers)}")
            if now["my_fds"] > self.my_fds:
                problems.append(f"this process holds {now['my_fds']} descriptors, was {self.my_fds}")
            if same_sidecar and now["sidecar_fds"] > self.sidecar_fds:
                problems.append(f"the sidecar holds {now['sidecar_fds']} descriptors, was {self.sidecar_fds}")
            if now["new_shm"]:
                problems.append(f"new /dev/shm entries {now['new_shm']}")
            if now["processes"] > self.processes:
                problems.append(f"{now['processes']} processes below this one, was {self.processes}")
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not problems, "; ".join(problems)


@contextmanager
def leaves_nothing(*, same_sidecar: bool = True) -> Iterator[Baseline]:
    base = Baseline()
    yield base
    base.settled(same_sidecar=same_sidecar)


def script(code: str, *, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python that imports nbparallel from this checkout."""
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
    full["PYTHONUNBUFFERED"] = "1"
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=full)


def gone(pids: list[int]) -> bool:
    """None of ``pids`` runs (a zombie does not count)."""
    for pid in pids:
        try:
            if _alive(psutil.Process(pid)):
                return False
        except psutil.Error:
            continue
    return True


@pytest.fixture(scope="module")
def two_workers() -> Iterator[None]:
    """Each adversarial module runs on a pool of two workers; the settings are restored after it."""
    from nbparallel.kernel import runner

    saved = (runner.settings.workers, list(runner.settings.preload), runner.settings.max_tasks_per_worker)
    nbparallel.configure(workers=WORKERS, preload=[], max_tasks_per_worker=None)
    yield
    workers, preload, max_tasks = saved
    nbparallel.configure(workers=workers, preload=preload, max_tasks_per_worker=max_tasks)
