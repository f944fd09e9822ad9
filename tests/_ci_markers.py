"""Markers for tests whose files do not mark themselves; pyproject.toml registers the markers, and
conftest.py imports the hook below. CI's lighter legs (.ci/run) run -m "not browser and not dask and
not slow"; the main leg runs everything.

- dask: needs a Dask cluster; test_dask.py marks itself, the examples that start one are marked here.
- slow: a slow system test whose outcome hardly depends on the Python version, so the lighter legs
  leave it to the main leg (and the lowest leg), which keeps CI under 15 minutes on 2 cores.

A node id listed here that no longer exists marks nothing (the test then runs on every leg).
"""

from __future__ import annotations

import pytest

DASK = {
    # starts a Dask LocalCluster in the kernel
    "tests/test_examples.py::test_notebook_runs_and_prints_what_it_should[cluster.ipynb]",
}

SLOW = {
    # mypy checks as Python 3.10 whatever runs it (pyproject.toml); the main leg runs the newest
    # mypy, the lowest leg the oldest we allow, with IPython 8's untyped decorators
    "tests/test_typing.py::test_mypy_strict_is_clean",
    # notebooks run end to end; their parts are tested one by one on every leg
    "tests/test_examples.py::test_notebook_runs_and_prints_what_it_should[progress_demo.ipynb]",
    "tests/test_examples.py::test_notebook_runs_and_prints_what_it_should[scikit_learn.ipynb]",
    "tests/test_progress.py::test_headless_notebook_saves_the_final_state",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in DASK:
            item.add_marker(pytest.mark.dask)
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
