"""CPython's own concurrent.futures tests, run against ``nbparallel.Executor``.

The executor-generic cases of ``Lib/test/test_concurrent_futures`` (submit, map, shutdown, cancel,
wait, as_completed, initializer, worker deaths, max_tasks_per_child) are built here with CPython's
``create_executor_tests`` and an ``NbParallelMixin``, the way CPython builds them for its own
executors. They need the ``test`` package of Python 3.12 or later (``test.test_concurrent_futures``
became a package with ``util.py`` then); CI's 3.13 leg has it, elsewhere this module is skipped.

A case we do not run is listed in ``EXCLUDED`` with the reason, and shows up as skipped with it.
"""

from __future__ import annotations

import multiprocessing
import time
import unittest
from typing import Any

import pytest

util = pytest.importorskip(
    "test.test_concurrent_futures.util",
    reason="CPython's concurrent.futures tests (the test package of Python 3.12+, as on CI's 3.13 leg)")

from test.test_concurrent_futures import test_as_completed, test_deadlock, test_init, test_process_pool  # noqa: E402
from test.test_concurrent_futures import test_shutdown, test_wait  # noqa: E402
from test.test_concurrent_futures.executor import ExecutorTest  # noqa: E402

import nbparallel  # noqa: E402

_FOR_CF_MODULE = ("runs `from concurrent.futures import {name}` in a fresh interpreter: nbparallel.Executor is "
                  "not in concurrent.futures; tests/contract/test_drop_in.py runs the same script with it")
_INTERNALS = "reads ProcessPoolExecutor's internals ({what}), which nbparallel.Executor does not have"

#: method name -> why it is not run against nbparallel.Executor
EXCLUDED: dict[str, str] = {
    "test_interpreter_shutdown": _FOR_CF_MODULE,
    "test_submit_after_interpreter_shutdown": _FOR_CF_MODULE,
    "test_hang_gh83386": _FOR_CF_MODULE,
    "test_shutdown_deadlock_pickle": _INTERNALS.format(what="_executor_manager_thread"),
    "test_gh105829_should_not_deadlock_if_wakeup_pipe_full": _INTERNALS.format(
        what="_ExecutorManagerThread and _ThreadWakeup, patched"),
    "test_traceback": ("checks `type(exc.__cause__) is concurrent.futures.process._RemoteTraceback`; nbparallel's "
                       "cause is nbparallel.RemoteTraceback, with the same `.tb` text plus the item's details "
                       "(tests/contract/test_drop_in.py checks the rest of this case)"),
}


class NbParallelMixin(util.ExecutorMixin):  # type: ignore[misc,name-defined]
    """CPython's executor mixin for ``nbparallel.Executor``: a pool shared with the rest of the test
    session, its workers fresh interpreters as with the "spawn" start method."""

    executor_type = nbparallel.Executor

    def setUp(self) -> None:
        # The pool is shared with the rest of the session, and a case before this one may have
        # crashed its workers on purpose: each case starts with its workers up, as a fresh
        # ProcessPoolExecutor starts with its own.
        nbparallel.status()  # starts the pool if it is not running
        deadline = time.monotonic() + 60
        while any(w["state"] == "starting" for w in nbparallel.status()["workers"]):
            assert time.monotonic() < deadline, "the pool's workers did not start"
            time.sleep(0.05)
        super().setUp()

    def get_context(self) -> Any:
        # Cases that pass mp_context= get spawn's: what our workers are like (the argument is ignored).
        return multiprocessing.get_context("spawn")


class Base(unittest.TestCase):
    """CPython's BaseTestCase checks that every thread it saw start has ended: nbparallel's reader and
    results threads live with the pool, across tests, on purpose. The session's own fixtures check
    for leaked processes."""


class ProcessPoolCases:
    """The cases of ProcessPoolExecutorTest that hold for any process pool."""

    test_map_chunksize = test_process_pool.ProcessPoolExecutorTest.test_map_chunksize
    test_max_tasks_early_shutdown = test_process_pool.ProcessPoolExecutorTest.test_max_tasks_early_shutdown
    test_traceback = test_process_pool.ProcessPoolExecutorTest.test_traceback
    _test_traceback = test_process_pool.ProcessPoolExecutorTest._test_traceback


_CASES = [
    ExecutorTest,
    ProcessPoolCases,
    test_shutdown.ExecutorShutdownTest,
    test_wait.WaitTests,
    test_as_completed.AsCompletedTests,
    test_init.InitializerMixin,
    test_init.FailingInitializerMixin,
    test_deadlock.ExecutorDeadlockTest,
]

for _case in _CASES:
    util.create_executor_tests(globals(), _case, bases=(Base,), executor_mixins=(NbParallelMixin,))


def _skip_excluded() -> list[str]:
    """Mark each excluded case of the classes built above as skipped, with its reason."""
    marked = []
    for name, value in list(globals().items()):
        if isinstance(value, type) and issubclass(value, unittest.TestCase) and name.startswith("NbParallel"):
            for method, reason in EXCLUDED.items():
                if hasattr(value, method):
                    setattr(value, method, unittest.skip(reason)(getattr(value, method)))
                    marked.append(f"{name}.{method}")
    return marked


SKIPPED = _skip_excluded()


def test_every_exclusion_names_a_real_case() -> None:
    """An exclusion that matches nothing (renamed upstream) must not linger unnoticed."""
    assert {entry.rpartition(".")[2] for entry in SKIPPED} == set(EXCLUDED)
