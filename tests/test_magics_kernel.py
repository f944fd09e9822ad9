"""%%parallel and %nbparallel end to end in a real IPython kernel (jupyter_client), and the examples.

Each test starts its own kernel on this interpreter (the kernelspec of scripts/run_notebook.py) and
shuts it down; the kernel's sidecar and workers go with it.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from jupyter_client import KernelManager

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run_notebook = _load_script("run_notebook")


class Kernel:
    """A kernel and a log of its iopub messages, kept per request (by parent msg_id)."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.km = KernelManager(kernel_name=run_notebook.KERNEL_NAME,
                                kernel_spec_manager=run_notebook.ThisPythonKernelSpecs())
        self.km.start_kernel(cwd=str(cwd), extra_arguments=list(run_notebook.KERNEL_ARGUMENTS),
                             env=env if env is not None else dict(os.environ))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=run_notebook.STARTUP_TIMEOUT)
        self.messages: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.idle: set[str] = set()

    def pump(self, timeout: float = 0.2) -> None:
        """Move the iopub messages that arrive within ``timeout`` into the log."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.kc.get_iopub_msg(timeout=left)
            except queue.Empty:
                return
            parent = msg["parent_header"].get("msg_id", "")
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                self.idle.add(parent)
            else:
                self.messages[parent].append(msg)

    def wait(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        """Wait for the request to finish; its execute_reply content."""
        deadline = time.monotonic() + timeout
        while msg_id not in self.idle:
            assert time.monotonic() < deadline, f"no answer within {timeout} s; got {self.text(msg_id)!r}"
            self.pump()
        reply = self.kc.get_shell_msg(timeout=timeout)
        assert reply["parent_header"]["msg_id"] == msg_id
        return reply["content"]  # type: ignore[no-any-return]

    def run(self, code: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        msg_id = self.kc.execute(code)
        reply = self.wait(msg_id, timeout)
        return reply, self.text(msg_id)

    def ok(self, code: str, timeout: float = 60) -> str:
        reply, text = self.run(code, timeout)
        assert reply["status"] == "ok", f"{code!r} failed: {reply.get('ename')}: {reply.get('evalue')}\n{text}"
        return text

    def text(self, msg_id: str) -> str:
        """Everything shown for that request: streams, results, displays, updates, errors."""
        parts = []
        for msg in self.messages[msg_id]:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                parts.append(content["text"])
            elif "data" in content:
                parts.append(content["data"].get("text/plain", "") + "\n")
            elif msg["msg_type"] == "error":
                parts.append(f"{content['ename']}: {content['evalue']}\n" + "\n".join(content["traceback"]))
        return "".join(parts)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(tmp_path)
    try:
        k.ok("%load_ext nbparallel\n%nbparallel workers 2")
        yield k
    finally:
        k.close()


def test_grid_zip_out_and_worker_output(kernel: Kernel) -> None:
    kernel.ok("import numpy as np\nbase = np.arange(4)")
    shown = kernel.ok("%%parallel --map a=[1, 2] --map b=[10, 20, 30] --out grid\n"
                      "print('run', a, b)\nint(base.sum()) * a + b")
    assert "[item 5] run 2 30" in shown  # worker output lands in the cell, tagged by item
    assert kernel.ok("print([(r.params['a'], r.params['b'], r.value) for r in grid])").strip() == (
        "[(1, 10, 16), (1, 20, 26), (1, 30, 36), (2, 10, 22), (2, 20, 32), (2, 30, 42)]")
    kernel.ok("%%parallel --map a=[1, 2, 3] --map b=[4, 5, 6] --zip --out pairs\na * b")
    assert kernel.ok("print(pairs.values)").strip() == "[4, 10, 18]"
    shown = kernel.ok("%%parallel --map k=range(3)\nk + 1")  # no --out: shown and kept in _parallel
    assert "Results: 3 runs over k" in shown
    assert kernel.ok("print(_parallel.values, 'k' in dir())").strip() == "[1, 2, 3] False"


def test_bad_arguments_give_a_short_usage_error(kernel: Kernel) -> None:
    kernel.ok("import threading\nlock = threading.Lock()")
    for line, body, message in [
        ("--map a=[1] --bogus", "a", "unrecognized arguments: --bogus"),
        ("--map a=1/0", "a", "--map a=1/0 failed: ZeroDivisionError"),
        ("--map a=[1]", "lock", "'lock' (_thread.lock) cannot be sent to the workers"),
        ("--map a=[1]", "a + nowhere", "'nowhere', which is not defined"),
    ]:
        reply, text = kernel.run(f"%%parallel {line}\n{body}")
        assert reply["status"] == "error" and reply["ename"] == "UsageError"
        assert message in text and "Traceback" not in text, text
    status = kernel.ok("%nbparallel status")  # nothing was started by any of those cells
    assert re.search(r"sidecar pid \d+", status) and status.count("idle") == 2 and "0 jobs" in status


def test_background_cell_finishes_while_another_cell_runs(kernel: Kernel) -> None:
    kernel.ok("factor = 6")
    started = time.monotonic()
    bg_id = kernel.kc.execute("%%parallel --bg\nimport time\ntime.sleep(1.0)\nprint('bg printed')\nanswer = factor * 7")
    kernel.wait(bg_id)
    assert time.monotonic() - started < 1.0, "the --bg cell should return at once"
    assert "nbparallel job 1: running" in kernel.text(bg_id)
    # This cell holds the kernel for 3 s; the job ends meanwhile and its names arrive during it.
    during = kernel.ok("import time\ntime.sleep(3)\nprint('answer' in globals(), answer)")
    assert during.strip() == "True 42"
    kernel.pump()
    bg_text = kernel.text(bg_id)  # what the background cell got, after it had returned
    assert "bg printed" in bg_text and "nbparallel job 1: done" in bg_text and "assigned: time, answer" in bg_text
    updates = [m for m in kernel.messages[bg_id] if m["msg_type"] == "update_display_data"]
    assert updates and updates[-1]["content"]["transient"]["display_id"]

    kernel.ok("%%parallel --bg --out ns\nx = 1\ny = x + 1")
    kernel.ok("%nbparallel wait")
    assert kernel.ok("print(ns.x, ns.y, 'y' in globals())").strip() == "1 2 False"

    failing = kernel.kc.execute("%%parallel --bg\nraise ValueError('bad input')")
    kernel.wait(failing)
    reply, text = kernel.run("%nbparallel wait 3")
    assert reply["status"] == "error" and "ValueError: bad input" in reply["evalue"]  # wait re-raises it
    kernel.pump()
    errors = [m["content"] for m in kernel.messages[failing] if m["msg_type"] == "error"]
    assert errors and errors[0]["ename"] == "ValueError" and "bad input" in "\n".join(errors[0]["traceback"])

    kernel.ok("%%parallel --bg\nimport time\ntime.sleep(60)\nnever = 1")
    assert "job 4 cancelled" in kernel.ok("%nbparallel cancel 4")
    jobs = kernel.ok("%nbparallel jobs")
    assert "job 4: cancelled" in jobs and "job 1: done" in jobs and "job 3: failed" in jobs
    assert kernel.ok("print('never' in globals())").strip() == "False"


def test_interrupt_keeps_finished_values_and_the_pool_recovers(kernel: Kernel) -> None:
    msg_id = kernel.kc.execute(
        "%%parallel --map i=range(6) --out part\n"
        "import time\n"
        "if i >= 2:\n    print('slow', i, flush=True)\n    time.sleep(60)\n"
        "i * 10"
    )
    deadline = time.monotonic() + 60
    while kernel.text(msg_id).count("slow") < 2:  # both workers are on slow items: 0 and 1 are done
        assert time.monotonic() < deadline, kernel.text(msg_id)
        kernel.pump()
    interrupted = time.monotonic()
    kernel.km.interrupt_kernel()
    reply = kernel.wait(msg_id)
    assert time.monotonic() - interrupted < 5  # well under a second on an idle machine
    assert reply["status"] == "error" and reply["ename"] == "Interrupted"
    assert "2 of 6 results kept in part" in kernel.text(msg_id)
    assert kernel.ok("print(part.values, part.missing)").strip() == (
        "[0, 10, MISSING, MISSING, MISSING, MISSING] [2, 3, 4, 5]")
    kernel.ok("%%parallel --map i=range(4) --out again\ni")
    assert kernel.ok("print(again.values)").strip() == "[0, 1, 2, 3]"
    assert kernel.ok("%nbparallel status").count("idle") == 2


def test_install_makes_a_new_kernel_load_the_extension(tmp_path: Path) -> None:
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython")}
    done = subprocess.run([sys.executable, "-m", "nbparallel", "install"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kernel = Kernel(tmp_path, env)
    try:
        loaded = kernel.ok("from nbparallel import client\n"
                           "print('parallel' in get_ipython().magics_manager.magics['cell'], "
                           "client.current_client() is not None)")
        assert loaded.strip() == "True True"  # the magic is there and the sidecar already started
    finally:
        kernel.close()


@pytest.mark.parametrize("name", ["parameter_sweep", "background_cell"])
def test_example_notebook_runs(name: str) -> None:
    path = ROOT / "examples" / f"{name}.ipynb"
    started = time.monotonic()
    run = run_notebook.execute_notebook(path, timeout=120)
    assert run.ok, f"{name} failed: {run.failure}\n" + "\n".join(
        run_notebook.describe_cell(i, c) for i, c in enumerate(run.notebook.cells) if c.cell_type == "code")
    assert time.monotonic() - started < 60
