"""nbparallel as a drop-in (issue 12), a test per point: a task's exception reaches the caller as
itself, everywhere; the kernel's reader never runs the user's code and never dies; the
concurrent.futures contract (states, cancel, shutdown, the interpreter's exit, Executor's signature
and map); joblib's initializer and BaseExceptions; workers stopped so that what a task started
cleans up. CPython's and joblib's own suites are test_cpython_futures.py and test_joblib_contract.py."""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest

import nbparallel
from nbparallel.crashes import InitializerFailed, ResultUnreadable, WorkerCrashed
from nbparallel.errors import RemoteTraceback, SidecarDied, TaskError, details
from nbparallel.kernel import runner

# -- the exception as raised ------------------------------------------------------------------------


class Finicky(Exception):
    """Its __init__ takes other arguments than its args (pickle would call it with its args)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")
        self.a, self.b = a, b


def _raise(kind: str) -> Any:
    if kind == "called":
        raise subprocess.CalledProcessError(3, ["make", "all"], output="out", stderr="err")
    if kind == "missing":
        raise FileNotFoundError(2, "No such file or directory", "/no/such")
    if kind == "exit":
        raise SystemExit(4)
    if kind == "interrupt":
        raise KeyboardInterrupt("from the task")
    if kind == "timeout":
        raise TimeoutError("the task's own")
    if kind == "finicky":
        raise Finicky(1, 2)
    return kind


def _check_as_raised(kind: str, error: BaseException) -> None:
    expected = {"called": subprocess.CalledProcessError, "missing": FileNotFoundError, "exit": SystemExit,
                "interrupt": KeyboardInterrupt, "timeout": TimeoutError, "finicky": Finicky}[kind]
    assert type(error) is expected, repr(error)
    if kind == "called":
        assert isinstance(error, subprocess.CalledProcessError)
        assert (error.returncode, error.cmd, error.output, error.stderr) == (3, ["make", "all"], "out", "err")
    elif kind == "missing":
        assert isinstance(error, FileNotFoundError)
        assert (error.errno, error.strerror, error.filename) == (2, "No such file or directory", "/no/such")
    elif kind == "exit":
        assert isinstance(error, SystemExit) and error.code == 4
    elif kind == "finicky":
        assert isinstance(error, Finicky) and (error.a, error.b, error.args) == (1, 2, ("1/2",))
    cause = error.__cause__
    assert isinstance(cause, RemoteTraceback) and details(error) is cause
    assert "in _raise" in cause.tb and cause.tb.startswith('\n"""\n')  # concurrent.futures' _RemoteTraceback text
    assert not hasattr(error, "_nbparallel_attempts")


