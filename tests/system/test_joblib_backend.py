"""The joblib backend: joblib's contract on nbparallel's workers, and scikit-learn through it."""

from __future__ import annotations

import _thread
import os
import subprocess
import sys
import threading
import time

import pytest

joblib = pytest.importorskip("joblib")

import nbparallel  # noqa: E402
from nbparallel import config  # noqa: E402
from nbparallel.crashes import WorkerCrashed  # noqa: E402
from nbparallel.errors import details  # noqa: E402

from joblib import Parallel, delayed, parallel_config  # noqa: E402


def _pid_and_square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


@pytest.mark.timeout(60)
def test_results_come_back_in_order_from_the_workers() -> None:
    with parallel_config(backend="nbparallel"):
        results = Parallel(n_jobs=2)(delayed(_pid_and_square)(x) for x in range(50))
    assert [value for value, _ in results] == [x * x for x in range(50)]
    pids = {pid for _, pid in results}
    worker_pids = {w["pid"] for w in nbparallel.status()["workers"]}
    assert os.getpid() not in pids and pids <= worker_pids


@pytest.mark.timeout(60)
def test_functions_defined_here_lambdas_and_closures_travel_by_value() -> None:
    offset = 7
    with parallel_config(backend="nbparallel", n_jobs=2):
        assert Parallel()(delayed(lambda x: x + offset)(x) for x in range(5)) == [7, 8, 9, 10, 11]


@pytest.mark.timeout(60)
def test_an_exception_is_raised_with_its_type_and_remote_traceback() -> None:
    def check(x: int) -> int:
        if x == 6:
            raise KeyError(f"no {x}")
        return x

    with parallel_config(backend="nbparallel"), pytest.raises(KeyError) as caught:
        Parallel(n_jobs=2)(delayed(check)(x) for x in range(20))
    assert type(caught.value) is KeyError and caught.value.args == ("no 6",)
    found = details(caught.value)
    assert found is not None and "in check" in found.remote_traceback and "no 6" in found.remote_traceback
    assert "check call" in str(found.item)  # the batch it was in
    # The backend is ready for the next call.
    with parallel_config(backend="nbparallel"):
        assert Parallel(n_jobs=2)(delayed(abs)(-x) for x in range(4)) == [0, 1, 2, 3]


@pytest.mark.timeout(60)
def test_a_crashed_worker_is_an_error_not_a_hang() -> None:
    def die(x: int) -> int:
        if x == 3:
            os._exit(9)
        return x

    with parallel_config(backend="nbparallel"), pytest.raises(WorkerCrashed):
        Parallel(n_jobs=2, batch_size=1)(delayed(die)(x) for x in range(8))


def test_n_jobs_follows_joblib() -> None:
    from nbparallel.joblib_backend import NbParallelBackend

    backend = NbParallelBackend()
    pool = config.resolve_workers(nbparallel.kernel.runner.settings.workers)
    assert backend.effective_n_jobs(-1) == pool
    assert backend.effective_n_jobs(-2) == max(1, pool - 1)
    assert backend.effective_n_jobs(3) == 3
    assert backend.effective_n_jobs(None) == pool  # default_n_jobs: the whole pool
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)
    # n_jobs=1 runs in the caller, as joblib always does.
    with parallel_config(backend="nbparallel"):
        assert Parallel(n_jobs=1)(delayed(os.getpid)() for _ in range(2)) == [os.getpid()] * 2
    # require="sharedmem" needs threads: joblib falls back to its own.
    with parallel_config(backend="nbparallel"):
        assert Parallel(n_jobs=2, require="sharedmem")(delayed(os.getpid)() for _ in range(2)) == [os.getpid()] * 2


