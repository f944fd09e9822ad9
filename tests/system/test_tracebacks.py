"""Remote tracebacks read like local ones: notebook frames as "Cell In[N], line L" with their source,
file frames with path, line and source, nbparallel's own frames hidden; whatever cloudpickle does
with ``co_filename`` (3.1.3 and later write "<dynamic-code>"), since the kernel writes them out."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbparallel
from nbparallel.payload import tracebacks
from _notebooks import Kernel


# -- pure: capture and render ------------------------------------------------------------------------


def _raise_chained() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise ValueError("bad config") from exc


def test_capture_keeps_the_chain_oldest_first_and_render_links_it() -> None:
    try:
        _raise_chained()
    except ValueError as exc:
        trace = tracebacks.capture(exc)
    assert [block.link for block in trace] == ["cause", ""]
    assert trace[0].exception == ("KeyError: 'missing'",)
    text = tracebacks.render(trace)
    assert text.index("KeyError") < text.index("direct cause") < text.index("ValueError: bad config")
    assert f'File "{__file__}"' in text and '{}["missing"]' in text and 'raise ValueError("bad config")' in text
    assert "nbparallel/tracebacks.py" not in text


def test_a_dynamic_frame_finds_its_file_through_the_function_the_call_sent() -> None:
    def helper(x: int) -> int:
        return 10 // x

    def task(x: int) -> int:
        return helper(x) + 1

    frames = tuple(
        tracebacks.RemoteFrame(tracebacks.DYNAMIC_CODE, code.co_firstlineno + 1, code.co_name,
                               getattr(code, "co_qualname", code.co_name), code.co_firstlineno, "")
        for code in (task.__code__, helper.__code__)
    )
    trace = (tracebacks.RemoteBlock(frames, ("ZeroDivisionError: integer division or modulo by zero",), ""),)
    text = tracebacks.SourceIndex(task).render(trace)
    assert "<dynamic-code>" not in text
    assert f'File "{__file__}", line {helper.__code__.co_firstlineno + 1}, in helper' in text
    assert "return helper(x) + 1" in text and "return 10 // x" in text


def test_unknown_dynamic_code_still_shows_what_the_worker_knew() -> None:
    frame = tracebacks.RemoteFrame(tracebacks.DYNAMIC_CODE, 3, "f", "f", 1, "return g()")
    text = tracebacks.render((tracebacks.RemoteBlock((frame,), ("NameError: g",), ""),))
    assert 'File "<dynamic-code>", line 3, in f' in text and "return g()" in text


# -- a plain script -----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_script_shows_its_path_line_and_source(tmp_path: Path) -> None:
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent("""
        import nbparallel

        def parse(text):
            return int(text) * 2

        try:
            nbparallel.map(parse, ["1", "x"], progress=False)
        except ValueError as err:
            print(nbparallel.details(err).remote_traceback)
        nbparallel.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80)
    assert out.returncode == 0, out.stderr
    assert f'File "{script}", line 5, in parse' in out.stdout
    assert "return int(text) * 2" in out.stdout
    assert "<dynamic-code>" not in out.stdout and "nbparallel/" not in out.stdout


def test_every_frame_of_ours_is_hidden_in_a_local_map() -> None:
    def parse(text: str) -> int:
        return int(text)

    [error] = nbparallel.map(parse, ["x"], errors="return", progress=False)
    remote = nbparallel.details(error)
    assert remote is not None
    assert f'File "{__file__}"' in remote.remote_traceback and "return int(text)" in remote.remote_traceback
    assert "nbparallel/" not in remote.remote_traceback


# -- a real kernel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    started = Kernel()
    try:
        started.run("import nbparallel\n%load_ext nbparallel")
        yield started
    finally:
        leftovers = started.close()
    assert not leftovers, f"processes outlived the kernel: {leftovers}"


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    # The module's kernel lives across these tests (one start instead of five); its fixture checks
    # that nothing it started outlives it.
    yield


def _count(execution: object) -> int:
    return int(execution.reply["execution_count"])  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_a_notebook_function_shows_its_cell_line_and_source(kernel: Kernel) -> None:
    helper = kernel.run("def ratio(x):\n    spread = x - 3\n    return 10 / spread\n")
    task = kernel.run("# scoring\ndef score_sample(x):\n    value = ratio(x)\n    return value * 2\n")
    failed = kernel.wait(kernel.submit("nbparallel.map(score_sample, range(5), progress=False)"))
    assert failed.status == "error" and failed.ename == "ZeroDivisionError"
    shown = "\n".join(failed.reply["traceback"])
    assert f"Cell In[{_count(task)}], line 3, in score_sample" in shown, shown
    assert "value = ratio(x)" in shown
    assert f"Cell In[{_count(helper)}], line 3, in ratio" in shown and "return 10 / spread" in shown
    assert "item 3" in shown
    assert "<dynamic-code>" not in shown and "worker.py" not in shown and "api.py" not in shown

    kept = kernel.value("nbparallel.details(nbparallel.map(score_sample, range(5), errors='return', "
                        "progress=False)[3]).remote_traceback")
    assert f"Cell In[{_count(task)}], line 3, in score_sample" in kept


@pytest.mark.timeout(120)
def test_a_parallel_cell_shows_its_own_lines(kernel: Kernel) -> None:
    failed = kernel.wait(kernel.submit("""%%parallel --map k=range(3) --no-progress
total = k * 2
total / (k - 1)
"""))
    assert failed.status == "error" and failed.ename == "ZeroDivisionError"  # the run's own exception
    shown = "\n".join(failed.reply["traceback"])
    assert f"Cell In[{_count(failed)}], line 3, in <module>" in shown, shown
    assert "total / (k - 1)" in shown and "cellrunner.py" not in shown


@pytest.mark.timeout(120)
def test_a_background_cell_shows_its_own_lines(kernel: Kernel) -> None:
    started = kernel.run("""%%parallel --bg --no-progress
first = 1
second = first / 0
""")
    kernel.wait(kernel.submit("%nbparallel wait"), timeout=60)  # raises the job's error there too
    kernel.drain()
    errors = [m for m in kernel.messages_for(started.msg_id) if m["msg_type"] == "error"]
    assert errors, "the background cell's error should land under it"
    assert errors[0]["content"]["ename"] == "ZeroDivisionError"  # the cell's own exception
    shown = "\n".join(errors[0]["content"]["traceback"])
    assert f"Cell In[{_count(started)}], line 3, in <module>" in shown, shown
    assert "second = first / 0" in shown


@pytest.mark.timeout(120)
def test_joblib_through_nbparallel_shows_the_cell(kernel: Kernel) -> None:
    cell = kernel.run('import joblib\n\ndef check(x):\n    if x == 2:\n        raise KeyError(f"no {x}")\n    return x\n')
    failed = kernel.wait(kernel.submit("""
        with joblib.parallel_config(backend="nbparallel"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(check)(i) for i in range(4))
    """))
    assert failed.status == "error" and failed.ename == "KeyError"
    shown = "\n".join(failed.reply["traceback"])
    assert f"Cell In[{_count(cell)}], line 5, in check" in shown, shown
    assert 'raise KeyError(f"no {x}")' in shown
