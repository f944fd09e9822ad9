"""A worker's event loop: the chunks of an async job run as coroutines, many items in flight.

loop.py hands a chunk over here when its job has ``concurrency`` (the kernel saw a coroutine
function, or was told ``concurrency=``), and this runs it, and every chunk of the same job that
arrives meanwhile, on one event loop per worker (made once, reused):

- Items start as asyncio tasks while fewer than ``concurrency`` are in flight. For an async job the
  sidecar keeps a second chunk of it queued here, and the loop reads the socket while it runs
  (other frames wait in ``host.pending`` for loop.py's serve loop), so the next chunk's items start
  as places free up and the flow never drains between chunks.
- A paced chunk (``rate=``) starts its k-th item no earlier than ``not_before + k * spacing``, and
  no later than one spacing (at least ``LATE_BY``) after it: an item that cannot start by then (the
  places were all taken, a plain function ran long) hands the chunk's items not yet started back to
  the sidecar (``requeue``), which sends them again with new start times. So start times never pile
  up into a burst, and the job never starts more than ``rate`` items a second.
- Outcomes go out as they finish, at most ``FLUSH_INTERVAL`` apart, each chunk's last in its
  ``final`` frame (chunks may finish out of order). ``upto`` is the first offset without an outcome,
  ``settled`` the offsets past it that got one, so after a crash only what had none runs again.
- The slot holds the oldest chunk here (the one the sidecar sees first), its first offset without an
  outcome, and as width the items in flight (1: that very item). With a ``timeout`` its ``started``
  is a heartbeat written by the loop: a loop blocked past the timeout gets the worker killed.
  A coroutine that only runs late is cancelled by ``Attempts`` (payload/retrying.py) instead.
- What an item prints is tagged with that item: each task sets ``aiocall.CURRENT_INDEX``.
- With ``stop_on_error``, the first failure goes out at once and no more items start.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .. import config
from ..payload import aiocall
from ..payload import pickling as ser
from ..payload.outcomes import Batch
from ..wire import messages as msg
from ..wire import worker_messages as wmsg
from ..wire.frames import Frame, read_frame
from ..wire.slot import Slot
from .running import unpickle_failure
from .sending import Connection, WorkerState, flush_std, send_outcomes

FLUSH_INTERVAL = 0.05  # seconds: outcomes of an async chunk go out at least this often
HEARTBEAT = 0.1  # seconds between heartbeats in the slot (a quarter of a shorter timeout)
LATE_BY = 0.01  # seconds: a paced item may start this late (or one spacing, if longer), no later


class Host(Protocol):
    """What this module needs of loop.py's Worker."""

    conn: Connection
    slot: Slot
    state: WorkerState
    jobs: dict[int, msg.Job]
    pending: deque[Frame]

    def function(self, key: str) -> Callable[..., Any]: ...

    def enter_job(self, job: msg.Job) -> None: ...


_loop: asyncio.AbstractEventLoop | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """This worker's event loop, made on first use and kept (a task's own objects may be bound to it)."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop


def settle(batch: Batch, state: WorkerState) -> None:
    """A plain job's function returned awaitables: await them here (see ``aiocall.resolve``);
    ``state``: the worker's, whose output tags then follow the item awaited."""
    state.current = aiocall.CURRENT_INDEX.get
    try:
        aiocall.resolve(batch, event_loop(), config.ASYNC_CONCURRENCY)
    finally:
        state.current = None


def run_chunk(host: Host, frame: Frame) -> None:
    """Run an async job's chunk, and the chunks of that job that arrive meanwhile, to the end."""
    header = msg.view(frame, wmsg.WorkerChunk)
    job = host.jobs[header["job"]]
    try:
        host.enter_job(job)
        fn = host.function(job["key"])
    except BaseException as exc:  # the function cannot be rebuilt here: every item fails
        ser.close_fds(frame)
        chunk = Chunk(header, [], time.perf_counter())
        fail_all(chunk, "function", exc)
        send(host, chunk, final=True, running=0)
        return
    run = AsyncJob(host, job, fn)
    host.state.job = header["job"]
    host.state.current = aiocall.CURRENT_INDEX.get
    try:
        event_loop().run_until_complete(run.serve(frame))
    finally:
        host.state.current = None
        host.state.clear()
        host.slot.write(started=0.0, chunk=-1, offset=-1, width=1)