@pytest.mark.timeout(60)
def test_at_most_n_jobs_batches_run_at_once() -> None:
    def span(x: int) -> tuple[float, float]:
        began = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
        time.sleep(0.15)
        return began, time.monotonic()

    with parallel_config(backend="nbparallel"):
        spans = Parallel(n_jobs=2, batch_size=1)(delayed(span)(x) for x in range(6))
    events = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_return_as_generators(return_as: str) -> None:
    def slow_for_small(x: int) -> int:
        time.sleep(0.05 * (5 - x))
        return x

    with parallel_config(backend="nbparallel"):
        results = Parallel(n_jobs=2, return_as=return_as, batch_size=1)(delayed(slow_for_small)(x) for x in range(5))
        assert not isinstance(results, list)
        got = list(results)
    assert (got == list(range(5))) if return_as == "generator" else (sorted(got) == list(range(5)))


@pytest.mark.timeout(60)
def test_worker_output_reaches_the_caller(capfd: pytest.CaptureFixture[str]) -> None:
    def chatty(x: int) -> int:
        print(f"working on {x}")
        return x

    with parallel_config(backend="nbparallel"):
        Parallel(n_jobs=2)(delayed(chatty)(x) for x in range(3))
    out = capfd.readouterr().out
    assert all(f"working on {x}" in out for x in range(3))


@pytest.mark.timeout(60)
def test_ctrl_c_aborts_fast_and_stops_the_running_batches() -> None:
    nbparallel.map(abs, [1])  # the pool is up
    before = {w["pid"] for w in nbparallel.status()["workers"]}
    timer = threading.Timer(0.8, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with parallel_config(backend="nbparallel"), pytest.raises(KeyboardInterrupt):
        Parallel(n_jobs=2, batch_size=1)(delayed(time.sleep)(30) for _ in range(4))
    latency = time.monotonic() - started - 0.8
    timer.join()
    assert latency < 1.0, f"KeyboardInterrupt came {latency:.2f} s after the interrupt"
    # The workers that ran the sleeps were killed and replaced: the next call runs at once.
    started = time.monotonic()
    with parallel_config(backend="nbparallel"):
        assert Parallel(n_jobs=2)(delayed(abs)(-x) for x in range(4)) == [0, 1, 2, 3]
    assert time.monotonic() - started < 10
    assert before != {w["pid"] for w in nbparallel.status()["workers"]}


@pytest.mark.timeout(120)
def test_grid_search_through_the_backend_matches_a_serial_one() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    x, y = load_digits(return_X_y=True)
    x, y = x[:600], y[:600]
    grid = {"C": [1, 10], "gamma": [0.001, 0.01]}
    serial = GridSearchCV(SVC(), grid, cv=3, n_jobs=None).fit(x, y)
    with parallel_config(backend="nbparallel"):
        search = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(x, y)
    assert search.best_params_ == serial.best_params_
    assert search.best_score_ == pytest.approx(serial.best_score_)
    assert search.best_score_ > 0.85


@pytest.mark.timeout(60)
@pytest.mark.parametrize("first", ["nbparallel", "joblib"])
def test_the_backend_is_known_after_import_nbparallel_in_either_order(first: str, script_env: dict[str, str]) -> None:
    second = "joblib" if first == "nbparallel" else "nbparallel"
    code = (f"import {first}\nimport {second}\n"
            "from joblib import Parallel, delayed, parallel_config\n"
            "with parallel_config(backend='nbparallel'):\n"
            "    print(Parallel(n_jobs=2)(delayed(abs)(-x) for x in range(3)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 2]"


def test_import_nbparallel_does_not_import_joblib(script_env: dict[str, str]) -> None:
    code = "import sys, nbparallel\nprint(sorted(m for m in ('joblib', 'nbparallel.joblib_backend') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_joblib_hook_lives_only_in_the_callers_process() -> None:
    def hooked(_: int) -> tuple[bool, str | None]:
        import os
        import sys

        watching = any(type(finder).__name__ == "_Watcher" for finder in sys.meta_path)
        return watching, os.environ.get("NBPARALLEL_ROLE")

    # A worker imports nbparallel too, but never registers with joblib, and what a task starts
    # inherits no role.
    assert set(nbparallel.map(hooked, range(4))) == {(False, None)}
