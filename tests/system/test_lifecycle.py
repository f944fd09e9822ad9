"""A caller script's life: Ctrl-C, exit and SIGKILL, with real processes watched through psutil."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from typing import Any

import psutil
import pytest

import nbparallel

INTERRUPTIBLE = textwrap.dedent(
    """
    import sys, time
    import nbparallel

    def slow(x):
        time.sleep(0.2)
        return x

    status = nbparallel.status()
    print("PIDS", status["pid"], *[w["pid"] for w in status["workers"]], flush=True)
    try:
        nbparallel.map(slow, range(1000), chunksize=1)
    except KeyboardInterrupt as err:
        print("INTERRUPTED", type(err).__name__, len(err.completed), time.monotonic(), flush=True)
    after = nbparallel.status()
    print("SAME SIDECAR", after["pid"] == status["pid"], flush=True)
    print("NEXT", nbparallel.map(abs, [-1, -2, -3]), flush=True)
    """
)

HOLDING = textwrap.dedent(
    """
    import time
    import nbparallel
    status = nbparallel.status()
    print("PIDS", status["pid"], *[w["pid"] for w in status["workers"]], flush=True)
    nbparallel.map(time.sleep, [60] * 4, chunksize=1)
    """
)


def _start(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    # A session of its own, as Jupyter gives a kernel: the "stop button" signals its whole group.
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)


def _pids(proc: subprocess.Popen[str]) -> list[int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("PIDS"), line + (proc.stderr.read() if proc.stderr else "")
    return [int(p) for p in line.split()[1:]]


def _wait_gone(pids: list[int], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_ctrl_c_to_the_process_group_cancels_fast_and_spares_the_sidecar(script_env: dict[str, str]) -> None:
    proc = _start(INTERRUPTIBLE, script_env)
    try:
        pids = _pids(proc)
        time.sleep(1.0)  # the map is under way
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    assert "INTERRUPTED" in lines, out + err
    name, completed, at = lines["INTERRUPTED"].split()
    assert name == "Interrupted" and int(completed) > 0
    latency = float(at) - sent
    assert latency < 1.5, f"KeyboardInterrupt came {latency:.2f} s after the signal"
    assert lines["SAME"] == "SIDECAR True", "the SIGINT must not reach the sidecar"
    assert lines["NEXT"] == "[1, 2, 3]"
    assert proc.returncode == 0, err
    assert not _wait_gone(pids, 3), "the sidecar and workers end with the script"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sigkill", "sigterm", "exit"])
def test_nothing_outlives_the_caller(script_env: dict[str, str], how: str) -> None:
    code = HOLDING if how != "exit" else "import nbparallel\ns = nbparallel.status()\nprint('PIDS', s['pid'], *[w['pid'] for w in s['workers']], flush=True)\n"
    proc = _start(code, script_env)
    try:
        pids = _pids(proc)
        time.sleep(0.5)
        if how == "sigkill":
            proc.kill()
        elif how == "sigterm":
            proc.terminate()
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        alive = _wait_gone(pids, 2.0)
        assert not alive, f"still alive {time.monotonic() - killed_at:.1f} s after the caller died: {alive}"
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.timeout(60)
def test_worker_print_and_logging_reach_the_caller_tagged(script_env: dict[str, str]) -> None:
    code = textwrap.dedent(
        """
        import logging, sys
        import nbparallel

        def chatty(x):
            print("hello from", x)
            logging.getLogger("job").warning("careful with %s", x)
            print("to stderr", x, file=sys.stderr)
            return x

        print("RESULT", nbparallel.map(chatty, range(3)))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env, timeout=60)
    assert done.returncode == 0, done.stderr
    for x in range(3):
        assert f"[item {x}] hello from {x}" in done.stdout
        assert f"[item {x}] careful with {x}" in done.stderr
        assert f"[item {x}] to stderr {x}" in done.stderr
    assert "RESULT [0, 1, 2]" in done.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["shutdown", "sidecar SIGKILL", "caller SIGKILL"])
def test_no_file_or_directory_is_left_behind(script_env: dict[str, str], how: str) -> None:
    import glob
    import tempfile

    pattern = os.path.join(tempfile.gettempdir(), "nbparallel-*")
    before = set(glob.glob(pattern))
    proc = _start("import nbparallel, time\ns = nbparallel.status()\n"
                  "print('PIDS', s['pid'], *[w['pid'] for w in s['workers']], flush=True)\n"
                  "nbparallel.map(abs, [1]); time.sleep(60 if %r != 'shutdown' else 0)\nnbparallel.shutdown()\n" % how,
                  script_env)
    try:
        pids = _pids(proc)
        if how == "sidecar SIGKILL":
            os.kill(pids[0], signal.SIGKILL)
        elif how == "caller SIGKILL":
            proc.kill()
        time.sleep(0.5)
        proc.kill()
        proc.wait(timeout=10)
        assert not _wait_gone(pids, 3)
    finally:
        proc.kill()
        proc.communicate()
    assert set(glob.glob(pattern)) == before


@pytest.mark.timeout(120)
def test_a_forked_child_gets_its_own_sidecar_and_leaves_the_parents_alone() -> None:
    import multiprocessing

    from nbparallel.kernel import runner

    assert nbparallel.map(abs, [-1, -2]) == [1, 2]
    parent_sidecar = runner.current_client().pid  # type: ignore[union-attr]

    def child(queue: Any) -> None:
        values = nbparallel.map(lambda x: x * 100, range(5))
        queue.put((values, runner.current_client().pid))  # type: ignore[union-attr]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a process with threads (3.12+)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue,))
        process.start()
        values, child_sidecar = queue.get(timeout=90)
        process.join(30)
    assert values == [0, 100, 200, 300, 400]
    assert child_sidecar != parent_sidecar
    assert process.exitcode == 0
    # The parent's sidecar is untouched, and its next results are its own.
    assert runner.current_client().pid == parent_sidecar  # type: ignore[union-attr]
    assert nbparallel.map(lambda x: -x, range(5)) == [0, -1, -2, -3, -4]
    # The child's sidecar follows the child (multiprocessing ends it with os._exit: no exit handlers).
    deadline = time.monotonic() + 5
    while psutil.pid_exists(child_sidecar) and psutil.Process(child_sidecar).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child's sidecar outlived the child"
        time.sleep(0.05)
