"""Shared fixtures: every test is checked for processes it left behind."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

# tests/unit: pure code, no processes; tests/system (and adversarial/, contract/): real processes,
# kernels and a browser; tests/support: the helpers they share, importable by their module names.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from _ci_markers import pytest_collection_modifyitems  # noqa: F401  # the dask and slow markers CI selects by
from _shm_leftovers import OURS as SHM_OURS
from _shm_leftovers import SHM, holders, is_sem_open_temporary
from _shm_leftovers import TAG_VARIABLE as SHM_TAG
from _shm_leftovers import UNKNOWN as SHM_UNKNOWN
from _shm_leftovers import ShmWatcher

ROOT = Path(__file__).resolve().parent.parent


def _descendants() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _sidecar_tree() -> set[int]:
    """The shared sidecar and its workers: they live across tests on purpose."""
    from nbparallel.kernel import runner as client

    running = client.current_client()
    if running is None or running.dead is not None:
        return set()
    try:
        sidecar = psutil.Process(running.pid)
        return {sidecar.pid, *(p.pid for p in sidecar.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


# Processes a fixture keeps for several tests on purpose (a Dask test cluster); the fixture that
# started them stops them, and the session's end checks that it did.
_SHARED_ROOTS: set[int] = set()


@pytest.fixture(scope="session")
def shared_processes() -> set[int]:
    """Add a process's pid here to keep it (and its children) from counting as a test's leak."""
    return _SHARED_ROOTS


def _shared_trees() -> set[int]:
    pids: set[int] = set()
    for root in list(_SHARED_ROOTS):
        try:
            pids |= {root, *(p.pid for p in psutil.Process(root).children(recursive=True))}
        except psutil.NoSuchProcess:
            continue
    return pids


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail a test that leaves a process of its own running (the shared pool excepted)."""
    before = set(_descendants())
    yield
    deadline = time.monotonic() + 5
    while True:
        allowed = before | _sidecar_tree() | _shared_trees()
        leaked = [p for pid, p in _descendants().items() if pid not in allowed and _alive(p)]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for proc in leaked:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    assert not leaked, f"the test left processes running: {[_describe(p) for p in leaked]}"


def _watch_shared_memory() -> ShmWatcher:
    """Named shared memory and semaphores (ours have none; peers' pools and Dask's nannies do).

    Only entries a process of this session held count (tests/support/_shm_leftovers.py says how that is
    known): /dev/shm is the whole machine's, and other programs come and go in it during a run.
    """
    tag = f"{os.getpid()}-{time.time_ns()}"
    os.environ[SHM_TAG] = tag  # every process the tests start inherits it, and keeps it as an orphan
    watcher = ShmWatcher(tag=tag)
    watcher.start()
    return watcher


@pytest.fixture(scope="session", autouse=True)
def nothing_left_at_the_end() -> Iterator[None]:
    shm = _watch_shared_memory()
    yield
    import nbparallel

    nbparallel.shutdown()
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in _descendants().values() if _alive(p)]
        shm_left = shm.leftovers()
        if not left and not shm_left[SHM_OURS]:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    shm.stop()
    # A task killed while it made a named semaphore (nested joblib/loky in a worker the tests stop
    # with SIGKILL) leaves sem_open's temporary file: the kill, not a leak of ours. Removed, and said.
    torn = [name for name in shm_left[SHM_OURS] if is_sem_open_temporary(name) and not holders(name)]
    for name in torn:
        (SHM / name).unlink(missing_ok=True)
        shm_left[SHM_OURS].remove(name)
    if torn:
        warnings.warn(pytest.PytestWarning(f"removed sem_open temporaries of killed processes: {torn}"))
    if shm_left[SHM_UNKNOWN]:
        warnings.warn(pytest.PytestWarning(
            f"new /dev/shm entries that no process was seen holding (not counted): {shm_left[SHM_UNKNOWN][:10]}"))
    if left or shm_left[SHM_OURS]:
        pytest.fail(f"left after the session: processes {[_describe(p) for p in left]}, "
                    f"/dev/shm entries of this session's processes {shm_left[SHM_OURS][:10]}")


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()[:4])}"
    except psutil.Error:  # it died (or turned zombie) while we looked
        return f"{proc.pid} (gone)"


@pytest.fixture
def script_env() -> dict[str, str]:
    """Environment for a child Python script that imports nbparallel from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