KINDS = ["called", "missing", "exit", "interrupt", "timeout", "finicky"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", KINDS)
def test_map_raises_the_tasks_own_exception(kind: str) -> None:
    with pytest.raises(BaseException) as caught:
        nbparallel.map(_raise, ["ok", kind, "ok"], chunksize=1, progress=False)
    error = caught.value
    _check_as_raised(kind, error)
    found = details(error)
    assert found is not None and found.index == 1 and found.item == repr(kind) and found.attempts == 1
    assert 1 not in found.completed and all(value == "ok" for value in found.completed.values())
    if sys.version_info >= (3, 11):
        assert error.__notes__ == [f"nbparallel: raised by item 1 ({kind!r}) in a worker"]
    else:  # no notes printed before 3.11: the remote traceback says which item
        assert f"item 1 ({kind!r})" in str(error.__cause__)


@pytest.mark.timeout(60)
def test_errors_return_puts_each_exception_itself_in_its_place() -> None:
    results = nbparallel.map(_raise, ["ok", *KINDS], errors="return", progress=False)
    assert results[0] == "ok"
    for index, (kind, error) in enumerate(zip(KINDS, results[1:]), start=1):
        _check_as_raised(kind, error)
        assert details(error).index == index  # type: ignore[union-attr]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["interrupt", "timeout", "missing"])
def test_imap_submit_and_executor_map_raise_it_too(kind: str) -> None:
    with pytest.raises(BaseException) as caught:
        list(nbparallel.imap(_raise, ["ok", kind], progress=False))
    _check_as_raised(kind, caught.value)
    future = nbparallel.submit(_raise, kind)
    _check_as_raised(kind, future.exception(timeout=30))  # type: ignore[arg-type]
    assert details(future.exception()).item == f"_raise({kind!r})"  # type: ignore[arg-type,union-attr]
    with nbparallel.Executor(max_workers=2) as pool:
        results = pool.map(_raise, ["ok", kind])
        assert next(results) == "ok"
        with pytest.raises(BaseException) as caught:
            next(results)
    _check_as_raised(kind, caught.value)


def test_the_remote_traceback_prints_with_the_exception() -> None:
    # The rest of CPython's ProcessPoolExecutorTest.test_traceback (its exact-type check excepted).
    error = nbparallel.submit(_raise, "finicky").exception(timeout=30)
    assert error is not None
    printed = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert "raise Finicky(1, 2)" in printed and "The above exception was the direct cause" in printed


class _RebuildsInItsWorkerOnly(Exception):
    def __reduce__(self) -> tuple[Any, ...]:
        return (_only_in_pid, (os.getpid(),))


def _only_in_pid(pid: int) -> BaseException:
    if os.getpid() != pid:
        sys.exit("unpickling this exception calls sys.exit outside its worker")
    return ValueError("rebuilt")


def _raise_worker_only() -> None:
    raise _RebuildsInItsWorkerOnly("what it said")


@pytest.mark.timeout(60)
def test_an_exception_that_cannot_be_rebuilt_is_a_task_error_naming_it() -> None:
    error = nbparallel.submit(_raise_worker_only).exception(timeout=30)
    assert isinstance(error, TaskError)
    assert error.type_name.endswith("_RebuildsInItsWorkerOnly") and error.message == "what it said"
    assert "SystemExit" in str(error) and "raise _RebuildsInItsWorkerOnly" in error.remote_traceback
    assert nbparallel.submit(abs, -1).result(timeout=30) == 1  # the reader lives on


# -- the reader: never the user's code, never dead ----------------------------------------------------


class _Loud:
    """A result whose unpickling in the kernel runs code: what it does is chosen by ``how``."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_loud, (self.how, os.getpid()))


SEEN_ON: list[str] = []


def _rebuild_loud(how: str, worker: int) -> Any:
    if os.getpid() == worker:
        return _Loud(how)
    SEEN_ON.append(threading.current_thread().name)
    if how == "exit":
        raise SystemExit(1)
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "error":
        raise RuntimeError("no")
    return how


def _loud(how: str) -> _Loud:
    return _Loud(how)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "interrupt", "error"])
def test_a_result_that_cannot_be_unpickled_fails_its_future_alone(how: str) -> None:
    SEEN_ON.clear()
    bad, good = nbparallel.submit(_loud, how), nbparallel.submit(abs, -2)
    error = bad.exception(timeout=30)
    assert isinstance(error, ResultUnreadable) and isinstance(error, cf.process.BrokenProcessPool)
    assert good.result(timeout=30) == 2
    assert SEEN_ON and "nbparallel-reader" not in SEEN_ON and "MainThread" not in SEEN_ON
    assert runner.current_client().reader.is_alive()  # type: ignore[union-attr]
    assert nbparallel.submit(abs, -3).result(timeout=30) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["exit", "interrupt"])
def test_in_map_such_a_result_fails_its_item_not_the_call(how: str) -> None:
    SEEN_ON.clear()
    results = nbparallel.map(_loud, ["fine", how, "fine"], chunksize=1, errors="return", progress=False)
    assert results[0] == results[2] == "fine"
    assert isinstance(results[1], ResultUnreadable)


@pytest.mark.timeout(60)
def test_callbacks_run_off_the_reader_and_may_wait_for_other_futures() -> None:
    threads: list[str] = []
    got: list[Any] = []
    first = nbparallel.submit(time.sleep, 0.3)
    second = nbparallel.submit(abs, -5)

    def waits(future: cf.Future[Any]) -> None:
        threads.append(threading.current_thread().name)
        got.append(second.result(timeout=20))
        got.append(nbparallel.submit(abs, -6).result(timeout=20))  # a new call from a callback

    first.add_done_callback(waits)
    first.result(timeout=30)
    deadline = time.monotonic() + 20
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == [5, 6]
    assert threads and threads[0] not in ("nbparallel-reader", "nbparallel-results")


@pytest.mark.timeout(90)
def test_if_the_reader_dies_every_pending_call_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbparallel.kernel import tasks

    nbparallel.map(abs, [1], progress=False)
    waiting = nbparallel.submit(time.sleep, 30)
    deadline = time.monotonic() + 20
    while not waiting.running():
        assert time.monotonic() < deadline
        time.sleep(0.02)

    def broken(self: Any) -> None:
        raise SystemExit("a bug")  # not an Exception: it gets past the handler of one call

    monkeypatch.setattr(tasks.Task, "started", broken)
    started = time.monotonic()
    other = nbparallel.submit(abs, -1)  # its `started` notice takes the reader down
    for future in (waiting, other):
        error = future.exception(timeout=10)
        assert isinstance(error, SidecarDied) and "reader thread failed" in str(error)
    assert time.monotonic() - started < 5
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runner.SidecarRestarted)
        assert nbparallel.submit(abs, -7).result(timeout=30) == 7


# -- the concurrent.futures contract ------------------------------------------------------------------


def test_the_executor_takes_processpoolexecutors_arguments() -> None:
    parameters = inspect.signature(nbparallel.Executor).parameters
    assert list(parameters) == ["max_workers", "mp_context", "initializer", "initargs", "max_tasks_per_child"]
    assert [p.default for p in parameters.values()] == [None, None, None, (), None]
    for wrong in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            nbparallel.Executor(max_workers=wrong)
    with pytest.raises(ValueError):
        nbparallel.Executor(max_tasks_per_child=0)
    with pytest.raises(TypeError):
        nbparallel.Executor(initializer=3)  # type: ignore[arg-type]
    map_parameters = inspect.signature(nbparallel.Executor.map).parameters
    assert [(p.name, p.default) for p in map_parameters.values() if p.kind == p.KEYWORD_ONLY] == [
        ("timeout", None), ("chunksize", 1), ("buffersize", None)]


@pytest.mark.timeout(60)
def test_states_pending_running_finished_and_cancel_only_while_pending() -> None:
    with nbparallel.Executor(max_workers=1) as pool:
        running = pool.submit(time.sleep, 1.0)
        queued = pool.submit(abs, -1)
        deadline = time.monotonic() + 20
        while not running.running():
            assert time.monotonic() < deadline, "the future never turned RUNNING"
            time.sleep(0.01)
        assert not queued.running() and not queued.done()
        assert not running.cancel()  # running: cancel() leaves it alone
        assert queued.cancel() and queued.cancelled()
        assert running.result(timeout=30) is None and not running.cancelled()
        assert "finished" in repr(running)


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_cancels_only_the_pending_ones() -> None:
    pool = nbparallel.Executor(max_workers=1)
    first = pool.submit(time.sleep, 0.5)
    deadline = time.monotonic() + 20
    while not first.running():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rest = [pool.submit(time.sleep, 0.5) for _ in range(4)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.done() and not first.cancelled() and first.exception() is None
    assert all(f.cancelled() for f in rest)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(abs, 1)


@pytest.mark.timeout(60)
def test_map_submits_at_once_and_buffersize_reads_lazily(tmp_path: Path) -> None:
    def touch(name: str) -> str:
        (tmp_path / name).touch()
        return name

    with nbparallel.Executor(max_workers=2) as pool:
        pool.map(touch, ["a", "b", "c"])  # never iterated: ran all the same, as concurrent.futures does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    read: list[int] = []

    def numbers() -> Any:
        for n in range(100):
            read.append(n)
            yield n

    with nbparallel.Executor(max_workers=2) as pool:
        results = pool.map(abs, numbers(), buffersize=3)
        assert len(read) == 3
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        assert len(read) <= 3 + 5
        assert list(results) == list(range(5, 100))
        with pytest.raises(ValueError):
            pool.map(abs, [1], buffersize=0)
        assert list(pool.map(pow, range(7), range(7), chunksize=3)) == [n**n for n in range(7)]


@pytest.mark.timeout(60)
def test_max_tasks_per_child_replaces_the_worker() -> None:
    with nbparallel.Executor(max_workers=1, max_tasks_per_child=2) as pool:
        pids = [pool.submit(os.getpid).result(timeout=30) for _ in range(6)]
    assert all(pids.count(pid) <= 2 for pid in pids) and len(set(pids)) >= 3, pids


_INIT_STATE = "uninitialized"


def _set_state(value: str) -> None:
    global _INIT_STATE
    _INIT_STATE = value


def _get_state(_: Any = None) -> str:
    return _INIT_STATE


def _fail_init() -> None:
    raise ValueError("error in initializer")


@pytest.mark.timeout(60)
def test_initializer_runs_in_each_worker_and_a_failing_one_breaks_the_executor(
        caplog: pytest.LogCaptureFixture) -> None:
    with nbparallel.Executor(max_workers=2, initializer=_set_state, initargs=("ready",)) as pool:
        assert {f.result(timeout=30) for f in [pool.submit(_get_state) for _ in range(6)]} == {"ready"}
    assert nbparallel.submit(_get_state).result(timeout=30) in ("uninitialized", "ready")  # no initializer of its own
    pool = nbparallel.Executor(max_workers=2, initializer=_fail_init)
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        error = pool.submit(abs, 1).exception(timeout=30)
        assert isinstance(error, InitializerFailed) and isinstance(error, cf.BrokenExecutor)
        deadline = time.monotonic() + 10
        while not pool._broken:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert any("ValueError: error in initializer" in r.getMessage() for r in caplog.records)
    with pytest.raises(cf.BrokenExecutor):
        pool.submit(abs, 1)
    pool.shutdown()


EXIT_SCRIPT = textwrap.dedent("""
    import sys, time, nbparallel

    def sleep_and_print(t, message):
        time.sleep(t)
        print(message, flush=True)

    if __name__ == "__main__":
        pool = nbparallel.Executor(2)
        pool.submit(sleep_and_print, 1.0, "apple")
        if sys.argv[1] == "no-wait":
            pool.shutdown(wait=False)
""")

SUBMIT_AT_EXIT = textwrap.dedent("""
    import atexit, nbparallel

    @atexit.register
    def run_last():
        try:
            pool.submit(id, None)
        except RuntimeError as error:
            print("runtime-error:", error)

    pool = nbparallel.Executor(2)
    pool.submit(id, 42).result()
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit", "no-wait"])
def test_the_interpreter_waits_for_pending_futures(how: str, tmp_path: Path, script_env: dict[str, str]) -> None:
    # CPython's test_interpreter_shutdown and test_hang_gh83386, with nbparallel.Executor.
    script = tmp_path / "exits.py"
    script.write_text(EXIT_SCRIPT)
    done = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, env=script_env,
                          timeout=100)
    assert done.returncode == 0 and done.stdout.strip() == "apple", done.stderr
    assert not done.stderr.strip(), done.stderr


