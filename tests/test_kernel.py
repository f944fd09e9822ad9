"""nbparallel inside a real Jupyter kernel, driven over ZMQ with jupyter_client.

What only a real kernel shows: functions and data defined in cells, the stop button (SIGINT to the
kernel's whole process group), worker output routed to the right cell's iopub messages, the kernel
killed with SIGKILL, and which processes the kernel itself starts.

The kernel runs on this interpreter (scripts/run_notebook.py resolves "python3" to sys.executable),
and every fixture checks, after shutting its kernel down, that no process the kernel started lives on.
Timing asserts use wide margins: the machine may be small and busy.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import queue
import signal
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 90.0  # seconds for a fresh kernel to answer: generous on a loaded machine
EXEC_TIMEOUT = 60.0  # seconds for one cell in these tests
GONE_TIMEOUT = 3.0  # seconds for the sidecar and workers to disappear after a SIGKILL (invariant: 2 s)


def load_runner() -> ModuleType:
    """scripts/run_notebook.py, imported by path (scripts/ is not a package)."""
    name = "nbparallel_scripts_run_notebook"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "run_notebook.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def is_alive(process: psutil.Process) -> bool:
    """Running and not a zombie. A zombie has exited; whether it is reaped depends on its parent
    (an orphan's new parent may be a PID 1 that never reaps), which is outside our control."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until none of ``processes`` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if is_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


@dataclass
class Execution:
    """The reply to one execute request and the iopub messages that carried its outputs."""

    msg_id: str
    reply: dict[str, Any]
    messages: list[dict[str, Any]]
    reply_at: float  # time.monotonic() when the reply arrived

    @property
    def status(self) -> str:
        return str(self.reply["status"])

    @property
    def ename(self) -> str | None:
        return self.reply.get("ename")

    @property
    def stdout(self) -> str:
        return stream_text(self.messages, "stdout")

    def result(self) -> Any:
        """The cell's value (its text/plain repr, read back as a Python literal)."""
        for msg in self.messages:
            if msg["msg_type"] == "execute_result":
                return ast.literal_eval(msg["content"]["data"]["text/plain"])
        raise AssertionError("the cell produced no value")

    def describe(self) -> str:
        """For assertion messages: the error and everything the cell printed."""
        trace = "\n".join(self.reply.get("traceback", []))
        return f"status={self.status} {self.ename}: {self.reply.get('evalue')}\n{trace}\n{stream_text(self.messages)}"


def stream_text(messages: list[dict[str, Any]], name: str | None = None) -> str:
    """The stream text among ``messages``, in arrival order (only ``name`` if given)."""
    return "".join(
        m["content"]["text"]
        for m in messages
        if m["msg_type"] == "stream" and (name is None or m["content"]["name"] == name)
    )


class Kernel:
    """A kernel on this interpreter, a blocking client, and a log of every iopub message.

    One log of all iopub messages (not one queue per request) lets a test ask later which cell a
    message was attributed to, including messages that arrive after their cell finished.
    """

    def __init__(self) -> None:
        runner = load_runner()
        self.km = KernelManager(kernel_name="python3", kernel_spec_manager=runner.ThisPythonKernelSpecs())
        self.km.start_kernel(cwd=str(ROOT), extra_arguments=list(runner.KERNEL_ARGUMENTS))
        self.iopub: list[dict[str, Any]] = []
        self.replies: dict[str, tuple[dict[str, Any], float]] = {}
        # Every process seen below the kernel, so teardown can check each one is gone even when the
        # kernel itself was killed and its orphans were re-parented away from it.
        self.seen: dict[int, psutil.Process] = {}
        self.kc: BlockingKernelClient = self.km.client()
        try:
            assert isinstance(self.km.provisioner, LocalProvisioner)  # a local process we can signal
            assert self.km.provisioner.pid is not None
            self.pid: int = self.km.provisioner.pid
            self.kc.start_channels()
            self.kc.wait_for_ready(timeout=READY_TIMEOUT)
        except BaseException:  # no fixture owns it yet: don't leave it running
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=True)
            raise
        self.note_descendants()

    # -- talking to it ---------------------------------------------------------------------------

    def submit(self, code: str) -> str:
        """Send ``code`` for execution; return the request's msg_id without waiting."""
        return str(self.kc.execute(textwrap.dedent(code), allow_stdin=False))

    def pump(self, timeout: float) -> dict[str, Any] | None:
        """Receive one iopub message (or None after ``timeout``) and log it."""
        try:
            msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.iopub.append(msg)
        return msg

    def drain(self, quiet: float = 0.5) -> None:
        """Log iopub messages until none has come for ``quiet`` seconds."""
        while self.pump(quiet) is not None:
            pass

    def messages_for(self, msg_id: str) -> list[dict[str, Any]]:
        """Logged iopub messages whose parent is the request ``msg_id``."""
        return [m for m in self.iopub if m["parent_header"].get("msg_id") == msg_id]

    def wait(self, msg_id: str, timeout: float = EXEC_TIMEOUT) -> Execution:
        """Wait for the request's reply and for its "idle" status (after which a front end stops
        listening for that cell's outputs); return what it produced."""
        deadline = time.monotonic() + timeout
        idle = False
        while msg_id not in self.replies or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply/idle for {msg_id} within {timeout} s; "
                                   f"output so far:\n{stream_text(self.messages_for(msg_id))}")
            if msg_id not in self.replies:
                try:
                    reply = self.kc.get_shell_msg(timeout=min(left, 0.05))
                    self.replies[reply["parent_header"].get("msg_id")] = (reply["content"], time.monotonic())
                except queue.Empty:
                    pass
            msg = self.pump(min(left, 0.05))
            if (msg is not None and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                    and msg["parent_header"].get("msg_id") == msg_id):
                idle = True
        self.note_descendants()
        content, at = self.replies[msg_id]
        return Execution(msg_id, content, self.messages_for(msg_id), at)

    def wait_for_text(self, msg_id: str, text: str, timeout: float = EXEC_TIMEOUT) -> None:
        """Wait until the request's stream output contains ``text`` (the cell keeps running)."""
        deadline = time.monotonic() + timeout
        while text not in stream_text(self.messages_for(msg_id)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{text!r} not printed within {timeout} s; got:\n"
                                   f"{stream_text(self.messages_for(msg_id))}")
            self.pump(0.05)

    def run(self, code: str, timeout: float = EXEC_TIMEOUT) -> Execution:
        """Execute ``code`` and require that it succeeded."""
        execution = self.wait(self.submit(code), timeout)
        assert execution.status == "ok", execution.describe()
        return execution

    def value(self, expression: str, timeout: float = EXEC_TIMEOUT) -> Any:
        """Evaluate ``expression`` in the kernel; its repr must be a Python literal."""
        return self.run(expression, timeout).result()

    # -- processes -------------------------------------------------------------------------------

    def note_descendants(self) -> list[psutil.Process]:
        """The kernel's descendants now; remember each one for the final check."""
        try:
            found: list[psutil.Process] = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for process in found:
            self.seen.setdefault(process.pid, process)
        return found

    def close(self) -> list[str]:
        """Shut the kernel down and return a description of every process it started that is still
        alive after a grace period (those are then killed, so nothing outlives the test)."""
        self.note_descendants()
        try:
            self.kc.stop_channels()
        finally:
            # A polite shutdown first, so the kernel exits through atexit as it would in Jupyter;
            # jupyter_client kills it if it does not go within its shutdown wait.
            self.km.shutdown_kernel(now=not self.km.is_alive())
        left = wait_gone(list(self.seen.values()), timeout=5.0)
        described = []
        for process in left:
            try:
                described.append(f"pid {process.pid}: {' '.join(process.cmdline())}")
                process.kill()
            except psutil.NoSuchProcess:
                pass
        return described


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
