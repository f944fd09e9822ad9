#!/usr/bin/env python
"""Execute a notebook headless and print, cell by cell, the text it produced.

Usage::

    .venv/bin/python scripts/run_notebook.py examples/quickstart.ipynb [--timeout SECONDS]

The kernel is "python3", started in the notebook's own folder, and always runs on the interpreter
that runs this script: a machine may have a system-wide "python3" kernelspec pointing at another
Python (one without nbparallel installed), and we must not pick that one up. Nothing is installed
globally to achieve this; the kernelspec is made in memory (``ThisPythonKernelSpecs``).

Exit status: 0 when every cell ran, 1 when a cell raised, timed out or the kernel died.
The tests (tests/system/test_examples.py, tests/system/test_kernel.py) import this file and use the same code path.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbformat import NotebookNode
from traitlets import default

KERNEL_NAME = "python3"
CELL_TIMEOUT = 600  # seconds per cell: generous, the machine may be busy
STARTUP_TIMEOUT = 120  # seconds for the kernel to answer its first message
# An in-memory history database: several kernels at once (tests, other sessions) would otherwise
# contend for the SQLite file under ~/.ipython, and a headless run has no use for history.
KERNEL_ARGUMENTS = ["--HistoryManager.hist_file=:memory:"]


def this_python_kernel_spec() -> KernelSpec:
    """A "python3" kernelspec whose argv is the interpreter running this code."""
    return KernelSpec(
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name="Python 3",
        language="python",
        metadata={},
    )


class ThisPythonKernelSpecs(KernelSpecManager):
    """Resolves "python3" to ``sys.executable``; other names as Jupyter normally would."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if kernel_name == KERNEL_NAME:
            return this_python_kernel_spec()
        return super().get_kernel_spec(kernel_name)


class ThisPythonKernelManager(AsyncKernelManager):
    """The async kernel manager nbclient uses, with the kernelspec lookup above."""

    @default("kernel_spec_manager")
    def _this_python_specs(self) -> KernelSpecManager:
        return ThisPythonKernelSpecs(data_dir=self.data_dir)


@dataclass
class NotebookRun:
    """An executed notebook and, if a cell failed, what went wrong."""

    notebook: NotebookNode
    failure: Exception | None  # CellExecutionError, CellTimeoutError or DeadKernelError
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failure is None and not error_cells(self.notebook)


CellHook = Callable[[int, NotebookNode], None]


def execute_notebook(path: Path, *, timeout: int = CELL_TIMEOUT, on_cell: CellHook | None = None) -> NotebookRun:
    """Run every code cell of ``path`` in a fresh "python3" kernel started in the notebook's folder.

    ``on_cell(index, cell)`` is called as soon as each cell has finished, with its outputs filled in,
    so a caller can print progress while later cells still run. Execution stops at the first cell
    that raises (as ``jupyter nbconvert --execute`` does); the notebook on disk is not modified.
    """
    path = Path(path).resolve()
    notebook = nbformat.read(path, as_version=4)  # type: ignore[no-untyped-call]

    def executed(cell: NotebookNode, cell_index: int, **_: Any) -> None:
        if on_cell is not None:
            on_cell(cell_index, cell)

    client = NotebookClient(
        notebook,
        kernel_name=KERNEL_NAME,
        kernel_manager_class=ThisPythonKernelManager,
        timeout=timeout,
        startup_timeout=STARTUP_TIMEOUT,
        extra_arguments=list(KERNEL_ARGUMENTS),
        # nbclient passes this folder to the kernel as its working directory.
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_executed=executed,
    )
    started = time.monotonic()
    failure: Exception | None = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        failure = exc
    return NotebookRun(notebook, failure, time.monotonic() - started)


def output_text(output: NotebookNode) -> str:
    """The plain text of one output: stream text, a text/plain result, or "ename: evalue"."""
    kind = output.get("output_type")
    if kind == "stream":
        return str(output.get("text", ""))
    if kind in ("execute_result", "display_data"):
        return str(output.get("data", {}).get("text/plain", ""))
    if kind == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    return ""


def cell_text(cell: NotebookNode) -> str:
    """Everything a code cell showed, as one string, in output order.

    Stream outputs are joined as they are: the kernel may cut one printed line into several
    stream messages, and a separator between them would break the line apart. Results, displays
    and errors always start and end on a line of their own.
    """
    text = ""
    for output in cell.get("outputs", []):
        part = output_text(output)
        if not part:
            continue
        if output.get("output_type") != "stream":
            if text and not text.endswith("\n"):
                text += "\n"
            part = part.rstrip("\n") + "\n"
        text += part
    return text.rstrip("\n")


def error_cells(notebook: NotebookNode) -> list[tuple[int, str, str]]:
    """(cell index, ename, evalue) for every output of type "error"."""
    found = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append((index, str(output.get("ename")), str(output.get("evalue"))))
    return found


def describe_cell(index: int, cell: NotebookNode) -> str:
    """A header naming the cell by its first line of code, then what it printed, indented."""
    first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
    if len(first_line) > 70:
        first_line = first_line[:67] + "..."
    count = cell.get("execution_count")
    header = f"--- cell {index} [{count if count is not None else ' '}]: {first_line}"
    body = cell_text(cell)
    return header + ("\n" + textwrap.indent(body, "    ") if body else "\n    (no output)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute a notebook headless and print what each cell produced.")
    parser.add_argument("path", type=Path, help="the .ipynb file to run")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        parser.error(f"no such notebook: {args.path}")

    print(f"Running {args.path} in a fresh kernel ({sys.executable})", flush=True)

    def show(index: int, cell: NotebookNode) -> None:
        print(describe_cell(index, cell), flush=True)

    run = execute_notebook(args.path, timeout=args.timeout, on_cell=show)
    code_cells = sum(1 for cell in run.notebook.cells if cell.cell_type == "code")
    if run.failure is not None and not isinstance(run.failure, CellExecutionError):
        # A timeout or a dead kernel: the hook never saw that cell, so say what happened here.
        print(f"--- stopped: {type(run.failure).__name__}: {run.failure}", flush=True)
    if not run.ok:
        failed = error_cells(run.notebook)
        where = ", ".join(f"cell {i} ({name}: {value})" for i, name, value in failed) or "see above"
        print(f"FAILED after {run.seconds:.1f} s: {where}", file=sys.stderr)
        return 1
    print(f"OK: {code_cells} code cells ran in {run.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
