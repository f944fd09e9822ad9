"""The worker: started by the sidecar, runs chunks of items and sends back one outcome per item.

Run as ``python -m nbparallel.worker FD SLOT_FD SIDECAR_PID PRELOAD_JSON``. It talks to the sidecar
over the inherited socket ``FD``. Before running each item it writes ``(chunk, offset)`` into the
shared slot ``SLOT_FD``, so when the process dies the sidecar knows exactly which item killed it and
can rerun the rest of the chunk elsewhere. ``print`` and ``logging`` output is sent as frames tagged
with the item being run.
"""

from __future__ import annotations

import importlib
import io
import json
import mmap
import operator
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .. import config
from ..config import ROLE_ENV
from ..payload import pickling as ser
from ..payload import salvage
from ..errors import NbParallelError, SerializationError
from ..payload.outcomes import Batch
from ..wire import messages as msg
from ..wire import worker_messages as wmsg
from ..wire.frames import Frame, read_frame, send_frame
from . import display as rich
from ..wire.slot import OFFSET, SIZE, STARTED, Slot


OUTPUT_PIECE = 65536  # characters of printed text per frame: escaped, far below the header limit
FLUSH_INTERVAL = 0.25  # seconds: a long chunk streams the results it has at this pace
SUB_BATCH = 64  # items run through map() between two marks in the slot
WATCH_INTERVAL = 0.5  # seconds between checks that the sidecar is still alive


