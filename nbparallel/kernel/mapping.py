"""One map call on the kernel side: feed chunks lazily, collect outcomes, cancel on demand.

The caller's own thread drives the run: it pickles the next chunks while fewer than the window are
in flight, then waits for the reader thread to hand it a result. So a generator of ten million
items is read only as fast as the workers consume it, and Ctrl-C lands in the thread that waits.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import queue
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import config
from ..payload import tracebacks
from ..payload import pickling as ser
from .chunking import ChunkSizer, iterate, known_length
from .runner import Client, get_client, settings
from ..errors import NbParallelError, SerializationError, SidecarDied, make_task_error
from .jobspec import Limits, caller_context, crash_error, function_key
from .output import CellTarget, flush_std, tag_lines
from ..wire.frames import Frame
from ..payload.retrying import ATTEMPTS_ATTR, RetryOn

WAIT_SLICE = 0.25  # seconds: the caller re-checks its state at least this often while waiting


@dataclass
class Batch:
    """Outcomes of some items: ``values[k]`` belongs to ``indices[k]``; ``errors`` are the failures."""

    indices: range | list[int]
    values: list[Any]
    errors: dict[int, NbParallelError]


class Observer(Protocol):
    """Watches one run (the progress display). ``output`` is called on the reader thread, the rest
    on the caller's thread."""

    def started(self, run: MapRun) -> None: ...

    def advanced(self, run: MapRun, batch: Batch) -> None: ...

    def output(self, run: MapRun, stream: str, text: str, index: int | None) -> None: ...

    def finished(self, run: MapRun, state: str) -> None:
        """``state``: "done", "failed" (an error stopped it) or "cancelled"."""


@dataclass
class _InFlight:
    start: int
    items: list[Any]
    left: int
    size: int  # bytes of the pickled items
    settled: list[range | list[int]] = field(default_factory=list)  # indices with an outcome

    def is_settled(self, index: int) -> bool:
        return any(index in indices for indices in self.settled)


