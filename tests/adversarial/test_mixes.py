"""Random mixes of good, raising, crashing, hanging and slow items (hypothesis): every item ends in
exactly one right outcome (its value at its index, or the right error naming it), what finished is
kept when the call stops early, and processes, descriptors and /dev/shm come back to where they were."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

import pytest
from _support import leaves_nothing, two_workers  # two_workers: the pool they run on
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbparallel
from nbparallel.crashes import WorkerCrashed
from nbparallel.errors import TaskTimeout

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("two_workers")]

KINDS = ["good"] * 6 + ["slow", "raise", "stop", "exit", "print", "crash", "segfault"]


def run_item(item: tuple[int, str]) -> int:
    index, kind = item
    if kind == "slow":
        time.sleep(0.03)
    elif kind == "raise":
        raise ValueError(f"bad {index}")
    elif kind == "stop":
        raise StopIteration(index)
    elif kind == "exit":
        sys.exit(index)
    elif kind == "print":
        print("é" * 300, index)
    elif kind == "crash":
        os._exit(3)
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "hang":
        time.sleep(3600)
    return index * 7


EXPECTED: dict[str, type[BaseException] | None] = {
    "good": None, "slow": None, "print": None, "raise": ValueError, "stop": StopIteration, "exit": SystemExit,
    "crash": WorkerCrashed, "segfault": WorkerCrashed, "hang": TaskTimeout}


def index_of(error: BaseException) -> int | None:
    details = getattr(nbparallel.errors, "details", None)
    found = details(error) if details is not None else None
    if found is not None:
        return found.index
    return getattr(error, "index", None)


def is_kind(outcome: Any, expected: type[BaseException]) -> bool:
    return isinstance(outcome, expected) or isinstance(getattr(outcome, "exception", None), expected)


plans = st.lists(st.sampled_from(KINDS), min_size=1, max_size=60).filter(
    lambda plan: sum(k in ("crash", "segfault") for k in plan) <= 4)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=plans, chunksize=st.sampled_from([1, 4, "auto"]), ordered=st.booleans(),
       retries=st.sampled_from([0, 1]), hang=st.booleans())
def test_every_item_ends_in_exactly_one_right_outcome(plan: list[str], chunksize: Any, ordered: bool, retries: int,
                                                      hang: bool) -> None:
    if hang:
        plan = [*plan[:3], "hang", *plan[3:]]
    items = list(enumerate(plan))
    with leaves_nothing():
        results = nbparallel.map(run_item, items, errors="return", chunksize=chunksize, ordered=ordered,
                                 retries=retries, timeout=1.0 if hang else None, progress=False)
    assert len(results) == len(plan)
    if not ordered:  # put them back in place by what they say about themselves
        placed: dict[int, Any] = {}
        for outcome in results:
            index = outcome // 7 if isinstance(outcome, int) else index_of(outcome)
            assert index is not None and index not in placed, outcome
            placed[index] = outcome
        results = [placed[i] for i in range(len(plan))]
    for index, (kind, outcome) in enumerate(zip(plan, results)):
        expected = EXPECTED[kind]
        if expected is None:
            assert outcome == index * 7, (index, kind, outcome)
        else:
            assert is_kind(outcome, expected), (index, kind, outcome)
            assert index_of(outcome) == index, (index, kind, outcome)
            if expected is WorkerCrashed:
                assert outcome.attempts == 1 + retries


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(plan=plans, chunksize=st.sampled_from([1, 5, "auto"]))
def test_errors_raise_stops_at_a_failure_and_keeps_what_finished(plan: list[str], chunksize: Any) -> None:
    items = list(enumerate(plan))
    failing = [i for i, kind in enumerate(plan) if EXPECTED[kind] is not None]
    with leaves_nothing():
        try:
            results = nbparallel.map(run_item, items, chunksize=chunksize, progress=False)
        except BaseException as error:  # whichever failure came first
            assert failing, error
            index = index_of(error)
            assert index in failing
            getter = getattr(nbparallel.errors, "completed_of", None)
            completed = getter(error) if getter is not None else getattr(error, "completed", None)
            assert completed is not None
            assert all(plan[i] not in EXPECTED or EXPECTED[plan[i]] is None for i in completed)
            assert all(value == i * 7 for i, value in completed.items())
        else:
            assert not failing
            assert results == [i * 7 for i in range(len(plan))]
