"""joblib's own backend tests (``joblib/test/test_parallel.py``), run with ``backend="nbparallel"``.

Each test here calls one of joblib's test functions as it is, with our backend in the place of the
ones joblib parametrizes it with. Only the tests that apply to a custom backend are taken; those
that do not, and why, are listed in ``NOT_APPLICABLE`` (tests/contract/test_drop_in.py covers what
they would have shown of ours, where that makes sense).
"""

from __future__ import annotations

from typing import Any

import pytest

jp = pytest.importorskip("joblib.test.test_parallel", reason="joblib's own tests ship with joblib")

import nbparallel  # noqa: E402,F401  # registers the backend

BACKEND = "nbparallel"

#: joblib tests taking a backend that we do not run, and why.
NOT_APPLICABLE = {
    "test_error_capture": "checks that the backend's own pool (`_pool`/`_workers`) is torn down and rebuilt "
                          "after an error; nbparallel's pool is shared and stays (test_drop_in.py runs its "
                          "ZeroDivisionError, KeyboardInterrupt and finicky-exception cases)",
    "test_dispatch_multiprocessing": "shares a multiprocessing.Manager list with the tasks: a Manager proxy "
                                     "authenticates with the key of the process tree that made it, which "
                                     "nbparallel's workers (started by the sidecar, not forked) do not hold",
    "test_initializer_context": "as test_dispatch_multiprocessing (a Manager dict); test_drop_in.py checks "
                                "initializer/initargs through Parallel and parallel_config",
    "test_initializer_parallel": "as test_initializer_context",
    "test_auto_memmap_on_arrays_from_generator": "asserts that arrays arrive as np.memmap (joblib's own "
                                                 "memmapping); nbparallel sends arrays through shared memory",
    "test_memmapping_leaks": "joblib's memmapping folders: nbparallel does not memmap",
    "test_parallel_with_interactively_defined_functions": "runs joblib in a fresh interpreter that never "
                                                          "imports nbparallel, so the backend is unknown there",
    "test_parallel_with_unpicklable_functions_in_args": "as test_parallel_with_interactively_defined_functions",
    "test_nested_exception_dispatch": "marked xfail by joblib itself (loky#255)",
}


@pytest.mark.parametrize("n_jobs", [1, 2, -1, -2])
@pytest.mark.parametrize("verbose", [2, 11, 100])
def test_simple_parallel(n_jobs: int, verbose: int) -> None:
    jp.test_simple_parallel(BACKEND, n_jobs, verbose)


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_parallel_pretty_print(n_jobs: int) -> None:
    jp.test_parallel_pretty_print(BACKEND, n_jobs)


def test_main_thread_renamed_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    jp.test_main_thread_renamed_no_warning(BACKEND, monkeypatch)


def test_parallel_as_context_manager() -> None:
    jp.test_parallel_as_context_manager(BACKEND)


def test_parallel_timeout_success() -> None:
    jp.test_parallel_timeout_success(BACKEND)


@pytest.mark.timeout(60)
def test_parallel_timeout_fail() -> None:
    jp.test_parallel_timeout_fail(BACKEND)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_parallel_timeout_fail_with_generator(return_as: str) -> None:
    jp.test_parallel_timeout_fail_with_generator(BACKEND, return_as)


def test_error_in_task_iterator() -> None:
    jp.test_error_in_task_iterator(BACKEND)


@pytest.mark.parametrize("batch_size, expected_queue", [
    (1, [f"{what} {i}" for i in range(6) for what in ("Produced", "Consumed")]),
    (4, [*(f"Produced {i}" for i in range(4)), *(f"Consumed {i}" for i in range(4)),
         "Produced 4", "Produced 5", "Consumed 4", "Consumed 5"]),
])
def test_dispatch_one_job(batch_size: int, expected_queue: list[str]) -> None:
    jp.test_dispatch_one_job(BACKEND, batch_size, expected_queue)


def test_batching_auto_subprocesses() -> None:
    jp.test_batching_auto_subprocesses(BACKEND)


def test_invalid_njobs() -> None:
    jp.test_invalid_njobs(BACKEND)


@pytest.mark.parametrize("n_jobs", ["2", 2.3, 2])
def test_njobs_converted_to_int(n_jobs: Any) -> None:
    jp.test_njobs_converted_to_int(BACKEND, n_jobs)


@pytest.mark.parametrize("n_jobs", [2, 4])
def test_parallel_unordered_generator_returns_fastest_first(n_jobs: int) -> None:
    jp.test_parallel_unordered_generator_returns_fastest_first(BACKEND, n_jobs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_jobs", [1, 2, -2, -1])
def test_abort_backend(n_jobs: int) -> None:
    jp.test_abort_backend(n_jobs, BACKEND)


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
@pytest.mark.parametrize("n_jobs", [1, 2, -1])
def test_deadlock_with_generator(return_as: str, n_jobs: int) -> None:
    pytest.importorskip("numpy")
    jp.test_deadlock_with_generator(BACKEND, return_as, n_jobs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
@pytest.mark.parametrize("n_jobs", [1, 2, -1])
def test_multiple_generator_call(return_as: str, n_jobs: int) -> None:
    jp.test_multiple_generator_call(BACKEND, return_as, n_jobs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
@pytest.mark.parametrize("n_jobs", [1, 2, -1])
def test_multiple_generator_call_managed(return_as: str, n_jobs: int) -> None:
    jp.test_multiple_generator_call_managed(BACKEND, return_as, n_jobs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as_1, return_as_2", [("generator", "generator_unordered"),
                                                      ("generator_unordered", "generator")])
def test_multiple_generator_call_separated(return_as_1: str, return_as_2: str) -> None:
    jp.test_multiple_generator_call_separated(BACKEND, return_as_1, return_as_2, 2)


def test_lambda_expression() -> None:
    jp.test_lambda_expression(BACKEND)


def test_backend_batch_statistics_reset() -> None:
    jp.test_backend_batch_statistics_reset(BACKEND)


def test_every_not_applicable_test_exists() -> None:
    """A name here that joblib renamed or dropped must not linger unnoticed."""
    assert all(callable(getattr(jp, name, None)) for name in NOT_APPLICABLE)
