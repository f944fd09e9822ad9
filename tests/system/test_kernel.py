"""nbparallel inside a real Jupyter kernel, driven over ZMQ with jupyter_client.

What only a real kernel shows: functions and data defined in cells, the stop button (SIGINT to the
kernel's whole process group), worker output routed to the right cell's iopub messages, the kernel
killed with SIGKILL, and which processes the kernel itself starts.

The kernel runs on this interpreter (scripts/run_notebook.py resolves "python3" to sys.executable),
and every fixture checks, after shutting its kernel down, that no process the kernel started lives on.
Timing asserts use wide margins: the machine may be small and busy.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from _notebooks import GONE_TIMEOUT, Kernel, is_alive, stream_text, wait_gone


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    """A kernel of the test's own, always shut down; the test fails if a process it started lives on.

    One per test rather than one per module: the sidecar and workers a kernel starts are children of
    this pytest process, and each test is checked for processes it leaves behind (tests/conftest.py).
    """
    started = Kernel()
    try:
        yield started
    finally:
        leftovers = started.close()
    assert not leftovers, f"processes outlived the kernel: {leftovers}"


# -- (a) notebook code over notebook data ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_notebook_function_and_lambda_over_kernel_data(kernel: Kernel) -> None:
    kernel.run("""
        import os
        import numpy as np
        import nbparallel

        data = np.arange(1_000_000, dtype=np.float64) % 97   # 8 MB that exists only in the kernel
        scale = 0.5

        def block_sum(k, size=50_000):  # reads the kernel's globals `data` and `scale`
            return float(data[k * size:(k + 1) * size].sum() * scale)
    """)
    parallel = kernel.value("nbparallel.map(block_sum, range(20))")
    serial = kernel.value("[block_sum(k) for k in range(20)]")
    assert parallel == serial
    assert len(set(parallel)) > 1  # a real computation, not a constant

    picks = kernel.value("nbparallel.map(lambda i: int(data[i]) * 2, range(0, 1_000_000, 99_991))")
    assert picks == [(i % 97) * 2 for i in range(0, 1_000_000, 99_991)]

    # The work ran in other processes, not in the kernel.
    kernel_pid, worker_pids = kernel.value("os.getpid(), sorted(set(nbparallel.map(lambda _: os.getpid(), range(8))))")
    assert kernel_pid == kernel.pid
    assert worker_pids and kernel_pid not in worker_pids


# -- (b) the stop button ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_interrupt_cancels_the_map_and_the_pool_survives(kernel: Kernel) -> None:
    kernel.run("""
        import time
        import nbparallel

        def slow(i):
            print(f"started {i}", flush=True)
            time.sleep(0.2)
            return i
    """)
    before = kernel.value("nbparallel.status()")

    # 100 items of 0.2 s: several seconds of work even with every CPU busy on it.
    msg_id = kernel.submit("results = nbparallel.map(slow, range(100))")
    kernel.wait_for_text(msg_id, "] started ")  # a worker is really running an item
    interrupted_at = time.monotonic()
    kernel.km.interrupt_kernel()  # SIGINT to the kernel's process group, like the stop button
    execution = kernel.wait(msg_id, timeout=30)
    latency = execution.reply_at - interrupted_at

    assert execution.status == "error", execution.describe()
    assert execution.ename in ("Interrupted", "KeyboardInterrupt"), execution.describe()
    assert latency < 5.0, f"KeyboardInterrupt took {latency:.2f} s after the interrupt"
    assert "started 99" not in execution.stdout  # it was cancelled, not run to the end

    # The next call works straight away, on the same sidecar (the SIGINT did not reach it).
    started = time.monotonic()
    assert kernel.value("nbparallel.map(lambda x: x + 1, range(20))") == list(range(1, 21))
    assert time.monotonic() - started < 30
    after = kernel.value("nbparallel.status()")
    assert after["pid"] == before["pid"]
    assert psutil.Process(after["pid"]).is_running()
    assert after["queued"] == 0 and after["jobs"] == 0  # the cancelled job left nothing queued


# -- (c) worker output goes to the right cell -------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_print_lands_in_the_cell_that_started_the_call(kernel: Kernel) -> None:
    kernel.run("""
        import nbparallel

        def greet(i):
            print(f"hello {i}")
            return i
    """)
    execution = kernel.run("squares = nbparallel.map(greet, range(6))")
    # Everything arrived before the cell went idle, which is when a front end stops listening.
    for i in range(6):
        assert f"[item {i}] hello {i}\n" in execution.stdout, execution.stdout


@pytest.mark.timeout(120)
def test_worker_print_from_cell_a_stays_out_of_cell_b(kernel: Kernel, tmp_path: Path) -> None:
    go = tmp_path / "go"  # the worker prints only once cell B is running
    cell_a = kernel.run(f"""
        import os, time
        import nbparallel

        def later():
            deadline = time.monotonic() + 60
            while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:
                time.sleep(0.02)
            print("printed by the task of cell A", flush=True)
            return 7

        future = nbparallel.submit(later)
    """)
    assert "printed by" not in cell_a.stdout  # cell A is over; its task still waits

    cell_b = kernel.run(f"""
        open({str(go)!r}, "w").close()
        print("cell B got", future.result(timeout=60))
    """)
    kernel.drain()  # anything still in flight is logged, and attributed to its parent

    assert "cell B got 7" in cell_b.stdout
    assert "printed by the task of cell A" not in stream_text(kernel.messages_for(cell_b.msg_id))
    assert "printed by the task of cell A" in stream_text(kernel.messages_for(cell_a.msg_id))


# -- (e) the kernel starts no process but the sidecar ----------------------------------------------


@pytest.mark.timeout(120)
def test_the_kernel_never_forks_and_only_the_sidecar_is_its_child(kernel: Kernel) -> None:
    # Python-level forks (os.fork, multiprocessing's fork) run the at-fork hooks; count them.
    # subprocess without preexec_fn (how the sidecar starts) does not run them, and is not a fork
    # of the interpreter's state in the sense that matters here.
    kernel.run("""
        import os
        import nbparallel
        forks = []
        os.register_at_fork(before=lambda: forks.append(1))
    """)
    kernel.run("""
        assert nbparallel.map(abs, range(-50, 50)) == [abs(i) for i in range(-50, 50)]
        assert sorted(nbparallel.imap(lambda x: x * x, range(30), ordered=False)) == [x * x for x in range(30)]
        assert nbparallel.submit(pow, 2, 10).result(timeout=60) == 1024
        with nbparallel.Executor(max_workers=2) as pool:
            assert list(pool.map(str, range(5))) == ["0", "1", "2", "3", "4"]
        crashed = nbparallel.map(lambda i: os._exit(3) if i == 2 else i, range(5), errors="return")
        assert isinstance(crashed[2], nbparallel.WorkerCrashed), crashed  # a worker was replaced
        assert nbparallel.map(len, ["ab", "c"]) == [2, 1]
    """)
    assert kernel.value("len(forks)") == 0

    status = kernel.value("nbparallel.status()")
    sidecar = status["pid"]
    children = psutil.Process(kernel.pid).children()
    assert [child.pid for child in children] == [sidecar], [(c.pid, c.cmdline()) for c in children]
    assert status["workers"]
    for worker in status["workers"]:
        assert psutil.Process(worker["pid"]).ppid() == sidecar
    # Everything below the kernel hangs off the sidecar.
    for process in psutil.Process(kernel.pid).children(recursive=True):
        if process.pid != sidecar and is_alive(process):
            assert process.ppid() == sidecar, process.cmdline()


# -- (d) SIGKILL to the kernel -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigkill_to_the_kernel_leaves_no_sidecar_or_worker(kernel: Kernel) -> None:
    kernel.run("""
        import time
        import nbparallel
        def tick(i):
            print(f"tick {i}", flush=True)
            time.sleep(0.3)
            return i
    """)
    status = kernel.value("nbparallel.status()")
    # Kill it mid-map, with every worker busy: the hardest case for cleanup.
    msg_id = kernel.submit("nbparallel.map(tick, range(1000))")
    kernel.wait_for_text(msg_id, "] tick ")
    below = kernel.note_descendants()  # psutil's view: everything the kernel started, workers included
    pids = {p.pid for p in below}
    assert status["pid"] in pids
    assert {w["pid"] for w in status["workers"]} <= pids
    assert len(below) >= 2  # the sidecar and at least one worker

    os.kill(kernel.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    alive = wait_gone(below, timeout=GONE_TIMEOUT)
    took = time.monotonic() - killed_at
    assert not alive, f"still alive {took:.1f} s after SIGKILL: {[(p.pid, p.cmdline()) for p in alive]}"
