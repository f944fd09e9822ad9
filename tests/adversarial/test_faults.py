"""Faults from outside: SIGKILL, SIGSTOP and SIGTERM to the sidecar, a worker and the caller, at
random moments; workers that cannot start; limits on descriptors and processes. Each ends in the
right outcome (values at their indices, the right error for the right item, what finished kept),
within seconds, and leaves nothing running."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import pytest
from _support import gone, leaves_nothing, marked, pool, script, two_workers, wait_for  # two_workers: the pool they run on

import nbparallel
from nbparallel.crashes import WorkerCrashed
from nbparallel.errors import SidecarDied, TaskTimeout

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("two_workers")]


def slow(x: int) -> int:
    time.sleep(0.01)
    return x * 3


def completed_of(error: BaseException) -> dict[int, Any]:
    getter = getattr(nbparallel.errors, "completed_of", None)
    found = getter(error) if getter is not None else None
    return found if found is not None else getattr(error, "completed")


def check_outcomes(results: list[Any], n: int) -> None:
    """Every item: its right value, or a WorkerCrashed naming that very item."""
    assert len(results) == n
    for index, outcome in enumerate(results):
        if isinstance(outcome, WorkerCrashed):
            assert outcome.index == index
        else:
            assert outcome == index * 3, (index, outcome)


# -- workers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_killed_at_a_random_moment(seed: int, sig: signal.Signals) -> None:
    rng = random.Random(seed)
    with leaves_nothing():
        _, workers = pool()
        victim = rng.choice(workers)
        delay = rng.uniform(0.0, 0.6)

        def kill_later() -> None:
            time.sleep(delay)
            try:
                os.kill(victim, sig)
            except ProcessLookupError:
                pass

        import threading

        threading.Thread(target=kill_later, daemon=True).start()
        results = nbparallel.map(slow, range(150), errors="return", progress=False)
        check_outcomes(results, 150)
        crashed = [r for r in results if isinstance(r, WorkerCrashed)]
        assert len(crashed) <= 1  # only the item that was running, if one was


def test_a_worker_killed_before_the_first_item_of_its_chunk_costs_no_item() -> None:
    """Killed while its chunk waits (here: while the items unpickle, slowly): no item was running,
    so the chunk runs again elsewhere, as retries allows, and every item gets its value."""

    items = [SlowToLoad(i) for i in range(10)]
    with leaves_nothing():
        _, workers = pool()
        import threading

        def kill_one() -> None:
            time.sleep(0.3)
            os.kill(workers[0], signal.SIGKILL)

        threading.Thread(target=kill_one, daemon=True).start()
        results = nbparallel.map(lambda item: item.value * 3, items, chunksize=5, errors="return", progress=False)
        assert results == [i * 3 for i in range(10)]


def _load_slowly(value: int) -> SlowToLoad:
    time.sleep(0.2)
    return SlowToLoad(value, loaded=True)


class SlowToLoad:
    def __init__(self, value: int, loaded: bool = False) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_load_slowly, (self.value,))


def test_a_stopped_worker_is_ended_by_the_items_timeout_and_resumed_otherwise() -> None:
    with leaves_nothing():
        _, workers = pool()

        def stop_then(sig: int, delay: float) -> None:
            time.sleep(delay)
            for pid in workers:
                os.kill(pid, sig)

        import threading

        threading.Thread(target=stop_then, args=(signal.SIGSTOP, 0.2), daemon=True).start()
        threading.Thread(target=stop_then, args=(signal.SIGCONT, 1.5), daemon=True).start()
        assert nbparallel.map(slow, range(100), progress=False) == [3 * i for i in range(100)]

    with leaves_nothing():
        _, workers = pool()

        def stop_first(x: int) -> int:
            if x == 0:
                os.kill(os.getpid(), signal.SIGSTOP)
            return x * 3

        results = nbparallel.map(stop_first, range(20), errors="return", timeout=1, progress=False)
        assert isinstance(results[0], TaskTimeout) and results[1:] == [3 * i for i in range(1, 20)]


# -- the sidecar --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_sidecar_killed_mid_call(sig: signal.Signals, seed: int) -> None:
    sidecar, workers = pool()
    import threading

    delay = random.Random(seed).uniform(0.05, 0.8)
    threading.Thread(target=lambda: (time.sleep(delay), os.kill(sidecar, sig)), daemon=True).start()
    with pytest.raises(SidecarDied) as caught:
        nbparallel.map(slow, range(2000), progress=False)
    assert all(v == 3 * i for i, v in completed_of(caught.value).items())
    wait_for(lambda: gone([sidecar, *workers]), 5, "the sidecar and its workers to go")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nbparallel.map(slow, range(10), progress=False) == [3 * i for i in range(10)]


def test_a_frozen_sidecar_becomes_sidecar_died_within_seconds() -> None:
    sidecar, workers = pool()
    import threading

    threading.Thread(target=lambda: (time.sleep(0.3), os.kill(sidecar, signal.SIGSTOP)), daemon=True).start()
    started = time.monotonic()
    with pytest.raises(SidecarDied, match="frozen"):
        nbparallel.map(slow, range(5000), progress=False)
    assert time.monotonic() - started < 12
    wait_for(lambda: gone([sidecar, *workers]), 5, "the frozen sidecar and its workers to go")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nbparallel.map(slow, range(10), progress=False) == [3 * i for i in range(10)]


def test_total_timeout_holds_while_the_sidecar_is_frozen() -> None:
    sidecar, _ = pool()
    os.kill(sidecar, signal.SIGSTOP)
    try:
        started = time.monotonic()
        results = nbparallel.map(slow, range(50), errors="return", total_timeout=1, progress=False)
        assert time.monotonic() - started < 4
        assert len(results) == 50 and all(isinstance(r, TaskTimeout) for r in results)
    finally:
        os.kill(sidecar, signal.SIGCONT)
    assert nbparallel.map(slow, range(5), progress=False) == [0, 3, 6, 9, 12]


def _leave_a_daemon(x: int) -> int:
    child = subprocess.Popen(["sleep", "300"], start_new_session=True)
    return child.pid


def test_what_tasks_started_goes_when_the_sidecar_is_killed() -> None:
    sidecar, workers = pool()
    daemons = nbparallel.map(_leave_a_daemon, range(2), progress=False)
    assert not gone(daemons)
    os.kill(sidecar, signal.SIGKILL)
    wait_for(lambda: gone([sidecar, *workers, *daemons]), 5, "the tasks' processes to go with the sidecar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nbparallel.map(slow, range(3), progress=False) == [0, 3, 6]


def test_a_task_that_kills_the_sidecar() -> None:
    def kill_parent(x: int) -> int:
        if x == 30:
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(10)
        return x * 3

    with pytest.raises(SidecarDied) as caught:
        nbparallel.map(kill_parent, range(60), chunksize=1, progress=False)
    assert all(v == 3 * i for i, v in completed_of(caught.value).items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert nbparallel.map(slow, range(3), progress=False) == [0, 3, 6]


# -- workers that cannot start ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["import os; os._exit(3)", "import ctypes; ctypes.string_at(0)", "raise SystemExit(4)",
                                 "raise KeyboardInterrupt"])
def test_a_preload_module_that_kills_its_worker_is_named_not_respawned_forever(tmp_path: Path, how: str) -> None:
    (tmp_path / "badpreload.py").write_text(how + "\n")
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(tmp_path)!r})
        import nbparallel
        nbparallel.configure(workers=2, preload=["badpreload"])
        started = time.monotonic()
        results = nbparallel.map(abs, range(-4, 0), errors="return", progress=False)
        print("took", round(time.monotonic() - started, 1))
        print("results", [type(r).__name__ if isinstance(r, BaseException) else r for r in results])
        print("message", str(results[0]) if isinstance(results[0], BaseException) else "")
        nbparallel.configure(preload=[])
        print("after", nbparallel.map(abs, range(-3, 0), progress=False))
    """)
    done = script(code, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    if how.startswith(("raise SystemExit", "raise KeyboardInterrupt")):
        assert lines["results"] == "[4, 3, 2, 1]"  # the worker reports the failed import and goes on
    else:
        assert lines["results"] == str(["WorkerCrashed"] * 4).replace('"', "'")
        assert "preload" in lines["message"] and "badpreload" in lines["message"]
    assert float(lines["took"]) < 10
    assert lines["after"] == "[3, 2, 1]"


def test_a_limit_on_processes_does_not_take_the_pool_down() -> None:
    """With RLIMIT_NPROC at what runs now, the sidecar starts but no worker can: the call fails at
    once, naming why, instead of spinning."""
    if os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC does not bind root")
    code = textwrap.dedent("""
        import os, resource, nbparallel
        me = os.getuid()
        tasks = 0
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == me:
                    tasks += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                pass
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks + 6, tasks + 6))  # this process's threads, the sidecar
        results = nbparallel.map(abs, [-1, -2, -3], errors="return", progress=False)
        print("limited", [type(r).__name__ if isinstance(r, BaseException) else r for r in results])
        print("message", results[0])
    """)
    done = script(code)
    assert done.returncode == 0, done.stderr
    limited = done.stdout.split("limited ", 1)[1]
    assert "WorkerCrashed" in limited or "[1, 2, 3]" in limited


def test_a_limit_on_memory_fails_the_item_that_passes_it() -> None:
    """Under RLIMIT_AS (inherited by the sidecar and the workers), an item that asks for more gets
    MemoryError as its outcome; the others, and the pool, go on."""
    code = textwrap.dedent("""
        import resource, nbparallel
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        nbparallel.configure(workers=2)
        def task(x):
            if x == 3:
                return len(bytearray(4 * 2**30))
            return x
        results = nbparallel.map(task, range(8), errors="return", progress=False)
        print("results", [type(r).__name__ if isinstance(r, BaseException) else r for r in results])
        print("after", nbparallel.map(abs, range(-3, 0), progress=False))
    """)
    done = script(code)
    assert done.returncode == 0, done.stderr
    assert "results [0, 1, 2, 'MemoryError', 4, 5, 6, 7]" in done.stdout
    assert "after [3, 2, 1]" in done.stdout


def test_a_low_limit_on_descriptors_fails_cleanly() -> None:
    code = textwrap.dedent("""
        import resource, nbparallel
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        nbparallel.configure(workers=2)
        print("small", nbparallel.map(abs, range(-5, 0), progress=False))
        import numpy as np
        arrays = [np.full(300_000, i, dtype=np.float64) for i in range(40)]  # each in shared memory
        try:
            sums = nbparallel.map(lambda a: float(a.sum()), arrays, errors="return", progress=False)
            print("big", all(s == 300_000 * i for i, s in enumerate(sums)) or sorted({type(s).__name__ for s in sums}))
        except Exception as exc:
            print("big", type(exc).__name__)
        print("after", nbparallel.map(abs, range(-3, 0), progress=False))
    """)
    done = script(code)
    assert done.returncode == 0, done.stderr
    assert "small [5, 4, 3, 2, 1]" in done.stdout and "after [3, 2, 1]" in done.stdout
    assert "big" in done.stdout


# -- the caller ---------------------------------------------------------------------------------


CALLER = textwrap.dedent("""
    import subprocess, sys, time, nbparallel
    def task(x):
        if x == 0:
            subprocess.Popen(["sleep", "300"], start_new_session=True)
        time.sleep(0.05)
        return x * 3
    nbparallel.configure(workers=2)
    print("pool", nbparallel.status()["pid"], flush=True)
    results = nbparallel.map(task, range(120), progress=False)
    print("done", results == [3 * i for i in range(120)], flush=True)
""")


def _caller() -> tuple[subprocess.Popen[str], int]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", CALLER], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("pool "), line
    return proc, int(line.split()[1])


def test_the_caller_stopped_and_continued_finishes_right() -> None:
    """A caller paused (SIGSTOP, a laptop lid) for longer than the liveness limit: when it goes on,
    its own pause is not taken for a frozen sidecar, and the call finishes with every value."""
    proc, _ = _caller()
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(6)  # past the liveness limit (5 s): a ping it sent before may look unanswered
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
        assert "done True" in out
        assert proc.returncode == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_caller_killed_takes_everything_with_it(sig: signal.Signals) -> None:
    proc, sidecar = _caller()
    try:
        time.sleep(0.6)
        tree = [sidecar, *(p.pid for p in psutil.Process(sidecar).children(recursive=True))]
        daemons = marked(sidecar)
        proc.send_signal(sig)
        proc.wait(timeout=10)
        wait_for(lambda: gone(tree) and gone(daemons), 5, "the sidecar, its workers and the tasks' processes to go")
    finally:
        proc.kill()
        proc.wait()


INTERRUPTED = textwrap.dedent("""
    import os, signal, sys, threading, time, nbparallel
    where = sys.argv[1]
    nbparallel.configure(workers=2)
    print("pool", nbparallel.status()["pid"], flush=True)
    def slow(x):
        time.sleep(0.02)
        return x
    def items():
        yield from range(40)
        threading.Event().wait()  # the input blocks
    if where == "frozen":
        os.kill(nbparallel.status()["pid"], signal.SIGSTOP)
    print("go", flush=True)
    started = time.monotonic()
    try:
        nbparallel.map(slow, items() if where == "input" else range(100_000), progress=False)
    except KeyboardInterrupt as error:
        done = getattr(error, "completed", None)
        print("interrupted", type(error).__name__, round(time.monotonic() - started, 1),
              all(v == i for i, v in (done or {}).items()), flush=True)
""")


@pytest.mark.parametrize("where", ["input", "frozen", "running"])
def test_one_ctrl_c_stops_the_call_wherever_it_waits(where: str) -> None:
    """Ctrl-C while the caller waits on a blocked input, on a frozen sidecar, or on results: one is
    enough, the call raises Interrupted at once, with what had finished."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED, where], stdout=subprocess.PIPE, text=True, env=env)
    sidecar = 0
    try:
        assert proc.stdout is not None
        sidecar = int(proc.stdout.readline().split()[1])
        assert proc.stdout.readline().strip() == "go"
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline()
        assert time.monotonic() - sent < 3, "one Ctrl-C did not stop the call at once"
        assert line.startswith("interrupted Interrupted"), line
        assert line.split()[-1] == "True"
        proc.wait(timeout=15)
    finally:
        if sidecar:
            try:
                os.kill(sidecar, signal.SIGCONT)  # a stopped sidecar cannot see its caller go
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
