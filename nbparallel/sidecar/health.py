"""Whether the pool can start workers at all.

A worker that dies before it says hello did not fail any item: a ``preload`` module that exits or
crashes at import, an environment that breaks Python, a limit on processes or memory. Respawning it
at once would spin (both cores busy, ``map`` waiting forever). So each such death doubles the pause
before the next start, and after ``START_FAILURES`` in a row the pool is *broken*: the work waiting
for a worker fails with ``cause``, which names what happened, until a worker starts again (the sidecar
keeps trying at the longest pause) or ``configure`` changes the settings.
"""

from __future__ import annotations

import signal

START_FAILURES = 3  # workers in a row that die before they are ready: then the waiting work fails
FIRST_PAUSE = 0.05  # seconds before respawning after the first such death; doubles each time
LONGEST_PAUSE = 5.0


def describe_exit(exitcode: int | None) -> str:
    """A subprocess return code in words."""
    if exitcode is None:
        return "it stopped answering"
    if exitcode < 0:
        try:
            return f"it was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"it was killed by signal {-exitcode}"
    return f"it exited with status {exitcode}"


class Startup:
    """Consecutive start failures, the pause they impose, and the cause once the pool is broken."""

    def __init__(self) -> None:
        self.failures = 0
        self.not_before = 0.0  # time.monotonic() before which no worker is started
        self.cause: str | None = None  # set while the pool is broken

    def may_spawn(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, how: str, preload: list[str], now: float) -> None:
        """A worker died before it was ready (``how``: what happened to it)."""
        self.failures += 1
        self.not_before = now + min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** (self.failures - 1))
        if self.failures >= START_FAILURES:
            hint = (f" Each worker imports the preload modules {preload} before it is ready: one of them is the "
                    "likely cause (import it in the notebook to see)." if preload else "")
            self.cause = (f"no worker could start: {self.failures} in a row died before they were ready (the last: "
                          f"{how}).{hint} Fix the cause and call nbparallel.configure() or nbparallel.shutdown() "
                          "to try again.")

    def started(self) -> None:
        """A worker said hello: the pool works."""
        self.failures, self.not_before, self.cause = 0, 0.0, None