class MapRun:
    """The state of one map/imap call. Iterate ``batches()`` to drive it."""

    def __init__(
        self,
        fn: Callable[..., Any],
        iterables: tuple[Iterable[Any], ...],
        *,
        workers: int | None,
        chunksize: int | str,
        stop_on_error: bool,
        limits: Limits | None = None,
        client: Client | None = None,
        observer: Observer | None = None,
    ) -> None:
        if not iterables:
            raise TypeError("map() needs at least one iterable to map the function over")
        self.limits = limits or Limits()
        if self.limits.retry_on:
            fn = RetryOn(fn, self.limits.retries, self.limits.retry_on)
        self.function = ser.dumps_function(fn)  # before anything runs: fail fast, name the culprit
        self.sources = tracebacks.SourceIndex(fn)  # writes remote tracebacks out with the cells' lines
        self.total = known_length(iterables)
        self.items = iterate(iterables)
        self.star = len(iterables) > 1
        self.limit = config.resolve_workers(workers) if workers is not None else 0
        self.client = client or get_client()
        # On a Dask cluster the pool is the cluster's threads, as the bridge counted them.
        pool = self.client.size or config.resolve_workers(settings.workers)
        self.workers = self.limit or pool
        self.sizer = ChunkSizer(chunksize, self.workers)
        # A Dask cluster answers later than a local worker: its bridge asks for more chunks in flight.
        self.window = int(getattr(self.client, "info", {}).get("window") or config.CHUNKS_IN_FLIGHT_PER_WORKER)
        self.stop_on_error = stop_on_error
        self.events: queue.SimpleQueue[Frame | SidecarDied] = queue.SimpleQueue()
        self.target: CellTarget  # captured when the run starts: an imap may be iterated in a later cell
        self.job = self.client.new_job_id()
        self.next_index = 0
        self.exhausted = False
        self.in_flight: dict[int, _InFlight] = {}
        self.unresolved = 0
        self.bytes_in_flight = 0
        self.done = 0
        self.failed = 0
        self.finished = False
        self.cancelled = False
        self.late: list[Batch] = []  # outcomes that arrived while cancelling
        self.backlog: Callable[[], int] = lambda: 0  # items the consumer holds back (ordered imap)
        self.observer = observer
        self.output_bytes = 0
        self.output_dropped = False
        self.deadline: float | None = None  # time.monotonic() past which waiting raises TimeoutError
        self.state = "running"  # then "done", "failed" or "cancelled"

    # -- reader-thread side -------------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        if frame.op == "output":
            self.on_output(frame)
        else:
            self.events.put(frame)

    def on_output(self, frame: Frame) -> None:
        raw = frame.get("text", "")
        self.output_bytes += len(raw)
        if self.output_bytes > settings.max_output_bytes:
            if not self.output_dropped:
                self.output_dropped = True
                self.target.stream("stderr", f"[nbparallel: the workers printed more than {settings.max_output_bytes:,} "
                                    "bytes; the rest of this call's output is dropped (configure(max_output_bytes=...))]\n")
        else:
            text = tag_lines(raw, frame.get("index")) if settings.tag_output else raw
            self.target.stream(frame.get("stream", "stdout"), text)
        if self.observer is not None:
            self.observer.output(self, frame.get("stream", "stdout"), raw, frame.get("index"))

    def on_died(self, error: SidecarDied) -> None:
        self.events.put(error)

    # -- caller side --------------------------------------------------------------------------

    def batches(self) -> Generator[Batch, None, None]:
        """Outcomes as they arrive, until every item has one."""
        flush_std()
        self.target = CellTarget.capture()  # output goes to the cell that consumes the results
        self.client.register(self.job, self)
        try:
            self.client.send_packed(
                {
                    "op": "job",
                    "job": self.job,
                    "key": function_key(self.function),
                    "stop_on_error": self.stop_on_error,
                    "call": "star" if self.star else "one",
                    "limit": self.limit,
                    **caller_context(),
                    **self.limits.header(),
                },
                self.function,
            )
            if self.observer is not None:
                self.observer.started(self)
            while True:
                self.pump()
                if self.exhausted and self.unresolved == 0:
                    break
                batch = self.handle(self.wait())
                if batch is not None:
                    if self.observer is not None:
                        self.observer.advanced(self, batch)
                    yield batch
            self.finished = True
        except (GeneratorExit, KeyboardInterrupt):  # the consumer stopped, or Ctrl-C
            self.cancel("cancelled")
            raise
        except BaseException:
            self.cancel("failed")
            raise
        finally:
            self.close()

    def pump(self) -> None:
        max_chunks = self.window * self.workers
        if self.sizer.probing:
            max_chunks = self.workers
        while not self.exhausted and len(self.in_flight) < max_chunks:
            if self.in_flight and (self.unresolved + self.backlog() >= max_chunks * config.MAX_CHUNK_ITEMS
                                   or self.bytes_in_flight >= config.MAX_BYTES_IN_FLIGHT):
                return
            remaining = None if self.total is None else self.total - self.next_index
            items = list(itertools.islice(self.items, self.sizer.next_size(remaining)))
            if not items:
                self.exhausted = True
                return
            payload = ser.dumps_items(items, self.next_index)
            size = len(payload.data) + sum(s["size"] for s in payload.specs)
            self.sizer.observe_bytes(len(items), size)
            chunk = self.client.new_chunk_id()
            self.client.send_packed(
                {"op": "chunk", "job": self.job, "chunk": chunk, "start": self.next_index, "count": len(items)},
                payload,
            )
            self.in_flight[chunk] = _InFlight(self.next_index, items, len(items), size)
            self.bytes_in_flight += size
            self.next_index += len(items)
            self.unresolved += len(items)

    def wait(self) -> Frame | SidecarDied:
        while True:
            timeout = WAIT_SLICE
            if self.deadline is not None:
                timeout = min(timeout, max(0.0, self.deadline - time.monotonic()))
            try:
                return self.events.get(timeout=timeout)
            except queue.Empty:
                if self.client.dead is not None:
                    return self.client.dead
                if self.deadline is not None and time.monotonic() >= self.deadline:

                    raise cf.TimeoutError("the results did not all arrive before the timeout") from None

    def handle(self, event: Frame | SidecarDied) -> Batch | None:
        if isinstance(event, SidecarDied):
            raise _with_completed(SidecarDied(str(event)), {})
        if event.get("chunk") not in self.in_flight:
            ser.close_fds(event)
            return None  # a late word about a chunk that was already settled
        if event.op == "result":
            return self._result(event)
        if event.op == "crashed":
            return self._crashed(event)
        return None

    def _result(self, frame: Frame) -> Batch:
        flight = self.in_flight[frame["chunk"]]
        try:
            offsets, values, problems = ser.unpack(frame, private=True)
        except Exception as exc:  # e.g. a result of a class the kernel cannot import
            return self._unreadable(frame["chunk"], exc)
        if frame["final"] and frame.get("n"):
            self.sizer.observe_time(frame["n"], frame["elapsed"])
        start = flight.start
        indices: range | list[int]
        if isinstance(offsets, range):
            indices = range(start + offsets.start, start + offsets.stop)
        else:
            indices = [start + o for o in offsets]
        errors: dict[int, NbParallelError] = {}
        for offset, (status, value) in problems.items():
            index = start + offset
            if status == ser.RAISED:
                exception, trace = value
                errors[index] = make_task_error(exception, self.sources.render(trace), index,
                                                ser.describe(flight.items[offset]))
                errors[index].attempts = getattr(exception, ATTEMPTS_ATTR, 1)
            else:
                value.index, value.item = index, ser.describe(flight.items[offset])
                errors[index] = value
        flight.settled.append(indices)
        flight.settled.append(list(errors))
        self._resolve(frame["chunk"], len(indices) + len(errors))
        self.done += len(indices)
        self.failed += len(errors)
        return Batch(indices, values, errors)

    def _crashed(self, frame: Frame) -> Batch:
        flight = self.in_flight[frame["chunk"]]
        errors = {index: crash_error(frame, index, ser.describe(flight.items[index - flight.start]))
                  for index in frame["indices"]}
        flight.settled.append(list(errors))
        self._resolve(frame["chunk"], len(errors))
        self.failed += len(errors)
        return Batch([], [], errors)

    def _unreadable(self, chunk: int, exc: Exception) -> Batch:
        """Fail what is left of a chunk whose results the kernel could not unpickle."""
        flight = self.in_flight[chunk]
        errors: dict[int, NbParallelError] = {}
        for offset, item in enumerate(flight.items):
            if not flight.is_settled(flight.start + offset):
                errors[flight.start + offset] = SerializationError(
                    f"the results for item {flight.start + offset} could not be unpickled here: "
                    f"{type(exc).__name__}: {exc}. Is everything the function returns importable in the "
                    "kernel?", index=flight.start + offset, item=ser.describe(item))
        self.unresolved -= flight.left
        self.bytes_in_flight -= flight.size
        del self.in_flight[chunk]
        self.failed += len(errors)
        return Batch([], [], errors)

    def _resolve(self, chunk: int, count: int) -> None:
        flight = self.in_flight[chunk]
        flight.left -= count
        self.unresolved -= count
        if flight.left <= 0:
            self.bytes_in_flight -= flight.size
            del self.in_flight[chunk]

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the job in the sidecar (queued chunks dropped, its workers killed) and keep the
        outcomes that arrive before the sidecar confirms. ``reason``: "cancelled" or "failed"."""
        if self.state == "running":
            self.state = reason
        if self.cancelled or self.client.dead is not None:
            return
        self.cancelled = True
        try:
            self.client.send({"op": "cancel", "job": self.job})
        except SidecarDied:
            return
        deadline = time.monotonic() + config.CANCEL_WAIT
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = self.events.get(timeout=min(left, WAIT_SLICE))
                except queue.Empty:
                    continue
                if isinstance(event, SidecarDied) or event.op == "cancelled":
                    return
                if event.op in ("result", "crashed"):
                    batch = self.handle(event)
                    if batch is not None:
                        self.late.append(batch)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, the sidecar cancels anyway
            return

    def close(self) -> None:
        if self.state == "running":
            self.state = "done" if self.finished else "cancelled"
        if self.observer is not None:
            self.observer.finished(self, self.state)
        self.client.unregister(self.job)
        try:
            self.client.send({"op": "end", "job": self.job})
        except SidecarDied:
            pass


def _with_completed(error: NbParallelError, completed: dict[int, Any]) -> NbParallelError:
    error.completed = completed
    return error