class Connection:
    """The socket to the sidecar, shared by the task thread and any thread that prints."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.forked = False  # in a process a task forked from the worker (see Worker.forked)

    def send(self, header: Mapping[str, Any], buffers: list[bytes] | None = None, fds: list[int] | None = None) -> None:
        if self.forked:  # a forked copy of the worker that came back here: it has no say on the wire
            os._exit(0)
        with self.lock:
            send_frame(self.sock, header, buffers or [], fds or [])


class TaggedOutput(io.TextIOBase):
    """A stand-in for sys.stdout/stderr that sends each line tagged with the current item."""

    def __init__(self, conn: Connection, name: str, state: WorkerState) -> None:
        self.conn = conn
        self.stream = name
        self.state = state
        self.pending: list[str] = []
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self.conn.forked:  # held by a logging handler in a forked child: its own stderr instead
            stream = sys.__stderr__ if self.stream == "stderr" else sys.__stdout__
            return stream.write(text) if stream is not None else len(text)
        with self.lock:
            self.pending.append(text)
            if "\n" in text or sum(map(len, self.pending)) > 65536:
                self._send_locked()
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self._send_locked()

    def _send_locked(self) -> None:
        if not self.pending:
            return
        text, self.pending = "".join(self.pending), []
        at = 0
        while at < len(text):  # in pieces, at line ends where it can: any size, never a header past the limit
            end = at + OUTPUT_PIECE
            if end < len(text):
                end = text.rfind("\n", at, end) + 1 or end
            self.conn.send(wmsg.worker_output(job=self.state.job, index=self.state.index, stream=self.stream,
                                              text=text[at:end]))
            at = end

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """A task closing sys.stdout must not take the capture away from the items after it."""
        self.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("worker output is captured; it has no file descriptor")


class WorkerState:
    """What the worker is doing now; read by the output streams to tag lines."""

    def __init__(self) -> None:
        self.job: int | None = None
        self._index: int | None = None
        self._run: tuple[int, Any, int] | None = None  # fast mode: (first index, iterator, its length)
        self.current: Callable[[], int | None] | None = None  # an async job: the running task's item (aio.py)

    @property
    def index(self) -> int | None:
        if self.current is not None:
            return self.current()
        if self._run is not None:  # the item map() is on: how far the iterator has gone
            first, pending, size = self._run
            return first + size - operator.length_hint(pending) - 1
        return self._index

    @index.setter
    def index(self, value: int | None) -> None:
        self._run, self._index = None, value

    def follow(self, first: int, pending: Any, size: int) -> None:
        self._run = (first, pending, size)

    def clear(self) -> None:
        self._run = self._index = None

    def drop_run(self) -> None:
        """Leave the items of the run map() is on unrun (in a forked child: they are the worker's)."""
        if self._run is not None:
            for _ in self._run[1]:
                pass


class ChunkRun:
    """The outcomes of one chunk so far, sent in pieces when the chunk runs long."""

    def __init__(self, worker: Worker, chunk: wmsg.WorkerChunk, batch: Batch, began: float) -> None:
        self.worker, self.chunk, self.batch, self.began = worker, chunk, batch, began
        self.start = chunk["start"]
        self.last_flush = began

    def flush_if_due(self, next_offset: int) -> None:
        now = time.perf_counter()
        if now - self.last_flush > FLUSH_INTERVAL and next_offset < self.chunk["count"]:
            self.worker.send_result(self.chunk, self.batch, next_offset, self.began, final=False)
            self.batch = Batch(self.start)
            self.last_flush = now


class Worker:
    def __init__(self, conn: Connection, slot: Slot) -> None:
        self.conn = conn
        self.slot = slot
        self.state = WorkerState()
        self.streams: tuple[Any, Any] = (sys.stdout, sys.stderr)  # what each chunk starts with (main sets them)
        self.function_frames: dict[str, Frame] = {}  # received, not yet unpickled
        self.functions: dict[str, Callable[..., Any]] = {}  # the sidecar says when to forget one
        self.jobs: dict[int, msg.Job] = {}
        self.pending: deque[Frame] = deque()  # read by an async job's loop (aio.py), not yet served

    def forked(self) -> None:
        """Run in a process a task forked from this worker, as fork returns (os.register_at_fork).
        The child must not pose as the worker: its copy of the socket is closed, its output goes to
        the descriptors it inherited, the slot it writes is its own, and if the task returns into the
        worker's loops, it exits there instead of running more of the worker's items."""
        self.conn.forked = True
        self.conn.sock.close()  # this copy only: the worker's stays open
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        self.slot = Slot(mmap.mmap(-1, SIZE))
        self.state.drop_run()

    def serve(self) -> None:
        while True:
            try:
                frame = self.pending.popleft() if self.pending else read_frame(self.conn.sock)
            except EOFError:
                return
            op = frame.op
            if op == "chunk":
                self.run_chunk(frame)
            elif op == "job":
                job = msg.view(frame, msg.Job)
                self.jobs[job["job"]] = job
                if frame.buffers:
                    self.function_frames[job["key"]] = frame
            elif op == "end":
                self.jobs.pop(msg.view(frame, msg.End)["job"], None)
            elif op == "forget":
                key = msg.view(frame, wmsg.Forget)["key"]
                self.functions.pop(key, None)
                stale = self.function_frames.pop(key, None)
                if stale is not None:
                    ser.close_fds(stale)
            elif op == "exit":
                return

    def function(self, key: str) -> Callable[..., Any]:
        fn = self.functions.get(key)
        if fn is None:
            fn = ser.unpack(self.function_frames.pop(key))
            self.functions[key] = fn
        return fn

    def enter_job(self, job: msg.Job) -> None:
        # The kernel may have changed directory or sys.path since the worker started; functions
        # pickled by reference are imported from there.
        cwd = job.get("cwd")
        if cwd and cwd != os.getcwd() and os.path.isdir(cwd):
            os.chdir(cwd)
        for entry in reversed(job.get("path", [])):
            if entry not in sys.path:
                sys.path.insert(0, entry)

    def run_chunk(self, frame: Frame) -> None:
        if self.jobs[frame["job"]].get("concurrency"):  # an async job: many items in flight on an event loop
            from . import aio  # asyncio is loaded only by workers that run coroutines

            aio.run_chunk(self, frame)
            return
        header = msg.view(frame, wmsg.WorkerChunk)
        chunk, start, count = header["chunk"], header["start"], header["count"]
        job = self.jobs[header["job"]]
        skip = set(header.get("skip", ()))
        resume = header.get("resume", 0)
        stop_on_error = bool(job.get("stop_on_error"))
        call: msg.CallMode = job.get("call", "one")
        self.state.job = header["job"]
        sys.stdout, sys.stderr = self.streams  # a task may have replaced them: not for the next ones
        batch = Batch(start)
        began = time.perf_counter()
        stage = "function"
        try:
            self.enter_job(job)
            fn = self.function(job["key"])
            stage = "items"
            items, broken = salvage.unpack_items(frame)
        except BaseException as exc:  # the function or the items could not be rebuilt here
            error = SerializationError(
                f"the worker could not unpickle the {stage}: {type(exc).__name__}: {exc}. "
                "Is the module that defines it importable in the worker (same sys.path, same cwd)?"
            )
            for offset in range(resume, count):
                if offset not in skip:
                    batch.add_problem(offset, ser.FAILED, error)
            self.send_result(header, batch, count, began, final=True)
            return
        # After a crash, or with a per-item timeout, every item is marked in the slot; otherwise
        # items run through map() in runs of SUB_BATCH, a fifth of the cost per item.
        for offset, why in broken.items():  # an item that cannot be rebuilt here fails alone
            if offset >= resume and offset not in skip:
                batch.add_problem(offset, ser.FAILED, salvage.unreadable("input", why, start + offset))
                skip.add(offset)
        careful = bool(skip) or bool(job.get("timeout")) or bool(header.get("careful")) or call == "kwargs"
        run = ChunkRun(self, header, batch, began)
        self.slot.write(started=0.0, chunk=chunk, offset=resume, width=1)
        if careful:
            upto = self.run_careful(run, fn, items, call, resume, skip, stop_on_error, bool(job.get("timeout")))
        else:
            upto = self.run_fast(run, fn, items, call == "star", resume, stop_on_error)
        self.state.clear()
        flush_std()
        rich.flush()  # figures the chunk's tasks left open go to the cell now, tagged by item
        self.slot.write(offset=count, width=1)  # past the last item: a death now is no item's fault
        self.send_result(header, run.batch, upto, began, final=True)
        self.slot.write(chunk=-1, offset=-1)

    def run_careful(self, run: ChunkRun, fn: Callable[..., Any], items: list[Any], call: msg.CallMode, resume: int,
                    skip: set[int], stop_on_error: bool, timed: bool) -> int:
        """One item at a time, each marked in the slot (and timed, for the sidecar's timeout)."""
        # Item assignment through the slot's typed views is the cheapest write (this runs once per
        # item; Slot.write costs twice as much): the start time first, as Slot.write orders them.
        ints, times, state, monotonic = self.slot.ints, self.slot.times, self.state, time.monotonic
        conn = self.conn
        count = len(items)
        for offset in range(resume, count):
            if offset in skip:
                continue
            if conn.forked:  # a task forked and its child returned here: the items are the worker's
                os._exit(0)
            if timed:
                times[STARTED] = monotonic()
            ints[OFFSET] = offset
            state.index = run.start + offset
            try:
                item = items[offset]
                if call == "one":
                    value = fn(item)
                elif call == "star":
                    value = fn(*item)
                else:  # "kwargs": submit's (args, kwargs)
                    value = fn(*item[0], **item[1])
            except BaseException as exc:  # SystemExit and KeyboardInterrupt in a task are its outcome too
                run.batch.add_problem(offset, ser.RAISED, ser.encode_exception(exc))
                if stop_on_error:
                    return offset + 1
            else:
                run.batch.offsets.append(offset)
                run.batch.values.append(value)
            run.flush_if_due(offset + 1)
        return count

    def run_fast(self, run: ChunkRun, fn: Callable[..., Any], items: list[Any], star: bool, resume: int,
                 stop_on_error: bool) -> int:
        """Runs of SUB_BATCH items through ``_calls`` (a generator: map() would take a StopIteration the
        task raises for the end of the run), the slot marking the run. If the worker dies, the
        sidecar cannot tell which item of the run killed it, and runs the rest of the chunk again
        carefully: the culprit is then named exactly (items before it in its run may run twice)."""
        apply = _star_calls if star else _calls
        count, state = len(items), self.state
        for first in range(resume, count, SUB_BATCH):
            if self.conn.forked:  # a task forked and its child returned here: the items are the worker's
                os._exit(0)
            last = min(first + SUB_BATCH, count)
            self.slot.write(offset=first, width=last - first)
            pending = iter(items[first:last])
            at = first  # the offset of the next item ``pending`` yields
            while at < last:
                values = run.batch.values
                mark = len(values)
                state.follow(run.start + at, pending, last - at)
                try:
                    values.extend(apply(fn, pending))  # stops at an exception, keeping what it had
                except BaseException as exc:
                    done = len(values) - mark
                    run.batch.offsets.extend(range(at, at + done))
                    run.batch.add_problem(at + done, ser.RAISED, ser.encode_exception(_raised(exc)))
                    at += done + 1
                    if stop_on_error:
                        return at
                else:
                    done = len(values) - mark
                    run.batch.offsets.extend(range(at, at + done))
                    if at + done < last:  # cannot happen with _calls; never let results shift
                        error = NbParallelError("the worker lost track of this item's outcome")
                        run.batch.add_problem(at + done, ser.FAILED, error)
                        done += 1
                    at += done
            run.flush_if_due(last)
        return count

    def send_result(self, chunk: wmsg.WorkerChunk, batch: Batch, upto: int, began: float, *, final: bool) -> None:
        if batch.values and hasattr(batch.values[0], "__await__"):  # a plain function returned awaitables
            from . import aio  # asyncio is loaded only by workers that run coroutines

            aio.settle(batch, self.state)
        header = wmsg.worker_result(job=chunk["job"], chunk=chunk["chunk"], upto=upto,
                                    n=len(batch.offsets) + len(batch.problems), failed=len(batch.problems),
                                    elapsed=time.perf_counter() - began, final=final)
        packed = batch.pickle()
        try:
            if packed.specs:
                header["oob"] = packed.specs
            self.conn.send(header, [packed.data], packed.fds)
        finally:
            packed.close()


def _calls(fn: Callable[..., Any], items: Iterator[Any]) -> Iterator[Any]:
    """``map(fn, items)`` as a generator: a StopIteration that ``fn`` raises then leaves as a
    RuntimeError (PEP 479) instead of ending the run, which ``map()`` would take for the end of its
    input, shifting every later result to the wrong index. ``_raised`` unwraps it."""
    for item in items:
        yield fn(item)


def _star_calls(fn: Callable[..., Any], items: Iterator[Any]) -> Iterator[Any]:
    """``itertools.starmap(fn, items)`` as a generator, for the same reason as ``_calls``."""
    for item in items:
        yield fn(*item)


_CALLS_CODES = (_calls.__code__, _star_calls.__code__)


def _raised(exc: BaseException) -> BaseException:
    """What the task raised: the StopIteration itself where ``_calls`` turned it into a RuntimeError.
    Told apart from a task's own RuntimeError by the tracebacks: the StopIteration left through
    ``_calls``'s frame, and the RuntimeError was made outside it (a task's own was raised inside)."""
    cause = exc.__cause__
    if type(exc) is RuntimeError and isinstance(cause, StopIteration) and cause.__traceback__ is not None:
        if cause.__traceback__.tb_frame.f_code in _CALLS_CODES:
            tb = exc.__traceback__
            while tb is not None:
                if tb.tb_frame.f_code in _CALLS_CODES:
                    return exc  # raised inside a task, which ran in _calls
                tb = tb.tb_next
            return cause
    return exc


def _die_with_parent(sidecar_pid: int) -> None:
    """Make sure this worker never outlives the sidecar."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # prctl on Linux only

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the kernel kills us when it dies
        except Exception:
            pass

    def watch() -> None:  # the portable fallback, and the race before prctl took effect
        while True:
            if os.getppid() != sidecar_pid:
                os._exit(70)
            time.sleep(WATCH_INTERVAL)

    if os.getppid() != sidecar_pid:
        os._exit(70)
    threading.Thread(target=watch, name="nbparallel-watch-sidecar", daemon=True).start()


def flush_std() -> None:
    """Flush this worker's streams, so what an item printed goes out before its result."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a task may have closed or replaced them
            pass


def main(argv: list[str]) -> None:
    fd, slot_fd, sidecar_pid = int(argv[0]), int(argv[1]), int(argv[2])
    preload: list[str] = json.loads(argv[3]) if len(argv) > 3 else []
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # cancellation arrives as a kill from the sidecar
    os.environ.pop(ROLE_ENV, None)  # what a task starts is a plain process
    _die_with_parent(sidecar_pid)
    config.in_worker = True  # nbparallel calls a task makes run here, serially (kernel/inline.py)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    slot = Slot.attach(slot_fd)
    os.close(slot_fd)
    conn = Connection(sock)
    worker = Worker(conn, slot)
    sys.stdout = TaggedOutput(conn, "stdout", worker.state)
    sys.stderr = TaggedOutput(conn, "stderr", worker.state)
    worker.streams = (sys.stdout, sys.stderr)
    # display() and matplotlib figures in tasks go to the caller's cell (worker/display.py)
    rich.install(lambda header, payload: conn.send(header, list(payload)), lambda: (worker.state.job, worker.state.index))
    os.register_at_fork(after_in_child=worker.forked)
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # sys.exit at import too: the worker goes on without that module
            print(f"nbparallel: preload of {name!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    conn.send(wmsg.worker_hello(pid=os.getpid()))
    worker.serve()
    flush_std()
    # Now, whatever a task left behind: a thread that never ends would keep a plain exit waiting.
    os._exit(0)
