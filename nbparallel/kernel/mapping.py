"""One map call on the kernel side: feed chunks lazily, hand on outcomes, cancel on demand.

The caller's own thread drives the run: it pickles the next chunks while fewer than the window are
in flight, then waits for the reader thread to hand it a result. So a generator of ten million
items is read only as fast as the workers consume it, and Ctrl-C lands in the thread that waits.
The job itself (opening it, reading its outcomes) is jobs.py's; collecting them is collect.py's.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import config
from ..errors import NbParallelError, SerializationError, SidecarDied
from ..payload import pickling as ser
from ..wire import messages as msg
from ..wire.frames import Frame
from .chunking import ChunkSizer, iterate, known_length
from .feeding import Feeder, get_within
from .jobs import Batch as Batch  # what a run yields; the progress observer reads it from here
from .jobs import HeldInterrupts, Job
from .jobspec import Flow, Limits, wrap
from .output import CellTarget, flush_std
from .runner import Client, get_client, settings

WAIT_SLICE = 0.25  # seconds: the caller re-checks its state at least this often while waiting
DRAIN_GRACE = 0.5  # seconds past a call's deadline to hand on results that had already arrived


class Observer(Protocol):
    """Watches one run (the progress display). ``output`` is called on the reader thread, the rest
    on the caller's thread."""

    def started(self, run: MapRun) -> None: ...

    def advanced(self, run: MapRun, batch: Batch) -> None: ...

    def output(self, run: MapRun, stream: str, text: str, index: int | None) -> None: ...

    def finished(self, run: MapRun, state: str) -> None:
        """``state``: "done", "failed" (an error stopped it) or "cancelled"."""


class InputFailure(Exception):
    """The call's input raised ``error`` after ``read`` items had been taken from it. ``batches``
    raises this at once with ``stop_on_error``, else once every item read has its outcome."""

    def __init__(self, error: BaseException, read: int) -> None:
        super().__init__(f"the input raised {type(error).__name__} after {read} items")
        self.error = error
        self.read = read


