"""The pool: sizing conventions, preload, resizing, and the function sent once per worker."""

from __future__ import annotations

import os
import sys

import pytest

import nbparallel
from nbparallel import config

UNPICKLED = 0


def _rebuild_counting() -> object:
    # Runs in the worker each time the function is unpickled there.
    global UNPICKLED
    UNPICKLED += 1
    return _Counting()


class _Counting:
    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_rebuild_counting, ())

    def __call__(self, x: int) -> tuple[int, int]:
        return os.getpid(), UNPICKLED


def test_function_travels_once_per_worker_not_per_task() -> None:
    results = nbparallel.map(_Counting(), range(300), chunksize=1)
    per_worker: dict[int, int] = {}
    for pid, count in results:
        per_worker[pid] = max(per_worker.get(pid, 0), count)
    assert per_worker and all(count == 1 for count in per_worker.values()), per_worker


def test_workers_convention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    assert config.resolve_workers(None) == 8
    assert config.resolve_workers(-1) == 8
    assert config.resolve_workers(-2) == 7
    assert config.resolve_workers(3) == 3
    for bad in (0, -9):
        with pytest.raises(ValueError, match="leaves no worker"):
            config.resolve_workers(bad)
    with pytest.raises(TypeError):
        config.resolve_workers(2.5)  # type: ignore[arg-type]


def test_usable_cpus_counts_affinity() -> None:
    assert 1 <= config.usable_cpus() <= len(os.sched_getaffinity(0))


def test_thread_limits_share_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "usable_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert config.thread_limits(4)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert "OMP_NUM_THREADS" not in config.thread_limits(4), "the user's own setting wins"


@pytest.mark.timeout(60)
def test_configure_preload_and_resize() -> None:
    try:
        nbparallel.configure(workers=3, preload=["wave"])
        loaded = nbparallel.map(lambda _: ("wave" in sys.modules, os.getpid()), range(30), chunksize=1)
        assert all(flag for flag, _ in loaded), "preloaded modules are imported before work arrives"
        assert len(nbparallel.status()["workers"]) == 3
        threads = nbparallel.map(lambda _: os.environ.get("OMP_NUM_THREADS"), [0])
        assert threads[0] is not None
    finally:
        nbparallel.configure(workers=None, preload=[])
    assert nbparallel.map(lambda _: "wave" in sys.modules, [0]) == [False]


def test_asking_for_more_workers_than_the_pool_grows_it() -> None:
    import time

    pids = set(nbparallel.map(lambda _: (time.sleep(0.2), os.getpid())[1], range(8), workers=4, chunksize=1))
    assert len(pids) == 4


def test_sidecar_stays_small(script_env: dict[str, str]) -> None:
    import subprocess

    # The standard library's pickle module is loaded (SerializationError is a pickle.PicklingError);
    # what must never load is what unpickles user values or weighs: cloudpickle, numpy, IPython.
    code = (
        "import sys\nimport nbparallel.sidecar.loop\n"
        "print([m for m in ('cloudpickle', 'numpy', 'IPython', 'ipykernel', 'nbparallel.payload.pickling',"
        " 'concurrent.futures.process')"
        " if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env, timeout=60)
    assert done.stdout.strip() == "[]", "the sidecar imports only the standard library, psutil and our protocol"
    status = nbparallel.status()
    assert status["rss"] < 30 * 2**20, f"sidecar RSS {status['rss'] / 2**20:.1f} MiB"
