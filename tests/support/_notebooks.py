"""Driving real kernels from tests: the notebook runner script, a Kernel over jupyter_client, and
process checks. Shared by test_kernel, test_magics_kernel, test_examples and test_progress."""

from __future__ import annotations

import ast
import importlib.util
import queue
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning.local_provisioner import LocalProvisioner

ROOT = Path(__file__).resolve().parents[2]
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
                self.take_reply(min(left, 0.05))
            msg = self.pump(min(left, 0.05))
            if (msg is not None and msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
                    and msg["parent_header"].get("msg_id") == msg_id):
                idle = True
        self.note_descendants()
        content, at = self.replies[msg_id]
        if content["status"] == "error":
            self.settle_abort(time.monotonic() + EXEC_TIMEOUT)
        return Execution(msg_id, content, self.messages_for(msg_id), at)

    def settle_abort(self, deadline: float) -> None:
        """After a failed cell, one shell round trip before the next request.

        ipykernel 6 aborts execute requests queued behind a failed cell until a "stop aborting"
        callback, scheduled with call_later(0), reaches its message queue. A request that arrives in
        the same event-loop turn is queued first (asyncio runs I/O callbacks before timers), so on a
        busy machine the test's next cell came back "aborted". Once a kernel_info request sent now
        has its reply, the callback is queued ahead of anything this client sends next. A person
        typing the next cell never races it; ipykernel 7 queues the abort differently."""
        info_id = self.kc.kernel_info()
        while info_id not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no kernel_info reply after a failed cell")
            self.take_reply(min(left, 0.05))

    def take_reply(self, timeout: float) -> None:
        """Log one shell reply, by the request it answers, if one comes within ``timeout``."""
        try:
            reply = self.kc.get_shell_msg(timeout=timeout)
        except queue.Empty:
            return
        self.replies[reply["parent_header"].get("msg_id")] = (reply["content"], time.monotonic())

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