class Chunk:
    """One chunk here: what is left to start, what has an outcome, the outcomes not yet sent."""

    def __init__(self, header: wmsg.WorkerChunk, items: list[Any], began: float) -> None:
        self.header = header
        self.id, self.start, self.count = header["chunk"], header["start"], header["count"]
        self.items = items
        skip = set(header.get("skip", ()))
        resume = header.get("resume", 0)
        self.todo = [offset for offset in range(resume, self.count) if offset not in skip]
        self.done = skip | set(range(resume))  # offsets with an outcome, here or before
        self.upto = resume
        self.advance()
        self.left = len(self.todo)  # items still without an outcome
        self.unstarted = len(self.todo)
        self.running = 0
        self.outcomes: list[tuple[int, int, Any]] = []  # (offset, status, value) not yet sent
        self.began = began
        self.careful = bool(header.get("careful"))
        pace = header.get("pace")
        self.not_before, self.spacing = (float(pace[0]), float(pace[1])) if pace else (0.0, 0.0)
        self.requeue = False  # its items not started go back to the sidecar (they missed their start times)

    def advance(self) -> None:
        while self.upto < self.count and self.upto in self.done:
            self.upto += 1

    def record(self, offset: int, status: int, value: Any) -> None:
        self.outcomes.append((offset, status, value))
        self.done.add(offset)
        self.left -= 1
        self.advance()


def fail_all(chunk: Chunk, stage: str, exc: BaseException) -> None:
    error = unpickle_failure(stage, exc)
    for offset in chunk.todo:
        chunk.record(offset, ser.FAILED, error)
    chunk.todo, chunk.unstarted = [], 0


def send(host: Host, chunk: Chunk, *, final: bool, running: int) -> None:
    """The outcomes ``chunk`` has not sent yet, in one ``result`` frame."""
    outcomes, chunk.outcomes = sorted(chunk.outcomes, key=lambda entry: entry[0]), []
    batch = Batch(chunk.start)
    for offset, status, value in outcomes:
        if status == ser.OK:
            batch.offsets.append(offset)
            batch.values.append(value)
        else:
            batch.add_problem(offset, status, value)
    header = wmsg.worker_result(job=chunk.header["job"], chunk=chunk.id, upto=chunk.upto, n=len(outcomes),
                                failed=len(batch.problems), elapsed=time.perf_counter() - chunk.began, final=final,
                                running=running)
    settled = [offset for offset, _, _ in outcomes if offset >= chunk.upto]
    if settled:
        header["settled"] = settled
    if final and chunk.requeue:
        header["requeue"] = True
    send_outcomes(host.conn, header, batch)


