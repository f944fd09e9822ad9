"""Every ```python snippet of README.md runs, for real, in a real IPython kernel.

The snippets run in README order, each as a cell of one kernel (as a reader pasting them into one
notebook would), so `%load_ext` and `%%parallel` cells run too and later snippets see what earlier ones
defined (`np`, `data`). Each snippet is a test of its own, named by the README line its code starts
on. A snippet fails its test when it raises; a `%%parallel --bg` snippet also when its job fails.

The placeholders the README leaves to the reader (`fn`, `items`, `big_model`, ...) get tiny
definitions in PREAMBLE. The only change made to the README's code is SKIPPED_LINES, below.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

import nbparallel
from _notebooks import ROOT, Kernel

README = ROOT / "README.md"

# Lines of the README that cannot run here, each with the reason; they run as `pass`. Every entry must
# match exactly one line of a snippet (test_skipped_lines_still_exist), so none outlives its line.
SKIPPED_LINES = {
    'nbparallel.configure(cluster="tcp://scheduler:8786")':
        "no Dask scheduler named `scheduler` here (it would fail after a 10 s connect timeout); the "
        'next line, cluster="local", runs the same switch on a LocalCluster',
}

# Tiny definitions for the names the README leaves to the reader. `data` and `np` come from the
# tour itself.
PREAMBLE = """
import time

import numpy as np
from sklearn.linear_model import Ridge

def slow_fn(x):
    time.sleep(0.01)
    return x * x

def huge_generator():
    yield from range(20)

def fn(x):
    return x + 1

items = list(range(8))

_rng = np.random.default_rng(1)
X = _rng.normal(size=(40, 3))
y = (X[:, 0] > 0).astype(int)
grid = {"C": [0.1, 1.0]}
big_model = Ridge().fit(X, y)
batches = [X[i:i + 10] for i in range(0, len(X), 10)]
n = 16

x_train, x_val = _rng.uniform(-1, 1, size=30), _rng.uniform(-1, 1, size=10)
y_train, y_val = np.sin(3 * x_train), np.sin(3 * x_val)

def features(x, degree):
    return np.vander(x, degree + 1)

def fit_ridge(x, y, degree, alpha):
    A = features(x, degree)
    return np.linalg.solve(A.T @ A + alpha * np.eye(degree + 1), A.T @ y)

def train(data):
    return float(np.mean(data))
"""

EXEC_TIMEOUT = 240.0  # one snippet, on a busy 2-core machine; well under the pytest timeout below


def readme_snippets(text: str) -> list[tuple[int, str]]:
    """(line of the first code line, code) of every ```python block, in order."""
    snippets: list[tuple[int, str]] = []
    start: int | None = None
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if start is None:
            if re.fullmatch(r"```python\s*", line):
                start, body = number + 1, []
        elif line.strip() == "```":
            snippets.append((start, "\n".join(body) + "\n"))
            start = None
        else:
            body.append(line)
    assert start is None, f"README.md line {start}: a ```python block is never closed"
    return snippets


SNIPPETS = readme_snippets(README.read_text(encoding="utf-8"))


def as_run_here(code: str) -> str:
    """The snippet with SKIPPED_LINES replaced by `pass` (indentation kept)."""
    lines = []
    for line in code.splitlines():
        statement = line.split("#", 1)[0].strip()
        if statement in SKIPPED_LINES:
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}pass  # skipped by tests/system/test_readme.py: {SKIPPED_LINES[statement]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@dataclass
class Notebook:
    kernel: Kernel
    ran: set[int] = field(default_factory=set)  # README lines of the snippets run (or tried) so far


@pytest.fixture(scope="module")
def notebook(shared_processes: set[int]) -> Iterator[Notebook]:
    """One kernel for every snippet, with the placeholders defined; shut down after the last one,
    and then nothing it started may be left. The snippets' sidecar, workers and Dask cluster live
    across the tests on purpose, so the kernel's tree is exempt from the per-test leak check."""
    kernel = Kernel()
    shared_processes.add(kernel.pid)
    try:
        kernel.run(PREAMBLE, timeout=EXEC_TIMEOUT)
        yield Notebook(kernel)
    finally:
        leftovers = kernel.close()
        shared_processes.discard(kernel.pid)
    assert not leftovers, f"processes outlived the README's kernel: {leftovers}"


def run_cell(kernel: Kernel, code: str, line: int) -> None:
    """Run ``code``; fail, naming the README line, if it raised or did not finish in time."""
    msg_id = kernel.submit(code)
    try:
        execution = kernel.wait(msg_id, timeout=EXEC_TIMEOUT)
    except TimeoutError as exc:
        kernel.km.interrupt_kernel()  # so the snippets after this one still get a kernel
        try:
            kernel.wait(msg_id, timeout=30)
        except TimeoutError:
            pass
        pytest.fail(f"README.md line {line}: the snippet did not finish within {EXEC_TIMEOUT:.0f} s\n{exc}")
    if execution.status != "ok":
        pytest.fail(f"README.md line {line}: the snippet raised\n{code}\n{execution.describe()}")


def run_snippet(notebook: Notebook, line: int, code: str) -> None:
    notebook.ran.add(line)
    run_cell(notebook.kernel, as_run_here(code), line)
    if code.startswith("%%parallel") and "--bg" in code.splitlines()[0]:
        # The cell returns at once; `%nbparallel wait` re-raises the job's failure, if any.
        run_cell(notebook.kernel, "%nbparallel wait", line)


@pytest.mark.timeout(600)  # the first one also starts the kernel (up to 90 s on a loaded machine)
@pytest.mark.parametrize(("line", "code"), SNIPPETS, ids=[f"line{line}" for line, _ in SNIPPETS])
def test_readme_snippet_runs(notebook: Notebook, line: int, code: str) -> None:
    # The snippets above this one first, as a reader would have run them (when this test was
    # selected alone, e.g. with -k line142); a failure there names that snippet's line.
    for earlier, earlier_code in SNIPPETS:
        if earlier < line and earlier not in notebook.ran:
            run_snippet(notebook, earlier, earlier_code)
    run_snippet(notebook, line, code)


def test_readme_snippets_are_found() -> None:
    codes = [code for _, code in SNIPPETS]
    assert len(SNIPPETS) >= 6, SNIPPETS
    assert any("nbparallel.map(" in code for code in codes)
    assert any(code.startswith("%load_ext nbparallel") for code in codes)
    assert any(code.startswith("%%parallel --bg") for code in codes)


def test_skipped_lines_still_exist() -> None:
    statements = [line.split("#", 1)[0].strip() for _, code in SNIPPETS for line in code.splitlines()]
    for skipped in SKIPPED_LINES:
        assert statements.count(skipped) == 1, f"SKIPPED_LINES names {skipped!r}, which README.md lacks"


@pytest.mark.timeout(120)
def test_a_failed_submit_names_the_call() -> None:
    def fn(x: int) -> int:
        return x

    future = nbparallel.submit(fn, 1, key="x")  # the README's old example: `key` goes to fn
    with pytest.raises(TypeError) as caught:
        future.result(timeout=60)
    error = caught.value
    assert type(error) is TypeError and "unexpected keyword argument 'key'" in str(error)
    found = nbparallel.details(error)
    assert found is not None and found.index is None and found.item == "fn(1, key='x')"
    if sys.version_info >= (3, 11):
        assert error.__notes__ == ["nbparallel: raised by the task (fn(1, key='x')) in a worker"]
