"""The progress model: counts, rate, ETA, state, failures, worker output and worker lanes.

Thread-safe: counts arrive on the caller's thread, worker output on the client's reader thread, and
the display thread reads snapshots. No display code here (progress.py chooses and drives one).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import TaskError, details
from .format import format_count, format_duration

# Tunables.
RATE_WINDOW = 10.0  # items/s is measured over this much recent history
MAX_ERRORS = 100  # failures listed in full (the count is always exact)
MAX_OUTPUT_LINES = 200  # worker lines kept for the panel (the cell's own output keeps them all)
MAX_LINE_CHARS = 400

STATES = ("running", "done", "failed", "cancelled")


@dataclass(frozen=True)
class Snapshot:
    """What a renderer draws: the model at one instant."""

    description: str
    state: str
    done: int
    failed: int
    total: int | None
    elapsed: float
    rate: float
    eta: float | None
    workers: int
    lanes: tuple[dict[str, Any], ...]
    errors: tuple[dict[str, Any], ...]
    error_count: int
    output: tuple[dict[str, Any], ...]
    output_count: int
    summary: str
    cancellable: bool
    cancel_requested: bool
    shown: bool
    versions: tuple[int, int, int]  # lanes, errors, output: bumped when that list changes
    unit: str = "items"


def describe_error(error: BaseException, where: str, index: int | None) -> dict[str, Any]:
    """A failure as the widget lists it: a one-line message and the full (remote) traceback."""
    found = details(error)
    if isinstance(error, TaskError):  # could not be rebuilt here: what the worker said of it
        kind, text = error.type_name.rpartition(".")[2], error.message
    else:
        kind = type(error).__name__
        try:
            text = str(error)
        except Exception:  # a task's exception with a broken __str__
            text = ""
    message = f"{kind}: {text}" if text else kind
    traceback = found.remote_traceback if found is not None and found.remote_traceback else message
    return {
        "where": where,
        "index": index,
        "item": found.item if found is not None else None,
        "kind": kind,
        "message": message.splitlines()[0][:MAX_LINE_CHARS] if message else "",
        "traceback": traceback,
    }


class ProgressModel:
    """Counts, rate, ETA, state, failures and worker output of one call. Thread-safe."""

    def __init__(self, description: str, *, total: int | None = None, workers: int = 0,
                 unit: str = "items", cancellable: bool = False, shown: bool = True) -> None:
        self.lock = threading.Lock()
        self.description = description
        self.unit = unit
        self.total = total
        self.workers = workers
        self.cancellable = cancellable
        self.shown = shown
        self.done = 0
        self.failed = 0
        self.cancelled = 0
        self.state = "running"
        self.started = time.monotonic()
        self.ended: float | None = None
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.output: deque[dict[str, Any]] = deque(maxlen=MAX_OUTPUT_LINES)
        self.output_count = 0
        self.partial: dict[tuple[int | None, str], str] = {}  # a line a worker has not ended yet
        self.lanes: list[dict[str, Any]] = []
        self.cancel_requested = False
        self.restored = 0  # a checkpointed call: items its journal held, which did not run
        self.in_flight: int | None = None  # a call of a coroutine function: its items in flight now
        self.rate_limit = ""  # a call with rate=: its limit, e.g. "50/s"
        self.version = 0  # bumped on every change, so the driver can skip idle redraws
        self.versions = [0, 0, 0]
        self.samples: deque[tuple[float, int]] = deque()

    # -- changes ----------------------------------------------------------------------------

    def restart_clock(self) -> None:
        with self.lock:
            self.started = time.monotonic()
            self.samples.clear()

    def set_counts(self, done: int, failed: int, total: int | None = None) -> None:
        with self.lock:
            self.done, self.failed = done, failed
            if total is not None:
                self.total = total
            self.version += 1

    def add(self, done: int = 0, failed: int = 0, cancelled: int = 0, total: int = 0) -> None:
        with self.lock:
            self.done += done
            self.failed += failed
            self.cancelled += cancelled
            self.total = (self.total or 0) + total if total else self.total
            self.version += 1

    def add_errors(self, errors: Mapping[int, BaseException], where: Callable[[int], str]) -> None:
        with self.lock:
            self.error_count += len(errors)
            room = MAX_ERRORS - len(self.errors)
            for index in sorted(errors)[: max(0, room)]:
                self.errors.append(describe_error(errors[index], where(index), index))
            self.versions[1] += 1
            self.version += 1

    def add_output(self, stream: str, text: str, index: int | None) -> None:
        with self.lock:
            key = (index, stream)
            pieces = (self.partial.pop(key, "") + text).split("\n")
            if pieces[-1]:
                self.partial[key] = pieces[-1][:MAX_LINE_CHARS]
            for line in pieces[:-1]:
                self._line(stream, line, index)

    def _line(self, stream: str, line: str, index: int | None) -> None:
        self.output.append({"index": index, "stream": stream, "text": line.rstrip("\r")[:MAX_LINE_CHARS]})
        self.output_count += 1
        self.versions[2] += 1
        self.version += 1

    def set_lanes(self, lanes: list[dict[str, Any]]) -> None:
        with self.lock:
            if self.state != "running" or lanes == self.lanes:
                return
            self.lanes = lanes
            self.versions[0] += 1
            self.version += 1

    def note_flow(self, in_flight: int | None, rate_limit: str = "") -> None:
        """A coroutine function's items in flight now (None: not one), and the call's rate limit."""
        with self.lock:
            if (in_flight, rate_limit) != (self.in_flight, self.rate_limit):
                self.in_flight, self.rate_limit = in_flight, rate_limit
                self.version += 1

    def note_restored(self, count: int) -> None:
        with self.lock:
            if count != self.restored:
                self.restored = count
                self.version += 1

    def request_cancel(self) -> None:
        with self.lock:
            self.cancel_requested = True
            self.version += 1

    def reveal(self) -> None:
        with self.lock:
            self.shown = True
            self.version += 1

    def finish(self, state: str) -> None:
        """End the run in ``state``; worker lanes stop showing items, unended output lines end."""
        with self.lock:
            if self.ended is not None:
                return
            self.state = state if state in STATES else "done"
            self.ended = time.monotonic()
            for (index, stream), line in self.partial.items():
                self._line(stream, line, index)
            self.partial.clear()
            for lane in self.lanes:
                if lane["state"] in ("busy", "task", "starting"):
                    lane["state"] = "idle"
                    lane["index"] = None
            self.versions[0] += 1
            self.version += 1

    # -- reading ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self.lock:
            now = self.ended if self.ended is not None else time.monotonic()
            elapsed = max(0.0, now - self.started)
            finished = self.done + self.failed
            rate = self._rate(now, finished, elapsed)
            eta = None
            if self.state == "running" and self.total is not None and rate > 0:
                eta = max(0.0, (self.total - finished) / rate)
            description = self.description
            if self.restored:  # the widget's head and the text bar both show the description
                description += f" · {format_count(self.restored)} restored"
            if self.in_flight is not None and self.state == "running":
                description += f" · {format_count(self.in_flight)} in flight"
            if self.rate_limit:
                description += f" · at most {self.rate_limit}"
            return Snapshot(
                description=description, state=self.state, done=self.done, failed=self.failed,
                total=self.total, elapsed=elapsed, rate=rate, eta=eta, workers=self.workers,
                lanes=tuple(dict(lane) for lane in self.lanes), errors=tuple(self.errors),
                error_count=self.error_count, output=tuple(self.output), output_count=self.output_count,
                summary=self._summary(elapsed), cancellable=self.cancellable,
                cancel_requested=self.cancel_requested, shown=self.shown,
                versions=(self.versions[0], self.versions[1], self.versions[2]), unit=self.unit,
            )

    def _rate(self, now: float, finished: int, elapsed: float) -> float:
        if self.ended is not None or elapsed < 1e-9:
            return finished / elapsed if elapsed > 1e-9 else 0.0
        # Recent rate: the first sample inside the window against now. Early on, the overall rate.
        samples = self.samples
        samples.append((now, finished))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        start_time, start_count = samples[0]
        if now - start_time >= 1.0:
            return (finished - start_count) / (now - start_time)
        return finished / elapsed

    def _summary(self, elapsed: float) -> str:
        finished = self.done + self.failed
        clock = format_duration(elapsed)
        if self.total == 1 and self.unit == "tasks":  # one submitted call: no counts, no worker total
            if self.state == "running":
                return f"running · {clock}"
            if self.failed:
                return f"failed after {clock}"
            return f"done in {clock}" if self.state == "done" else f"{self.state} after {clock}"
        workers = f"{self.workers} worker{'' if self.workers == 1 else 's'}" if self.workers else ""
        failed = f"{format_count(self.failed)} failed" if self.failed else ""
        if self.total is None:
            count = f"{format_count(finished)} {self._unit(finished)}"
        else:
            count = f"{format_count(finished)} of {format_count(self.total)} {self._unit(self.total)}"
        if self.state == "running":
            parts = [f"running · {count} · {clock}", failed]
        elif self.state == "done":
            parts = [f"{format_count(finished)} {self._unit(finished)} in {clock}", workers, failed]
        else:  # "failed after 32 of 60 items in 1.6 s", "cancelled after ..."
            parts = [f"{self.state} after {count} in {clock}", workers, failed]
        return " · ".join(part for part in parts if part)

    def _unit(self, n: int | None) -> str:
        return self.unit if n != 1 else self.unit.removesuffix("s")


class LaneBook:
    """Turns the sidecar's worker list into stable lanes: a replacement worker takes the lane of the
    one that died, which then shows a restart count and why."""

    VACANT_POLLS = 4  # a lane whose worker is gone and not replaced this many polls: the pool shrank

    def __init__(self, *, count_tasks: bool = True) -> None:
        # False: the lanes show no task counts. A worker's count is of every job it ran, so it
        # means "this call's tasks" only while one call runs; background futures share the pool.
        self.count_tasks = count_tasks
        self.lanes: list[dict[str, Any]] = []
        self.baseline: dict[int, int] = {}  # tasks a worker had done before this call was first seen
        self.crashes: dict[int, str] = {}  # pid -> "item 7"
        self.polled = False

    def note_crash(self, pid: int | None, where: str) -> None:
        # May come after the poll that saw the replacement: notes are worked out again on every poll.
        if pid is not None:
            self.crashes[pid] = where

    def update(self, workers: list[dict[str, Any]], classify: Callable[[dict[str, Any]], tuple[str, int | None]]
               ) -> list[dict[str, Any]]:
        current = {w["pid"]: w for w in workers}
        vacated = [lane for lane in self.lanes if lane["pid"] not in current]
        known = {lane["pid"] for lane in self.lanes}
        for pid, worker in current.items():
            if pid in known:
                continue
            # Tasks a worker did before the first poll belong to earlier calls.
            self.baseline[pid] = int(worker.get("tasks_done") or 0) if not self.polled else 0
            if vacated:
                lane = vacated.pop(0)
                lane.update(previous=lane["pid"], pid=pid, replaced=[*lane["replaced"], lane["pid"]],
                            before=lane["tasks"], vacant=0)
            else:
                self.lanes.append({"pid": pid, "previous": None, "replaced": [], "before": 0, "tasks": 0,
                                   "vacant": 0})
        for lane in vacated:  # gone and not (yet) replaced
            lane["vacant"] += 1
            crashed = lane["pid"] in self.crashes
            if not crashed and lane["vacant"] > self.VACANT_POLLS:
                self.lanes.remove(lane)
            else:
                lane.update(state="crashed" if crashed else "starting", index=None)
        for lane in self.lanes:
            seen = current.get(lane["pid"])
            if seen is not None:
                state, index = classify(seen)
                done = max(0, int(seen.get("tasks_done") or 0) - self.baseline.get(lane["pid"], 0))
                lane.update(state=state, index=index, rss=int(seen.get("rss") or 0), tasks=lane["before"] + done,
                            address=seen.get("address"))  # a Dask worker's; the sidecar's have none
            # Only a crash counts as a restart: workers a cancel or a timeout replaced were stopped on purpose.
            lane["restarts"] = sum(1 for old in lane["replaced"] if old in self.crashes)
            lane["note"] = self._note(lane)
        self.polled = True
        shown = [{k: lane.get(k) for k in ("pid", "state", "index", "rss", "tasks", "restarts", "note")}
                 for lane in self.lanes]
        if not self.count_tasks:
            for lane in shown:
                lane["tasks"] = None
        return shown

    def _note(self, lane: dict[str, Any]) -> str:
        if lane["pid"] in self.crashes:
            return f"crashed on {self.crashes[lane['pid']]}"
        previous = lane["previous"]
        if previous is None:
            return str(lane.get("address") or "")
        crash = self.crashes.get(previous)
        how = f"crashed on {crash}" if crash else "was stopped"
        return f"pid {previous} {how}; pid {lane['pid']} took its place"
