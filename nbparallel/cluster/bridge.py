"""The Dask bridge: the runner that stands in for the sidecar when a Dask cluster is configured.

::

      kernel (runner.py)              bridge (this module)                    Dask cluster
   ┌────────────────────┐  job,    ┌─────────────────────────────┐ submit  ┌───────────┐  ┌──────────┐
   │ map / imap / submit│ chunk ─▶ │ one Dask Client, its threads│ ──────▶ │ scheduler │─▶│ workers: │
   │ reader thread      │ ◀ result,│ a chunk = one Dask task     │ ◀────── │           │  │ dask_task│
   └────────────────────┘  output, │ routes bytes, never unpickles│ results └───────────┘  │ .run_chunk│
                           crashed └─────────────────────────────┘                        └──────────┘

``configure(cluster=ADDRESS)`` (or ``"local"``) makes the kernel start this process instead of the
sidecar: ``python -m nbparallel.cluster FD KERNEL_PID ADDRESS [OPTIONS_JSON]``. It speaks the
sidecar's protocol, so map, imap, submit, the magics and the widget work unchanged. The Dask client,
its event loop and threads live here, not in the kernel: the kernel never imports Dask, and a slow
scheduler or a lost connection cannot wedge the notebook.

A ``chunk`` becomes one Dask task (``dask_task.run_chunk``); large functions and items are scattered
once. Outcomes go back as ``result`` frames, the printed lines before them as ``output`` frames.
Dask reruns a task whose worker died (``allowed-failures``); when it gives up, the chunk's items fail
with ``WorkerCrashed``. ``cancel`` cancels the tasks; a running one stops at its next item. The bridge
exits with the kernel, closing a LocalCluster it started. docs/protocol.md, "The Dask bridge", has
the details.

``Bridge`` is the kernel's side: the socket, the outbox and its writer thread, the ops the kernel
sends, the status thread, watching the kernel, stopping. The Dask side, the jobs and their tasks, is
a ``DaskTasks`` (submit.py) that the bridge holds as ``self.tasks`` once its client is connected,
and hands the kernel's ``job``, ``chunk``, ``cancel`` and ``end``; it sends outcomes back through
``Bridge.send``.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import signal
import socket
import sys
import threading
import time
import traceback

import psutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import frames
from .submit import DaskTasks
from .task import Preload
from ..errors import ProtocolError
from ..wire import messages as msg
from ..wire.frames import PROTOCOL_VERSION, Buffer, Frame, close_fds, read_frame, send_frame

WATCH_INTERVAL = 0.5  # seconds between checks that the kernel is still alive
STOP_WITHIN = 1.5  # seconds the bridge gives Dask to close before it exits anyway
# Chunks in flight per cluster thread that the kernel should keep (it keeps 4 per local worker): a
# Dask task's round trip takes milliseconds, so more must be under way to keep the workers busy.
WINDOW = 16
SUBMIT_BATCH = 256  # chunks submitted to Dask at most at once


class Bridge:
    """The kernel's side of the bridge, its threads and its life; the Dask side is ``self.tasks``, a
    ``DaskTasks``."""

    def __init__(self, sock: socket.socket, kernel_pid: int, address: str, options: dict[str, Any]) -> None:
        self.sock = sock
        self.kernel_pid = kernel_pid
        self.address = address
        self.options = options
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # frames for the kernel, in order
        self.writer = threading.Thread(target=self.write_out, name="nbparallel-bridge-writer", daemon=True)
        self.writer.start()
        self.status_requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.preload: list[str] = []
        self.rss_peak = 0
        self.token = secrets.token_hex(4)  # keeps our task keys apart from other clients' on a shared scheduler
        # The jobs and their Dask tasks: made in start() with the client, before ``client`` is set,
        # so that whenever ``client`` is set, ``tasks`` is too.
        self.tasks: DaskTasks
        self.client: Any = None
        self.cluster: Any = None
        self.stop_lock = threading.Lock()
        self.stopping = False

    # -- life ----------------------------------------------------------------------------------

    def start(self) -> bool:
        """Answer the kernel's hello once the cluster is reachable (or say why it is not)."""
        hello = read_frame(self.sock)
        version = msg.view(hello, msg.Hello).get("version")
        if hello.op != "hello" or version != PROTOCOL_VERSION:
            raise ProtocolError(f"the kernel began with {hello.op!r}, protocol version {version}")
        try:
            client, cluster = frames.connect(self.address, int(self.options.get("workers") or 1),
                                             float(self.options.get("connect_timeout") or frames.CONNECT_TIMEOUT))
        except Exception as exc:
            where = "start a local Dask cluster" if self.address == "local" else f"reach the Dask scheduler at {self.address}"
            self.send(msg.error(message=f"could not {where}: {type(exc).__name__}: {exc}", fatal=True))
            return False
        self.tasks = DaskTasks(client, self.send, self.token)
        self.client, self.cluster = client, cluster
        for target, name in ((self.tasks.collect, "collector"), (self.answer_status, "status"),
                             (self.watch_kernel, "watch-kernel")):
            threading.Thread(target=target, name=f"nbparallel-bridge-{name}", daemon=True).start()
        info = self.client.scheduler_info()
        self.send(msg.hello_reply(pid=os.getpid(), runner="dask", window=WINDOW,
                                  cluster=info.get("address") or self.address, dashboard=self.dashboard(),
                                  workers=sum(int(w.get("nthreads") or 0) for w in info.get("workers", {}).values())))
        return True

    def dashboard(self) -> str | None:
        try:
            return str(self.client.dashboard_link) if frames.has_dashboard() or self.cluster is None else None
        except Exception:
            return None

    def serve(self) -> None:
        queued = 0  # chunks received since the last submission to Dask
        while True:
            try:
                frame = read_frame(self.sock)
            except (EOFError, OSError, ProtocolError):
                return  # the kernel has gone
            handler = KERNEL_OPS.get(frame.op)
            try:
                if handler is None:  # only the kernel's ops: never a method of the bridge's own
                    self.send(msg.unknown_op(frame.op, "Dask bridge"))
                    continue
                handler(self, frame)
                queued += frame.op == "chunk"
                # Chunks that arrive together go to the scheduler together: one graph update for
                # many tasks costs Dask far less than one each.
                if queued and (queued >= SUBMIT_BATCH or not self.kernel_has_more()):
                    queued = 0
                    self.tasks.submit_all()
            except Exception:  # a bug here is reported, and the bridge goes on
                self.send(msg.error(message=traceback.format_exc()))
            finally:
                close_fds(frame.fds)  # a handler that kept them took them off the frame
            if frame.op == "shutdown":
                return

    def kernel_has_more(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def watch_kernel(self) -> None:
        while True:
            if os.getppid() != self.kernel_pid:  # the kernel died, even by SIGKILL
                self.stop()
            if self.client.status in ("closing", "closed"):  # Dask gave up reconnecting to the scheduler
                self.send(msg.error(message=f"lost the Dask scheduler at {self.address}; the next call connects again",
                                    fatal=True))
                self.stop()
            time.sleep(WATCH_INTERVAL)

    def stop(self) -> None:
        """Cancel our tasks, close the client (and a LocalCluster we started), and exit, within
        STOP_WITHIN seconds whatever Dask does."""
        with self.stop_lock:
            if self.stopping:
                return
            self.stopping = True
        threading.Timer(STOP_WITHIN, os._exit, (0,)).start()
        self.outbox.put(None)  # what is queued still goes out (a fatal error's reason)
        self.writer.join(STOP_WITHIN / 3)
        try:
            if self.cluster is not None:  # our own LocalCluster: its workers go with it
                self.cluster.close(timeout=STOP_WITHIN / 2)
            elif self.client is not None:  # a shared cluster: stop our tasks; when our connection
                # closes, the scheduler forgets the rest (Client.close would only wait longer)
                self.tasks.cancel_all()
        except BaseException:
            pass
        finally:
            sys.stderr.flush()
            os._exit(0)

    def send(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = (),
             *, owned: bool = False) -> None:
        """Queue a frame for the kernel (``owned``: close ``fds`` once sent). No thread of ours ever
        blocks on the socket: the kernel's reader may itself be sending to us (the joblib backend
        submits from it), and two blocked writers would wait for each other forever."""
        self.outbox.put((header, buffers, fds, owned))

    def write_out(self) -> None:
        for header, buffers, fds, owned in iter(self.outbox.get, None):
            try:
                send_frame(self.sock, header, buffers, fds)
            except OSError:  # the kernel is gone; the reading side stops us
                pass
            finally:
                if owned:
                    close_fds(fds)

    # -- from the kernel ---------------------------------------------------------------------------

    def on_configure(self, frame: Frame) -> None:
        # A cluster keeps its own environment and worker lifetimes: ``env``, ``limit_threads`` and
        # ``max_tasks_per_worker`` apply to local workers only (see README, "Beyond one machine").
        header = msg.view(frame, msg.Configure)
        workers = header.get("workers")
        if self.cluster is not None and workers and len(self.cluster.workers) != int(workers):
            self.cluster.scale(int(workers))
        preload = list(header.get("preload") or [])
        if preload != self.preload:

            self.preload = preload
            self.client.register_plugin(Preload(preload), name=Preload.name)

    def on_job(self, frame: Frame) -> None:
        self.tasks.add_job(msg.view(frame, msg.Job), frames.payload_from(frame))

    def on_chunk(self, frame: Frame) -> None:
        # serve() submits it, with the others that came along
        self.tasks.add_chunk(msg.view(frame, msg.Chunk), frames.payload_from(frame))

    def on_cancel(self, frame: Frame) -> None:
        self.tasks.cancel(msg.view(frame, msg.Cancel)["job"])

    def on_end(self, frame: Frame) -> None:
        self.tasks.end(msg.view(frame, msg.End)["job"])

    def on_status(self, frame: Frame) -> None:
        self.status_requests.put(msg.view(frame, msg.StatusRequest).get("req"))

    def on_hello(self, frame: Frame) -> None:
        raise ProtocolError("a second hello")

    def on_shutdown(self, frame: Frame) -> None:
        pass  # serve() returns after this frame and main() stops us

    # -- status ------------------------------------------------------------------------------------

    def status_reply(self, req: int | None) -> msg.Status:
        """The answer to ``status``; a worker's pid is asked of the worker once, when first seen."""
        info = self.client.scheduler_info()
        processing = self.client.processing()
        workers, queued, jobs = self.tasks.describe(info, processing)
        rss = psutil.Process().memory_info().rss
        self.rss_peak = max(self.rss_peak, rss)
        return msg.status(req=req, pid=os.getpid(), rss=rss, rss_peak=self.rss_peak, runner="dask",
                          size=sum(int(w.get("threads") or 0) for w in workers), workers=workers, queued=queued,
                          jobs=jobs, cluster=info.get("address") or self.address, dashboard=self.dashboard(),
                          scattered=self.tasks.scattered, bytes_scattered=self.tasks.bytes_scattered)

    def answer_status(self) -> None:
        # On a thread of its own: the scheduler's answer takes a round trip, and a cancel must not
        # wait behind it.
        for req in iter(self.status_requests.get, None):
            try:
                reply = self.status_reply(req)
            except Exception as exc:
                reply = msg.status(req=req, workers=[], problem=f"{type(exc).__name__}: {exc}")
            self.send(reply)


#: The kernel's ops and their handlers: the kernel can address these and nothing else.
KERNEL_OPS: dict[str, Callable[[Bridge, Frame], None]] = {
    "hello": Bridge.on_hello,
    "configure": Bridge.on_configure,
    "job": Bridge.on_job,
    "chunk": Bridge.on_chunk,
    "cancel": Bridge.on_cancel,
    "end": Bridge.on_end,
    "status": Bridge.on_status,
    "shutdown": Bridge.on_shutdown,
}


def main(argv: list[str]) -> None:
    fd, kernel_pid, address = int(argv[0]), int(argv[1]), argv[2]
    options: dict[str, Any] = json.loads(argv[3]) if len(argv) > 3 else {}
    # We run in our own session, but a stray SIGINT must never stop the bridge: cancels are messages.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    bridge = Bridge(sock, kernel_pid, address, options)
    try:
        if bridge.start():
            bridge.serve()
    finally:
        bridge.stop()
