"""The worker: started by the sidecar, runs chunks of items and sends back one outcome per item.

Run as ``python -m nbparallel.worker FD SLOT_FD SIDECAR_PID PRELOAD_JSON``. It talks to the sidecar
over the inherited socket ``FD``. Before running each item it writes ``(chunk, offset)`` into the
shared slot ``SLOT_FD``, so when the process dies the sidecar knows exactly which item killed it and
can rerun the rest of the chunk elsewhere. ``print`` and ``logging`` output is sent as frames tagged
with the item being run.

This module is the worker's loop: frames from the sidecar served, functions cached, a chunk set up
and its outcome sent. How a plain chunk's items run is running.py's, an async job's aio.py's; what
goes back to the sidecar, printed text included, sending.py's.
"""

from __future__ import annotations

import importlib
import json
import mmap
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import config
from ..config import ROLE_ENV
from ..payload import pickling as ser
from ..payload import salvage
from ..payload.outcomes import Batch
from ..wire import messages as msg
from ..wire import worker_messages as wmsg
from ..wire.frames import Frame, read_frame
from ..wire.slot import SIZE, Slot
from . import display as rich
from .running import ChunkRun, run_careful, run_fast, unpickle_failure
from .sending import Connection, TaggedOutput, WorkerState, flush_std, send_outcomes

WATCH_INTERVAL = 0.5  # seconds between checks that the sidecar is still alive


class Worker:
    """The worker's side of the conversation: jobs and functions it was sent, the chunk it runs."""

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
            error = unpickle_failure(stage, exc)
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
            upto = run_careful(run, fn, items, call, resume, skip, stop_on_error, bool(job.get("timeout")))
        else:
            upto = run_fast(run, fn, items, call == "star", resume, stop_on_error)
        self.state.clear()
        flush_std()
        rich.flush()  # figures the chunk's tasks left open go to the cell now, tagged by item
        self.slot.write(offset=count, width=1)  # past the last item: a death now is no item's fault
        self.send_result(header, run.batch, upto, began, final=True)
        self.slot.write(chunk=-1, offset=-1)

    def send_result(self, chunk: wmsg.WorkerChunk, batch: Batch, upto: int, began: float, *, final: bool) -> None:
        if batch.values and hasattr(batch.values[0], "__await__"):  # a plain function returned awaitables
            from . import aio  # asyncio is loaded only by workers that run coroutines

            aio.settle(batch, self.state)
        header = wmsg.worker_result(job=chunk["job"], chunk=chunk["chunk"], upto=upto,
                                    n=len(batch.offsets) + len(batch.problems), failed=len(batch.problems),
                                    elapsed=time.perf_counter() - began, final=final)
        send_outcomes(self.conn, header, batch)


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