@dataclass
class _InFlight:
    start: int
    items: list[Any]
    left: int
    size: int  # bytes of the pickled items
    settled: list[range | list[int]] = field(default_factory=list)  # indices with an outcome

    def is_settled(self, index: int) -> bool:
        return any(index in indices for indices in self.settled)

    def describe(self, index: int) -> str:
        return ser.describe(self.items[index - self.start])


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
        flow: Flow | None = None,
    ) -> None:
        if not iterables:
            raise TypeError("map() needs at least one iterable to map the function over")
        self.limits = limits or Limits()
        self.flow = flow or Flow()
        fn, self.asynchronous = wrap(fn, self.limits, self.flow)  # retries (and an async item's timeout)
        self.star = len(iterables) > 1
        self.engine = Job(fn, call="star" if self.star else "one")  # pickles fn now: fails fast
        self.total = known_length(iterables)
        self.items = iterate(iterables)
        self.feeder = Feeder(self.items)  # on a thread of its own once there is a deadline (feeding.py)
        self.limit = config.resolve_workers(workers) if workers is not None else 0
        self.client = client or get_client()
        self.engine.connect(self.client)
        self.job = self.engine.id
        # On a Dask cluster the pool is the cluster's threads, as the bridge counted them.
        pool = self.client.size or config.resolve_workers(settings.workers)
        self.workers = self.limit or pool
        self.sizer = ChunkSizer(chunksize, self.workers)
        self.per_worker = 0  # a coroutine function: the items each worker keeps in flight
        if self.asynchronous:
            self.workers, self.per_worker, size = self.flow.plan(self.workers, chunksize)
            self.limit, self.sizer = self.workers, ChunkSizer(size, self.workers)
        self.running: dict[int, int] = {}  # worker pid -> its items in flight (coroutines), as last heard
        # A Dask cluster answers later than a local worker: its bridge asks for more chunks in flight.
        self.window = int(getattr(self.client, "info", {}).get("window") or config.CHUNKS_IN_FLIGHT_PER_WORKER)
        self.stop_on_error = stop_on_error
        self.events: queue.SimpleQueue[Frame | SidecarDied] = queue.SimpleQueue()
        self.target: CellTarget  # captured when the run starts: an imap may be iterated in a later cell
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
        self.input_error: BaseException | None = None  # what the input raised; it is read no further
        self.local: list[Batch] = []  # outcomes settled here, never sent: items that cannot be pickled
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
        elif frame.op == "display":
            self.target.show_frame(frame, tagged=settings.tag_output)
        else:
            self.events.put(frame)

    def on_output(self, frame: Frame) -> None:
        out = msg.view(frame, msg.Output)
        raw = out.get("text", "")
        self.output_bytes += len(raw)
        if self.output_bytes > settings.max_output_bytes:
            if not self.output_dropped:
                self.output_dropped = True
                self.target.stream("stderr", f"[nbparallel: the workers printed more than {settings.max_output_bytes:,} "
                                    "bytes; the rest of this call's output is dropped (configure(max_output_bytes=...))]\n")
        else:
            text = self.target.tag(raw, out.get("index")) if settings.tag_output else raw
            self.target.stream(out.get("stream", "stdout"), text)
        if self.observer is not None:
            self.observer.output(self, out.get("stream", "stdout"), raw, out.get("index"))

    def on_died(self, error: SidecarDied) -> None:
        self.events.put(error)

    # -- caller side --------------------------------------------------------------------------

    def batches(self) -> Generator[Batch, None, None]:
        """Outcomes as they arrive, until every item has one."""
        flush_std()
        self.target = CellTarget.capture()  # output goes to the cell that consumes the results
        self.engine.route(self)
        try:
            self.engine.open(limit=self.limit, stop_on_error=self.stop_on_error, limits=self.limits,
                             concurrency=self.per_worker or None, rate=self.flow.rate)
            if self.observer is not None:
                self.observer.started(self)
            while True:
                self.pump()
                while self.local:
                    settled = self.local.pop(0)
                    if self.observer is not None:
                        self.observer.advanced(self, settled)
                    yield settled
                if self.input_error is not None and (self.stop_on_error or self.unresolved == 0):
                    raise InputFailure(self.input_error, self.next_index)
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
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return  # nothing more goes out: what arrived is still handed on, then wait() times out
            remaining = None if self.total is None else self.total - self.next_index
            items = self.read(self.sizer.next_size(remaining))
            if not items:
                self.exhausted = True
                return
            try:
                payload = ser.dumps_items(items, self.next_index)
            except SerializationError as error:
                if self.stop_on_error or error.index is None:
                    raise
                self.send_picklable(items)  # errors="return": only the items that cannot travel fail
                continue
            self.send_items(items, payload)

    def read(self, count: int) -> list[Any]:
        """Up to ``count`` items from the input; fewer at its end. What the input raises ends the
        reading (``input_error``), keeping the items read before it; Ctrl-C propagates, and so does
        the deadline's TimeoutError, even while the input blocks."""
        items, error = self.feeder.take(count, self.deadline)
        if error is not None:
            self.input_error = error
            self.exhausted = True
        return items

    def send_items(self, items: list[Any], payload: Any) -> None:
        size = len(payload.data) + sum(s["size"] for s in payload.specs)
        self.sizer.observe_bytes(len(items), size)
        chunk = self.engine.send_chunk(self.next_index, len(items), payload)
        self.in_flight[chunk] = _InFlight(self.next_index, items, len(items), size)
        self.bytes_in_flight += size
        self.next_index += len(items)
        self.unresolved += len(items)

    def send_picklable(self, items: list[Any]) -> None:
        """Send ``items`` in runs of those that can be pickled; each one that cannot fails here, in
        its place (``local``), and the others run as usual."""
        run: list[Any] = []
        for item in [*items, _END]:
            error = None if item is _END else ser.pickling_error(item)
            if error is None and item is not _END:
                run.append(item)
                continue
            if run:
                self.send_items(run, ser.dumps_items(run, self.next_index))
                run = []
            if error is None:  # the end
                break
            index = self.next_index
            failure = SerializationError(
                f"item {index} ({ser.describe(item)}) cannot be sent to a worker ({ser.why(error)}). "
                "Pass something picklable, e.g. a path or the data the item stands for.",
                index=index, item=ser.describe(item))
            failure.__cause__ = error
            self.local.append(Batch([], [], {index: failure}))
            self.failed += 1
            self.next_index += 1

    def wait(self) -> Frame | SidecarDied:
        while True:
            timeout = WAIT_SLICE
            if self.deadline is not None:
                now = time.monotonic()
                # Past the deadline what already arrived is still handed on, but a stream that never
                # runs dry (results keep coming) must not keep the call alive: a bounded grace.
                if now >= self.deadline + DRAIN_GRACE:
                    raise cf.TimeoutError("the results did not all arrive before the timeout")
                timeout = min(timeout, max(0.0, self.deadline - now))
            try:
                # Not events.get(timeout=...): past the deadline (timeout 0) that may never return on
                # Python 3.10 (get_within says why).
                return get_within(self.events, timeout)
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
        result = msg.view(frame, msg.Result)
        flight = self.in_flight[result["chunk"]]
        problem: BaseException | None = None
        with HeldInterrupts() as held:  # a KeyboardInterrupt in here is the unpickled code's: it fails items
            try:
                batch = self.engine.outcomes(frame, flight.start, flight.describe)
            except BaseException as exc:  # e.g. a result of a class the kernel cannot import, or sys.exit
                problem = exc
        batch = self._unreadable(result["chunk"], problem) if problem is not None else self._count(result, batch)
        if held.caught:  # Ctrl-C came meanwhile: keep the batch (err.completed), then stop the call
            self.late.append(batch)
            held.release()
        return batch

    def _count(self, result: msg.Result, batch: Batch) -> Batch:
        flight = self.in_flight[result["chunk"]]
        if result["final"] and result.get("n"):
            self.sizer.observe_time(result["n"], result["elapsed"])
        if "running" in result:
            self.running[result["pid"]] = result["running"]
        flight.settled.append(batch.indices)
        flight.settled.append(list(batch.errors))
        self._resolve(result["chunk"], len(batch.indices) + len(batch.errors))
        self.done += len(batch.indices)
        self.failed += len(batch.errors)
        return batch

    def _crashed(self, frame: Frame) -> Batch:
        flight = self.in_flight[frame["chunk"]]
        errors = self.engine.crashed(frame, flight.describe)
        flight.settled.append(list(errors))
        self._resolve(frame["chunk"], len(errors))
        self.failed += len(errors)
        return Batch([], [], errors)

    def _unreadable(self, chunk: int, exc: BaseException) -> Batch:
        """Fail what is left of a chunk whose results the kernel could not unpickle."""
        flight = self.in_flight[chunk]
        errors: dict[int, BaseException] = {
            index: self.engine.unreadable(exc, index, flight.describe)
            for index in range(flight.start, flight.start + len(flight.items)) if not flight.is_settled(index)}
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
        if not self.engine.cancel():
            return
        deadline = time.monotonic() + config.CANCEL_WAIT
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    event = get_within(self.events, min(left, WAIT_SLICE))
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
        self.feeder.close()
        if self.observer is not None:
            self.observer.finished(self, self.state)
        self.engine.end()


_END = object()  # marks the end of a chunk's items in ``send_picklable``


def _with_completed(error: NbParallelError, completed: dict[int, Any]) -> NbParallelError:
    error.completed = completed
    return error