@pytest.mark.timeout(120)
def test_submit_during_interpreter_shutdown_raises(tmp_path: Path, script_env: dict[str, str]) -> None:
    # CPython's test_submit_after_interpreter_shutdown, with nbparallel.Executor.
    script = tmp_path / "late.py"
    script.write_text(SUBMIT_AT_EXIT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=script_env,
                          timeout=100)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "runtime-error: cannot schedule new futures after interpreter shutdown"


# -- joblib ------------------------------------------------------------------------------------------

joblib = pytest.importorskip("joblib")


def _interrupt(x: int) -> int:
    time.sleep(0.05)
    if x == 0:
        raise KeyboardInterrupt
    return x


def _exit(x: int) -> int:
    if x == 0:
        raise SystemExit(2)
    return x


def _finicky(x: int) -> int:
    if x == 7:
        raise Finicky(7, 8)
    return x


@pytest.mark.timeout(60)
def test_joblib_gets_basexceptions_and_finicky_ones_as_themselves() -> None:
    from joblib import Parallel, delayed

    # joblib's test_error_capture, for its cases that apply to a shared pool
    with pytest.raises(ZeroDivisionError):
        Parallel(n_jobs=2, backend="nbparallel")(delayed(lambda x, y: x / y)(x, y) for x, y in [(0, 1), (1, 0)])
    with pytest.raises(KeyboardInterrupt) as interrupted:
        Parallel(n_jobs=2, backend="nbparallel")(delayed(_interrupt)(x) for x in (1, 0))
    assert type(interrupted.value) is KeyboardInterrupt and details(interrupted.value) is not None
    with pytest.raises(SystemExit) as exited:
        Parallel(n_jobs=2, backend="nbparallel")(delayed(_exit)(x) for x in (1, 0))
    assert exited.value.code == 2
    with pytest.raises(Finicky) as finicky:
        Parallel(n_jobs=2, backend="nbparallel")(delayed(_finicky)(i) for i in range(30))
    assert (finicky.value.a, finicky.value.b) == (7, 8)
    assert Parallel(n_jobs=2, backend="nbparallel")(delayed(abs)(-x) for x in range(3)) == [0, 1, 2]


