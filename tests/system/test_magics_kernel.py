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
    assert "[a=2, b=30] run 2 30" in text  # worker output lands in the cell, tagged by the run's parameters
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
    assert waited.status == "error" and waited.reply["ename"] == "ValueError"  # wait re-raises the cell's own
    assert waited.reply["evalue"] == "bad input"
    errors = [m["content"] for m in kernel.messages_for(failing.msg_id) if m["msg_type"] == "error"]
    assert errors and errors[0]["ename"] == "ValueError" and "bad input" in "\n".join(errors[0]["traceback"])

    ok(kernel, "%%parallel --bg\nimport time\ntime.sleep(60)\nnever = 1")
    assert "job 4 cancelled" in ok(kernel, "%nbparallel cancel 4")
    jobs = ok(kernel, "%nbparallel jobs")
    assert "job 4: cancelled" in jobs and "job 1: done" in jobs and "job 3: failed" in jobs
    assert kernel.value("'never' in globals()") is False


def test_runs_are_named_by_their_parameters(kernel: Kernel) -> None:
    execution = kernel.wait(kernel.submit("%%parallel --map k=range(3) --map seed=[3]\n"
                                          "print('run', k)\nif k == 1:\n    import time; time.sleep(2)\n"
                                          "    raise KeyError(k)\nk * seed"))  # run 0 has printed by then
    assert execution.status == "error" and execution.ename == "KeyError"
    text = shown(execution.messages)
    assert "[k=0, seed=3] run 0" in text and "(1,)" not in text and "item 1 (" not in text.replace("item 1 (k=1", "")
    assert "k=1, seed=3" in "\n".join(execution.reply["traceback"])
    stopped = [m["content"]["text"] for m in execution.messages
               if m["msg_type"] == "stream" and "stopped" in m["content"]["text"]]
    assert stopped and "kept in _parallel" in stopped[0]  # the way to the finished runs, in this very cell
    # The progress display names the sweep and the failed run by its parameters (its final, static form).
    final = [m["content"]["data"] for m in execution.messages
             if m["msg_type"] == "update_display_data" and "text/html" in m["content"]["data"]]
    if final:  # shown only when the call ran past progress_after
        assert final[-1]["text/plain"].startswith("%%parallel k × seed: ")
    assert kernel.value("_parallel[1].params == {'k': 1, 'seed': 3} and isinstance(_parallel[1].value, KeyError)")


def test_name_error_for_a_name_a_running_job_will_assign_says_so(kernel: Kernel) -> None:
    started = ok(kernel, "%%parallel --bg\nimport time\n# train\ntime.sleep(30)\n"
                         "model, history = 'fitted', [1, 2]")
    assert "nbparallel job 1: running in the background since" in started
    assert "%nbparallel wait 1" in started and "(0.0 s)" not in started  # no clock that stops
    early = kernel.wait(kernel.submit("print(model)"))
    assert early.status == "error" and early.ename == "NameError"
    hint = early.stdout + "".join(m["content"]["text"] for m in early.messages if m["msg_type"] == "stream")
    assert "'model' is not defined yet: background job 1 (model, history = …) assigns it" in hint
    assert "%nbparallel wait 1" in hint
    sweep = kernel.wait(kernel.submit("%%parallel --map a=[1]\nmodel + str(a)"))
    assert sweep.ename == "UsageError" and "background job 1" in shown(sweep.messages)
    listed = ok(kernel, "%nbparallel jobs")
    assert "| model, history = …" in listed and "time" not in listed.split("|")[1]
    ok(kernel, "%nbparallel cancel 1")
    later = kernel.wait(kernel.submit("print(model)"))
    assert later.status == "error" and "not defined yet" not in shown(later.messages)  # no job will assign it now


def test_shorten_cuts_at_a_word_with_an_ellipsis() -> None:
    from nbparallel.cellmagic.background import describe_cell, shorten

    assert shorten("short line", 60) == "short line"
    cut = shorten("results = expensive_function(alpha, beta, gamma, delta, epsilon, zeta, eta)", 40)
    assert cut.endswith("…") and len(cut) <= 40 and not cut[:-1].endswith(("alph", "bet"))
    assert describe_cell("import numpy as np\nfrom x import y\n# comment\nfit(data)\n", []) == "fit(data)"
    assert describe_cell("import numpy as np\nw = np.ones(3)", ["np", "w"]) == "w = …"


