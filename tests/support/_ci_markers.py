"""Markers for tests whose files do not mark themselves; pyproject.toml registers the markers, and
conftest.py imports the hook below. CI's main leg (.ci/run) runs everything; the lowest leg
-m "not browser"; the other Pythons' legs -m "not browser and not dask and not mypy".

- dask: needs a Dask cluster; test_dask.py marks itself, the examples that start one are marked here.
- slow: a slow system test (15 to 45 s), for a quick local run: -m "not slow". Every CI leg runs
  them (since test files run side by side, CI has room for them in its 15 minutes).
- mypy: the type check, which the main and lowest legs run.

A node id listed here that no longer exists marks nothing (the test then runs on every leg).
"""

from __future__ import annotations

import pytest

DASK = {
    # starts a Dask LocalCluster in the kernel
    "tests/system/test_examples.py::test_notebook_runs_and_prints_what_it_should[cluster.ipynb]",
}

MYPY = {
    # mypy checks as Python 3.10 whatever Python runs it (pyproject.toml): the main leg runs the newest
    # mypy, the lowest leg the oldest the test extra allows
    "tests/system/test_typing.py::test_mypy_strict_is_clean",
}

SLOW = {
    # notebooks run end to end; their parts are tested one by one on every leg
    "tests/system/test_examples.py::test_notebook_runs_and_prints_what_it_should[progress_demo.ipynb]",
    "tests/system/test_examples.py::test_notebook_runs_and_prints_what_it_should[scikit_learn.ipynb]",
    "tests/system/test_progress.py::test_headless_notebook_saves_the_final_state",
    "tests/system/test_examples.py::test_notebook_runs_and_prints_what_it_should[checkpoint_sweep.ipynb]",
    "tests/system/test_examples.py::test_notebook_runs_and_prints_what_it_should[parameter_sweep.ipynb]",
    # robustness under many kills and at the descriptor limit: 15 to 45 s each
    "tests/system/test_checkpoint.py::test_twenty_random_kills_then_a_complete_run_matches_a_serial_one",
    "tests/system/test_checkpoint.py::test_sigkill_of_the_kernel_mid_sweep_then_a_new_kernel_resumes",
    "tests/system/test_shared_memory.py::test_many_kept_results_hold_no_descriptors_at_the_default_limit",
    "tests/system/test_shared_memory.py::test_a_call_over_many_arrays_keeps_few_descriptors_at_the_default_limit",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in DASK:
            item.add_marker(pytest.mark.dask)
        if item.nodeid in SLOW:
            item.add_marker(pytest.mark.slow)
        if item.nodeid in MYPY:
            item.add_marker(pytest.mark.mypy)