def _pid_state(_: int) -> tuple[int, str]:
    return os.getpid(), _INIT_STATE


@pytest.mark.timeout(60)
def test_joblib_initializer_and_initargs_are_honoured() -> None:
    from joblib import Parallel, delayed, parallel_config

    tag = uuid.uuid4().hex
    got = Parallel(n_jobs=2, backend="nbparallel", initializer=_set_state, initargs=(tag,))(
        delayed(_pid_state)(i) for i in range(8))
    assert {state for _, state in got} == {tag}
    other = uuid.uuid4().hex
    with parallel_config(backend="nbparallel", n_jobs=2, initializer=_set_state, initargs=(other,)):
        assert {state for _, state in Parallel()(delayed(_pid_state)(i) for i in range(8))} == {other}


# -- stopping workers ---------------------------------------------------------------------------------

NESTED_LOKY = textwrap.dedent("""
    import numpy as np, joblib, nbparallel

    def inner(x):
        return float(x.sum())

    def outer(i):
        data = np.ones(300_000) * i  # 2.4 MB: joblib memmaps it in a folder of /dev/shm
        return joblib.Parallel(n_jobs=2, backend="loky", max_nbytes="1M")(joblib.delayed(inner)(data) for _ in range(4))

    print(nbparallel.map(outer, range(2), progress=False), flush=True)
    nbparallel.shutdown()
""")


