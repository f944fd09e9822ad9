"""Every examples/*.ipynb runs clean, headless, through scripts/run_notebook.py (the demo's code path).

Each notebook is executed in a fresh "python3" kernel on this interpreter; no cell may raise, and the
lines that show the notebook computed the right thing must be among its outputs. The notebooks are
stored without outputs, and the runner's command line exits non-zero when a cell fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from _notebooks import load_runner
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))
SCRIPT = ROOT / "scripts" / "run_notebook.py"


# What each notebook must print (a notebook not listed here only has to run without an error).
EXPECTED: dict[str, list[str]] = {
    "quickstart.ipynb": [
        "[item 0] worker ",  # a worker's print, tagged, in the cell that ran the map
        "matches serial: True",
        "all there: True",
        "powers of two: [1, 2, 4, 8, 16, 32]",
        "0.0 -> failed: log of non-positive number 0.0",
        "caught the ValueError itself: True",
        "item 3: WorkerCrashed (exit code 3)",
        "item 5: WorkerCrashed (signal SIGSEGV)",
        "item 7: 70",  # the items after the crashes still ran
        "next call works: True",
        "== [sidecar]: True",
    ],
    "parameter_sweep.ipynb": ["36 fits; best", "ok"],
    "async_requests.ipynb": [
        "300 rows in",
        "all right: True",
        "map(fetch) · at most 200/s: 300 items in",  # the progress display's final state
        "row 3: TaskTimeout: item 3",  # a coroutine past timeout=, cancelled; the others arrived
        "the others: [0, 1, 4, 16, 25, 36, 49]",
        "cell runs: [10000, 10201, 10404, 10609, 10816] ... 40",  # a %%parallel cell with await
    ],
    "checkpoint_sweep.ipynb": [
        "stopped: ",  # the first run, stopped by a timer pressing the stop button
        "runs/sweep.db: ",  # load() read what had arrived
        " restored: ",  # the progress display of the rerun: "map(fit) · 29 restored: 31 items in 1.1 s"
        "same as a serial run: True",
        "CheckpointMismatch: the checkpoint",
        "after a restart: {'alpha': 1.3, 'loss': 0.1}",
        "cell sweep: [1.4, 1.35, 1.3, 1.25]",
    ],
    "background_cell.ipynb": ["nbparallel job 1: done", "95% bootstrap interval"],
    "progress_demo.ipynb": ["5 of 100 items failed", "stopped at item 30", "background: finished"],
    "cluster.ipynb": [
        "400 rows in",
        "on 2 workers (sidecar)",
        "on 2 workers (dask)",
        "same results: True",
        "[item 100] row 100:",  # a Dask worker's print, tagged, in the cell
        "nbparallel Dask bridge pid",
        "item 3 raised ZeroDivisionError on the cluster",
        "local again: sidecar [1, 2]",
    ],
    "scikit_learn.ipynb": [
        "joblib: _fit_and_score: 36 tasks in",  # the widget's final state, as saved in the notebook
        "36 fits in",
        "best params: {'C': 10, 'gamma': 0.0005}",
        "held-out accuracy by C: [0.931, 0.963, 0.968]",
        "C=10: 0.968",  # a worker's print, in the cell
    ],
}
# Lines that must appear a given number of times (each serial check separately).
COUNTS: dict[str, dict[str, int]] = {
    "quickstart.ipynb": {"matches serial: True": 2},
    "cluster.ipynb": {"map(simulate): 400 items in": 2},  # the widget, locally and on the cluster
}


def test_there_are_examples() -> None:
    assert any(path.name == "quickstart.ipynb" for path in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_notebook_is_stored_clean(path: Path) -> None:
    """Outputs cleared (the tests produce them) and the standard kernel named."""
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {index} has stored output"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_notebook_runs_and_prints_what_it_should(path: Path) -> None:
    runner = load_runner()
    run = runner.execute_notebook(path)
    shown = "\n".join(
        runner.describe_cell(index, cell) for index, cell in enumerate(run.notebook.cells) if cell.cell_type == "code"
    )
    assert run.failure is None, f"{type(run.failure).__name__}: {run.failure}\n{shown}"
    assert runner.error_cells(run.notebook) == [], shown
    text = "\n".join(runner.cell_text(cell) for cell in run.notebook.cells if cell.cell_type == "code")
    for line in EXPECTED.get(path.name, []):
        assert line in text, f"{line!r} missing from the output:\n{shown}"
    for line, count in COUNTS.get(path.name, {}).items():
        assert text.count(line) == count, f"{line!r} should appear {count} times:\n{shown}"
    assert "False" not in "\n".join(line for line in text.splitlines() if "matches serial" in line)
    # A loose guard against an example growing slow; it runs in a few seconds on two free cores.
    assert run.seconds < 120, f"{path.name} took {run.seconds:.0f} s"


def _write_notebook(path: Path, *sources: str) -> None:
    notebook = new_notebook(  # type: ignore[no-untyped-call]
        cells=[new_code_cell(source) for source in sources],  # type: ignore[no-untyped-call]
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(notebook, path)  # type: ignore[no-untyped-call]


def _run_script(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=240, cwd=ROOT
    )


@pytest.mark.timeout(300)
def test_script_prints_each_cell_and_uses_this_python_in_the_notebook_folder(tmp_path: Path) -> None:
    notebook = tmp_path / "tiny.ipynb"
    _write_notebook(
        notebook,
        "import os, sys\nprint('executable:', sys.executable)\nprint('cwd:', os.getcwd())",
        "import nbparallel\nnbparallel.map(lambda x: x * 3, range(4))",
    )
    done = _run_script(notebook)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"executable: {sys.executable}\n" in done.stdout  # not some system-wide "python3" kernel
    assert f"cwd: {tmp_path.resolve()}\n" in done.stdout
    assert "[0, 3, 6, 9]" in done.stdout  # an execute_result's text/plain
    assert "OK: 2 code cells" in done.stdout


@pytest.mark.timeout(300)
def test_script_exits_non_zero_and_names_the_error_when_a_cell_fails(tmp_path: Path) -> None:
    notebook = tmp_path / "broken.ipynb"
    _write_notebook(notebook, "print('before')", "raise ValueError('boom')", "print('never runs')")
    done = _run_script(notebook)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "before" in done.stdout
    assert "ValueError: boom" in done.stdout
    assert "never runs" not in done.stdout
    assert "FAILED" in done.stderr and "cell 1 (ValueError: boom)" in done.stderr
