"""What the sidecar schedules: jobs (a function and its settings) and their chunks of items."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..wire import messages as msg
from ..wire.frames import close_fds



@dataclass
class Chunk:
    """A run of consecutive items of one job, routed as opaque bytes."""

    job: int
    id: int
    start: int  # index of the first item in the job's input
    count: int
    payload: Any  # the pickled items; never unpickled here
    fds: list[int] = field(default_factory=list)  # their shared-memory segments, held until done
    oob: Any = None  # where the out-of-band buffers sit in ``fds`` (see shm.py)
    resume: int = 0  # offsets below this were delivered (or failed) already
    skip: list[int] = field(default_factory=list)  # offsets that failed and must not run again
    attempts: dict[int, int] = field(default_factory=dict)  # offset -> times its worker died on it
    careful: bool = False  # run item by item: a worker died in a run of items it could not pin down
    deaths: int = 0  # workers that died holding it outside any item (before the first, after the last)

    def close(self) -> None:
        close_fds(self.fds)
        self.fds = []

    def remaining(self) -> list[int]:
        skip = set(self.skip)
        return [off for off in range(self.resume, self.count) if off not in skip]


@dataclass
class Job:
    header: msg.Job  # as the kernel sent it; forwarded to the workers unchanged
    function: Any  # pickled function bytes
    fds: list[int] = field(default_factory=list)  # shared-memory segments of the function
    queue: deque[Chunk] = field(default_factory=deque)
    chunk_seconds: float | None = None  # recent time a chunk takes, from the workers' reports
    deaths_outside: int = 0  # workers dead outside any of its items since its last result (policy.lost)
    last_death: tuple[int, int | None] = (0, None)  # the pid and exit code of the last of them
    pace_next: float = 0.0  # with a rate: the next free start time (time.monotonic())

    @property
    def id(self) -> int:
        return int(self.header["job"])

    @property
    def limit(self) -> int:
        return int(self.header.get("limit") or 0)

    @property
    def timeout(self) -> float:
        return float(self.header.get("timeout") or 0)

    @property
    def memory_limit(self) -> int:
        return int(self.header.get("memory_limit") or 0)

    @property
    def retries(self) -> int:
        return int(self.header.get("retries") or 0)

    @property
    def concurrency(self) -> int:
        """An async job: the items a worker keeps in flight (0: a plain job)."""
        return int(self.header.get("concurrency") or 0)

    @property
    def rate(self) -> float:
        """Item starts per second across the job (0: no limit)."""
        return float(self.header.get("rate") or 0)

    @property
    def group(self) -> Any:
        """Jobs of one Executor share its ``max_workers`` cap."""
        return self.header.get("group") or ("job", self.id)
