"""%%parallel and %nbparallel end to end in a real IPython kernel, driven with jupyter_client.

The kernel helper is test_kernel.py's (a kernel on this interpreter; every process it started is
checked to be gone after it shuts down). The example notebooks (examples/parameter_sweep.ipynb,
examples/background_cell.ipynb) run in test_examples.py with the others.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _notebooks import Kernel


def shown(messages: list[dict[str, Any]]) -> str:
    """Everything those messages put in a cell: streams, results, displays and their updates, errors."""
    parts = []
    for msg in messages:
        content = msg["content"]
        if msg["msg_type"] == "stream":
            parts.append(content["text"])
        elif "data" in content:
            parts.append(content["data"].get("text/plain", "") + "\n")
        elif msg["msg_type"] == "error":
            parts.append(f"{content['ename']}: {content['evalue']}\n" + "\n".join(content["traceback"]))
    return "".join(parts)


def ok(kernel: Kernel, code: str) -> str:
    """Run ``code``, require success, return what the cell showed."""
    return shown(kernel.run(code).messages)


def _close(kernel: Kernel) -> None:
    leftovers = kernel.close()
    assert not leftovers, f"processes outlived the kernel: {leftovers}"


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    """A kernel with the extension loaded and a pool of two workers."""
    started = Kernel()
    try:
        ok(started, "%load_ext nbparallel\n%nbparallel workers 2")
        yield started
    finally:
        _close(started)


def test_grid_zip_out_and_worker_output(kernel: Kernel) -> None:
    ok(kernel, "import numpy as np\nbase = np.arange(4)")
    text = ok(kernel, "%%parallel --map a=[1, 2] --map b=[10, 20, 30] --out grid\n"
                      "print('run', a, b)\nint(base.sum()) * a + b")
    assert "[item 5] run 2 30" in text  # worker output lands in the cell, tagged by item
    assert kernel.value("[(r.params['a'], r.params['b'], r.value) for r in grid]") == [
        (1, 10, 16), (1, 20, 26), (1, 30, 36), (2, 10, 22), (2, 20, 32), (2, 30, 42)]
    ok(kernel, "%%parallel --map a=[1, 2, 3] --map b=[4, 5, 6] --zip --out pairs\na * b")
    assert kernel.value("pairs.values") == [4, 10, 18]
    text = ok(kernel, "%%parallel --map k=range(3)\nk + 1")  # no --out: shown, and kept in _parallel
    assert "Results: 3 runs over k" in text
    assert kernel.value("_parallel.values, 'k' in dir()") == ([1, 2, 3], False)


def test_bad_arguments_give_a_short_usage_error(kernel: Kernel) -> None:
    ok(kernel, "import threading\nlock = threading.Lock()")
    for line, body, message in [
        ("--map a=[1] --bogus", "a", "unrecognized arguments: --bogus"),
        ("--map a=1/0", "a", "--map a=1/0 failed: ZeroDivisionError"),
        ("--map a=[1]", "lock", "'lock' (_thread.lock) cannot be sent to the workers"),
        ("--map a=[1]", "a + nowhere", "'nowhere', which is not defined"),
    ]:
        execution = kernel.wait(kernel.submit(f"%%parallel {line}\n{body}"))
        assert execution.status == "error" and execution.ename == "UsageError"
        text = shown(execution.messages)
        assert message in text and "Traceback" not in text, text
    status = ok(kernel, "%nbparallel status")  # none of those cells started a job
    assert re.search(r"sidecar pid \d+", status) and "2 workers" in status and "0 jobs" in status
    assert "busy" not in status


def test_background_cell_finishes_while_another_cell_runs(kernel: Kernel) -> None:
    ok(kernel, "factor = 6")
    bg = kernel.wait(kernel.submit("%%parallel --bg\nimport time\ntime.sleep(1.0)\nprint('bg printed')\n"
                                   "answer = factor * 7"))
    assert bg.status == "ok" and "nbparallel job 1: running" in shown(bg.messages)
    # This cell holds the kernel until the job's names appear in the namespace (or 30 s pass).
    during = kernel.run("import time\nstop = time.monotonic() + 30\n"
                        "while 'answer' not in globals() and time.monotonic() < stop:\n    time.sleep(0.05)\n"
                        "print('answer' in globals(), answer)")
    assert during.stdout.strip() == "True 42"
    kernel.drain()
    later = kernel.messages_for(bg.msg_id)  # what the --bg cell received after it had returned
    text = shown(later)
    assert "bg printed" in text and "nbparallel job 1: done" in text and "assigned: time, answer" in text
    assert any(m["msg_type"] == "update_display_data" for m in later)  # the status line was replaced

    ok(kernel, "%%parallel --bg --out ns\nx = 1\ny = x + 1")
    ok(kernel, "%nbparallel wait")
    assert kernel.value("ns.x, ns.y, 'y' in globals()") == (1, 2, False)

    failing = kernel.wait(kernel.submit("%%parallel --bg\nraise ValueError('bad input')"))
    waited = kernel.wait(kernel.submit("%nbparallel wait 3"))
    assert waited.status == "error" and "ValueError: bad input" in waited.reply["evalue"]  # wait re-raises
    errors = [m["content"] for m in kernel.messages_for(failing.msg_id) if m["msg_type"] == "error"]
    assert errors and errors[0]["ename"] == "ValueError" and "bad input" in "\n".join(errors[0]["traceback"])

    ok(kernel, "%%parallel --bg\nimport time\ntime.sleep(60)\nnever = 1")
    assert "job 4 cancelled" in ok(kernel, "%nbparallel cancel 4")
    jobs = ok(kernel, "%nbparallel jobs")
    assert "job 4: cancelled" in jobs and "job 1: done" in jobs and "job 3: failed" in jobs
    assert kernel.value("'never' in globals()") is False


def test_interrupt_keeps_finished_values_and_the_pool_recovers(kernel: Kernel) -> None:
    msg_id = kernel.submit(
        "%%parallel --map i=range(6) --out part\n"
        "import time\n"
        "if i >= 2:\n    print('slow', i, flush=True)\n    time.sleep(60)\n"
        "i * 10"
    )
    deadline = time.monotonic() + 60
    while shown(kernel.messages_for(msg_id)).count("slow") < 2:  # both workers on slow items: 0, 1 done
        assert time.monotonic() < deadline, shown(kernel.messages_for(msg_id))
        kernel.pump(0.05)
    interrupted = time.monotonic()
    kernel.km.interrupt_kernel()
    execution = kernel.wait(msg_id)
    latency = execution.reply_at - interrupted
    assert latency < 5, f"{latency:.2f} s"  # well under a second on an idle machine
    assert execution.status == "error" and execution.ename == "Interrupted", execution.describe()
    assert "2 of 6 results kept in part" in shown(execution.messages), execution.describe()
    assert kernel.run("print(part.values, part.missing)").stdout.strip() == (
        "[0, 10, MISSING, MISSING, MISSING, MISSING] [2, 3, 4, 5]")
    ok(kernel, "%%parallel --map i=range(4) --out again\ni")
    assert kernel.value("again.values") == [0, 1, 2, 3]
    status = ok(kernel, "%nbparallel status")  # nothing left running
    assert "2 workers" in status and "0 jobs" in status and "busy" not in status


def test_install_makes_a_new_kernel_load_the_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))  # the kernel below inherits it
    done = subprocess.run([sys.executable, "-m", "nbparallel", "install"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    kernel = Kernel()
    try:
        loaded = kernel.value("from nbparallel.kernel import runner as client\n"
                              "'parallel' in get_ipython().magics_manager.magics['cell'], "
                              "client.current_client() is not None")
        assert loaded == (True, True)  # the magic is there and the sidecar already started
    finally:
        _close(kernel)
