"""The adversarial suite runs on a pool of two workers (the settings are restored after it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # _support


@pytest.fixture(scope="module", autouse=True)
def two_workers() -> Iterator[None]:
    import nbparallel
    from nbparallel.kernel import runner

    saved = (runner.settings.workers, list(runner.settings.preload), runner.settings.max_tasks_per_worker)
    nbparallel.configure(workers=2, preload=[], max_tasks_per_worker=None)
    yield
    workers, preload, max_tasks = saved
    nbparallel.configure(workers=workers, preload=preload, max_tasks_per_worker=max_tasks)