def test_rich_output_from_tasks_reaches_the_cell_tagged(kernel: Kernel) -> None:
    ok(kernel, "import nbparallel\nfrom IPython.display import display, HTML")
    execution = kernel.run("def show(k):\n    print('printed', k)\n    display(HTML(f'<b>run {k}</b>'))\n"
                           "    return k\nnbparallel.map(show, range(2), progress=False)")
    displays = [m for m in execution.messages if m["msg_type"] == "display_data"]
    html = sorted(m["content"]["data"]["text/html"] for m in displays if "text/html" in m["content"]["data"])
    assert html == ["<b>run 0</b>", "<b>run 1</b>"]
    lines = execution.stdout
    assert "[item 0] printed 0" in lines and "[item 0]\n" in lines and "[item 1]\n" in lines
    # Each display comes after its item's tag line, and after what that item printed before it.
    order = [(m["msg_type"], m["content"].get("text", m["content"].get("data", {}).get("text/html")))
             for m in execution.messages if m["msg_type"] in ("stream", "display_data")]
    flat = [text for _, text in order]
    assert any(text and "printed 0" in text for text in flat[: flat.index("<b>run 0</b>")])
    # A submitted call's displays reach its cell too.
    execution = kernel.run("nbparallel.submit(show, 5).result()")
    assert [m["content"]["data"]["text/html"] for m in execution.messages
            if m["msg_type"] == "display_data" and "text/html" in m["content"]["data"]] == ["<b>run 5</b>"]
    # A display a task gave an id to, then updated: the update replaces it in the cell.
    execution = kernel.run("def counting(k):\n    handle = display(HTML('step 0'), display_id=True)\n"
                           "    handle.update(HTML('step 1'))\n    return k\n"
                           "nbparallel.map(counting, [0], progress=False)")
    first = [m["content"] for m in execution.messages if m["msg_type"] == "display_data"]
    updated = [m["content"] for m in execution.messages if m["msg_type"] == "update_display_data"]
    assert [c["data"]["text/html"] for c in first] == ["step 0"] and [c["data"]["text/html"] for c in updated] == ["step 1"]
    assert first[0]["transient"]["display_id"] == updated[0]["transient"]["display_id"]


def test_figures_and_dataframes_from_a_sweep(kernel: Kernel) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    ok(kernel, "import nbparallel\nimport matplotlib.pyplot as plt\nimport pandas as pd")
    execution = kernel.run("%%parallel --map k=[1, 2] --out runs\n"
                           "display(pd.DataFrame({'k': [k], 'square': [k * k]}))\n"
                           "fig, ax = plt.subplots(figsize=(2, 1.5))\nax.plot([0, k])\nk")
    displays = [m["content"]["data"] for m in execution.messages if m["msg_type"] == "display_data"]
    tables = [d for d in displays if "text/html" in d and "<table" in d["text/html"]]
    images = [d for d in displays if "image/png" in d]
    assert len(tables) == 2 and len(images) == 2, [sorted(d) for d in displays]
    assert all(d["image/png"].startswith("iVBOR") for d in images)  # a PNG, base64 as Jupyter sends it
    assert "[k=1]\n" in execution.stdout and "[k=2]\n" in execution.stdout
    assert kernel.value("runs.values") == [1, 2]
    # A figure left open in a plain map function is shown too, tagged with the item that made it.
    execution = kernel.run("def plot(k):\n    plt.figure(figsize=(2, 1))\n    plt.plot([k, 0])\n    return k\n"
                           "nbparallel.map(plot, range(3), progress=False)")
    pngs = [m for m in execution.messages if m["msg_type"] == "display_data" and "image/png" in m["content"]["data"]]
    assert len(pngs) == 3 and all(f"[item {i}]\n" in execution.stdout for i in range(3))


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


def test_a_stopped_map_says_where_its_finished_results_are(kernel: Kernel) -> None:
    msg_id = kernel.submit("import time, nbparallel\n"
                           "def slow(x):\n    print('start', x, flush=True)\n    time.sleep(0.1 if x < 3 else 60)\n"
                           "    return x * 10\n"
                           "nbparallel.map(slow, range(6), workers=2)")
    deadline = time.monotonic() + 60
    while shown(kernel.messages_for(msg_id)).count("start") < 5:  # 0-2 done, two slow ones running
        assert time.monotonic() < deadline, shown(kernel.messages_for(msg_id))
        kernel.pump(0.05)
    kernel.km.interrupt_kernel()
    execution = kernel.wait(msg_id)
    assert execution.ename == "Interrupted"
    # No err exists in that cell: the message names a way that does, and no frame of ours is shown.
    assert execution.reply["traceback"] == [f"Interrupted: {execution.reply['evalue']}"]
    assert "nbparallel.last_results()" in execution.reply["evalue"] and "err.completed" not in execution.reply["evalue"]
    assert kernel.value("sorted(nbparallel.last_results().items())") == [(0, 0), (1, 10), (2, 20)]


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
