"""The sidecar's policies: which chunk a worker gets next, when to queue a second one behind it,
when a worker has broken a job's limits, which functions a worker forgets, whom a crash blames.
Pure decisions over the sidecar's state; the loop carries them out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .jobs import Chunk, Job
from .workers import Breach, WorkerProcess

# Functions a worker keeps, most recently used last. The sidecar mirrors the list and tells the
# worker which to forget, so both always agree on what the worker has.
WORKER_FUNCTIONS = 16
PREFETCH = 2  # chunks queued per worker: one running, one waiting so the worker never idles
# A second chunk waits behind the first, so prefetching helps only when chunks are short (the round
# trip is then a large share of the time) and hurts when an item is slow (its neighbour waits).
PREFETCH_BELOW = 0.01  # seconds per chunk
# A paced job (rate=) gets its next chunk once that chunk's first start time is this close.
PACE_AHEAD = 0.25  # seconds


def pace(job: Job, count: int, now: float) -> list[float]:
    """The start times of a paced job's next ``count`` items, ``[not_before, spacing]``: the next free
    ones, one every ``1 / rate`` seconds whichever worker runs them, never earlier than ``now``."""
    spacing = 1.0 / job.rate
    first = max(now, job.pace_next)
    job.pace_next = first + count * spacing
    return [first, spacing]


def next_chunk_for(worker: WorkerProcess, jobs: dict[int, Job], workers: Iterable[WorkerProcess],
                   now: float = 0.0) -> Chunk | None:
    """The next chunk for ``worker``: oldest job first; a job capped by ``workers=`` (or its
    Executor's ``max_workers``) waits while enough workers hold its chunks; a paced job waits until
    its next start time is near. A worker running an async job's chunk takes only that job's next
    one (its event loop runs one job at a time)."""
    def groups(w: WorkerProcess) -> set[Any]:
        return {jobs[j].group for j in w.jobs_running() if j in jobs}

    holding = groups(worker)
    running = jobs.get(worker.assigned[0].job) if worker.assigned else None
    for job in jobs.values():
        if not job.queue:
            continue
        if running is not None and running.concurrency and job is not running:
            continue
        if job.rate and job.pace_next > now + PACE_AHEAD:
            continue
        if job.limit and job.group not in holding:
            busy = sum(1 for w in workers if job.group in groups(w))
            if busy >= job.limit:
                continue
        return job.queue.popleft()
    return None


def may_prefetch(worker: WorkerProcess, jobs: dict[int, Job], now: float) -> bool:
    """Queue a second chunk only behind a short one that is not running late."""
    job = jobs.get(worker.assigned[0].job)
    if job is not None and job.concurrency:  # its items start as the first chunk's places free up
        return True
    if job is None or job.chunk_seconds is None or job.chunk_seconds >= PREFETCH_BELOW:
        return False
    return now - worker.head_since < 2 * job.chunk_seconds + 0.002


def limit_breached(worker: WorkerProcess, job: Job | None, now: float) -> Breach | None:
    """Why the worker must be killed (its item's timeout, its job's memory limit), or None."""
    if job is None or not (job.timeout or job.memory_limit):
        return None
    head = worker.assigned[0]
    slot = worker.slot.read()
    on_item = slot.chunk == head.id and head.resume <= slot.offset < head.count
    if job.timeout and on_item and slot.started and now - slot.started > job.timeout:
        return Breach("timeout", job.timeout)
    if job.memory_limit and worker.rss > job.memory_limit:
        return Breach("memory", job.memory_limit, worker.rss)
    return None


def functions_to_forget(worker: WorkerProcess, jobs: dict[int, Job]) -> list[str]:
    """The worker's oldest cached functions past WORKER_FUNCTIONS, never one a live job still needs."""
    in_use = {jobs[j].header["key"] for j in worker.jobs if j in jobs}
    excess = len(worker.keys) - WORKER_FUNCTIONS
    return [key for key in worker.keys if key not in in_use][: max(0, excess)]


def lost(job: Job) -> bool:
    """Workers keep dying before they run any of ``job``'s items (unpickling its function kills
    them, say): its waiting chunks fail now, rather than each killing two more workers."""
    return job.deaths_outside >= 2 * (max(1, job.retries) + 1)


def blame(chunk: Chunk, job: Job, slot_chunk: int, offset: int, width: int) -> tuple[list[int], int]:
    """A worker died running ``chunk``; its slot read (``slot_chunk``, ``offset``, ``width``).
    Returns the offsets that fail now and their attempt count, and marks ``chunk`` for its rerun."""
    in_items = slot_chunk == chunk.id and chunk.resume <= offset < chunk.count
    if in_items and width > 1 and not chunk.careful:
        # It died in a run of items going through map(): run the rest again one by one, and the
        # item that kills a worker then is named exactly.
        chunk.careful = True
        return [], 0
    if in_items:  # the slot names the item that was running
        attempts = chunk.attempts[offset] = chunk.attempts.get(offset, 0) + 1
        if attempts <= job.retries:
            return [], attempts  # it runs again on another worker; the kernel hears of the last try only
        chunk.skip.append(offset)
        return [offset], attempts
    # It died outside any item: before the first (killed while it unpickled the chunk or waited) or
    # after the last (sending results). No item was running, so none is to blame: the chunk runs
    # again elsewhere, as many times as ``retries`` allows (once at least). A chunk that keeps
    # killing its workers there (its items' unpickling does) fails what is left of it.
    chunk.deaths += 1
    job.deaths_outside += 1
    if chunk.deaths <= max(1, job.retries):
        return [], chunk.deaths
    culprits = chunk.remaining()
    chunk.skip.extend(culprits)
    return culprits, chunk.deaths