class AsyncJob:
    """The chunks of one async job in this worker, and the items of theirs in flight."""

    def __init__(self, host: Host, job: msg.Job, fn: Callable[..., Any]) -> None:
        self.host = host
        self.job = job["job"]
        self.fn = fn
        self.call: str = job.get("call", "one")
        self.limit = max(1, int(job.get("concurrency") or 1))
        self.stop_on_error = bool(job.get("stop_on_error"))
        timeout = float(job.get("timeout") or 0)
        self.timed = timeout > 0
        self.heartbeat = min(HEARTBEAT, timeout / 4) if self.timed else HEARTBEAT
        self.chunks: dict[int, Chunk] = {}  # in the order they came: the first is the sidecar's head
        self.queue: deque[tuple[Chunk, int]] = deque()  # (chunk, k): its k-th item to run, not started
        self.flying: dict[tuple[int, int], None] = {}  # (chunk id, offset) in flight
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped = False
        self.closed = False
        self.last_flush = time.perf_counter()

    # -- the loop's work ---------------------------------------------------------------------------

    async def serve(self, first: Frame) -> None:
        loop = asyncio.get_running_loop()
        self.gate = asyncio.Semaphore(self.limit)
        self.wake = asyncio.Event()
        self.add(first)
        sock = self.host.conn.sock
        loop.add_reader(sock.fileno(), self.on_readable)
        ticker = loop.create_task(self.tick())
        try:
            while True:
                self.feeding = loop.create_task(self.feed())
                await asyncio.wait({self.feeding})
                # The reader may have taken a chunk after the feed ended, before this line ran: then on.
                if self.closed or not self.chunks:
                    break
        finally:
            if not self.closed:
                loop.remove_reader(sock.fileno())
            ticker.cancel()
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.wait(self.tasks, timeout=1.0)

    async def feed(self) -> None:
        """Start queued items as places free up (paced ones on time) until every chunk is done."""
        while self.chunks and not self.closed:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
                continue
            entry = chunk, k = self.queue[0]
            await self.gate.acquire()  # a place first: a paced item then starts on time
            if not self.queue or self.queue[0] != entry or self.closed:
                self.gate.release()
                continue  # the queue changed meanwhile (a stop)
            if chunk.not_before:
                at = chunk.not_before + k * chunk.spacing
                if time.monotonic() > at + max(chunk.spacing, LATE_BY):
                    self.gate.release()
                    self.hand_back(chunk)
                    continue
                if at > time.monotonic():
                    await asyncio.sleep(at - time.monotonic())
                    if not self.queue or self.queue[0] != entry or self.closed:
                        self.gate.release()
                        continue
            self.queue.popleft()
            offset = chunk.todo[k]
            chunk.unstarted -= 1
            chunk.running += 1
            self.flying[(chunk.id, offset)] = None
            if len(self.flying) == 1 or chunk.careful:
                self.mark()
            task = asyncio.get_running_loop().create_task(self.run_item(chunk, offset))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            if chunk.careful:  # after a crash: one item at a time, so the slot names the culprit
                await asyncio.wait({task})

    async def run_item(self, chunk: Chunk, offset: int) -> None:
        aiocall.CURRENT_INDEX.set(chunk.start + offset)  # this task's own context
        try:
            status, value = await aiocall.outcome(self.fn, self.call, chunk.items[offset])
        finally:
            self.gate.release()
            chunk.running -= 1
            self.flying.pop((chunk.id, offset), None)
        chunk.record(offset, status, value)
        if status != ser.OK and self.stop_on_error:
            self.stop()
        self.settle(chunk)

    async def tick(self) -> None:
        """Send what finished at least every FLUSH_INTERVAL; keep the slot's heartbeat fresh."""
        while True:
            self.mark()
            now = time.perf_counter()
            if now - self.last_flush >= FLUSH_INTERVAL:
                self.flush()
            await asyncio.sleep(min(FLUSH_INTERVAL, self.heartbeat))

    # -- chunks in, outcomes out -------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            frame = read_frame(self.host.conn.sock)
        except (EOFError, OSError):  # the sidecar is gone: stop; loop.py's serve loop then exits
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.host.conn.sock.fileno())
            self.feeding.cancel()  # it may wait for a place that never frees up
            return
        if frame.op == "chunk" and frame.get("job") == self.job:
            self.add(frame)
        else:  # another job's business: loop.py's serve loop takes it once this job's chunks are done
            self.host.pending.append(frame)

    def add(self, frame: Frame) -> None:
        header = msg.view(frame, wmsg.WorkerChunk)
        chunk = Chunk(header, [], time.perf_counter())
        try:
            chunk.items = ser.unpack(frame)
        except BaseException as exc:  # these items cannot be rebuilt here: each fails
            fail_all(chunk, "items", exc)
        self.chunks[chunk.id] = chunk
        if self.stopped:
            chunk.todo, chunk.unstarted = [], 0
        self.queue.extend((chunk, k) for k in range(chunk.unstarted))
        self.settle(chunk)
        self.wake.set()

    def settle(self, chunk: Chunk) -> None:
        """Send ``chunk``'s final frame once nothing of it is left to run."""
        if chunk.id in self.chunks and chunk.running == 0 and chunk.unstarted == 0:
            del self.chunks[chunk.id]
            flush_std()  # what its items printed goes out before their results
            send(self.host, chunk, final=True, running=len(self.flying))
            self.wake.set()
            if self.chunks:
                self.mark()

    def flush(self) -> None:
        self.last_flush = time.perf_counter()
        for chunk in self.chunks.values():
            if chunk.outcomes:
                send(self.host, chunk, final=False, running=len(self.flying))

    def hand_back(self, chunk: Chunk) -> None:
        """``chunk``'s next item missed its start time: its items not started go back to the sidecar."""
        self.queue = deque(entry for entry in self.queue if entry[0] is not chunk)
        chunk.unstarted = 0
        chunk.requeue = True
        self.settle(chunk)

    def stop(self) -> None:
        """The first failure with ``stop_on_error``: send it now, start nothing more."""
        if self.stopped:
            return
        self.stopped = True
        for chunk, _ in self.queue:
            chunk.unstarted = 0
        self.queue.clear()
        self.flush()
        for chunk in list(self.chunks.values()):
            self.settle(chunk)

    def mark(self) -> None:
        """The slot: the oldest chunk here, its first offset without an outcome, the width in flight;
        with a timeout, a fresh heartbeat."""
        head = next(iter(self.chunks.values()), None)
        if head is None:
            return
        offset, width = min(head.upto, head.count - 1), max(2, len(self.flying))
        if len(self.flying) == 1:
            chunk_id, only = next(iter(self.flying))
            if chunk_id == head.id:
                offset, width = only, 1
        self.host.slot.write(started=time.monotonic() if self.timed else 0.0, chunk=head.id, offset=offset,
                             width=width)