@pytest.mark.timeout(180)
def test_nested_loky_leaves_nothing_in_dev_shm(tmp_path: Path, script_env: dict[str, str]) -> None:
    pytest.importorskip("numpy")
    from _shm_leftovers import OURS, SHM, TAG_VARIABLE, ShmWatcher, wait_for

    if not SHM.is_dir():
        pytest.skip("no /dev/shm here")
    tag = uuid.uuid4().hex
    watcher = ShmWatcher(tag=tag)
    watcher.start()
    try:
        script = tmp_path / "nested.py"
        script.write_text(NESTED_LOKY)
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150,
                              env={**script_env, TAG_VARIABLE: tag})
        assert done.returncode == 0, done.stderr
        assert "[[0.0, 0.0, 0.0, 0.0], [300000.0" in done.stdout
        assert any("loky" in name for name in watcher.seen), "the nested loky pools made no semaphores here"
        assert wait_for(lambda: not watcher.leftovers()[OURS], timeout=10), watcher.leftovers()[OURS]
    finally:
        watcher.stop()


def _handles_sigterm(path: str) -> None:
    def on_term(signum: int, frame: Any) -> None:
        Path(path).write_text("cleaned up")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    time.sleep(60)


@pytest.mark.timeout(60)
def test_a_stopped_task_gets_sigterm_first(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    future = nbparallel.submit(_handles_sigterm, str(marker))
    deadline = time.monotonic() + 20
    while not future.running() or not any(w["state"] == "busy" for w in nbparallel.status()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)  # the handler is installed
    assert future.stop()
    assert wait_for_file(marker, 10) and marker.read_text() == "cleaned up"


def wait_for_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.timeout(60)
def test_a_crash_is_still_a_broken_process_pool() -> None:
    error = nbparallel.submit(os._exit, 3).exception(timeout=30)
    assert isinstance(error, WorkerCrashed) and isinstance(error, cf.process.BrokenProcessPool)
