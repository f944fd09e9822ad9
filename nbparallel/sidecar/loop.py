"""The sidecar: a small runner process that owns the workers, the queue and the scheduling.

::

      kernel (runner.py)                 sidecar (this module)                 workers (worker/loop.py)
   +---------------------+  job, chunk  +------------------------------+  job   +-------------------+
   | map / imap / submit | -- cancel -> | jobs: queues of chunks       | chunk->| run items, send   |
   | reader thread       |  end, status | one selector loop, no thread |        | outcomes, output  |
   |                     | <- result -- | timeouts, memory watch       |<-result| slot: chunk, item |
   +---------------------+ crashed, out | reads a dead worker's slot   | output +-------------------+
                                        +------------------------------+

It runs as ``python -m nbparallel.sidecar FD KERNEL_PID``, started by the kernel in a session of its
own, so the stop button's SIGINT to the kernel's process group never reaches it; cancellation comes
as a ``cancel`` message. It imports only the standard library, psutil and our protocol modules, and
routes the pickled function, items and results as bytes without ever unpickling them.

It exits, killing every worker, when the kernel's socket closes or the kernel's PID goes away.
Every item ends in exactly one outcome: a ``result`` entry, or a ``crashed`` message naming it.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

from ..wire import messages as msg
from ..wire.channel import Channel
from ..wire.frames import Frame
from ..wire.frames import close_fds as close_all
from .jobs import Chunk, Job
from .policy import lost
from .supervision import WorkerSupervision
from .workers import WorkerProcess, return_free_memory, signal_group

TICK = 0.25  # seconds between housekeeping passes (kernel alive? memory samples)
SAMPLE_INTERVAL = 0.5  # seconds between memory samples of the workers
# While a job has a time or memory limit, look more often: a limit is only as sharp as this.
WATCH_TICK = 0.05
TRIM_AFTER = 16 * 2**20  # bytes routed between two returns of free memory to the system


class Sidecar(WorkerSupervision):
    """The sidecar's event loop, and the kernel's ops it takes (the layers below: see state.py)."""

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while self.running:
                watching = any(job.timeout or job.memory_limit or job.rate for job in self.jobs.values())
                for key, events in self.selector.select(WATCH_TICK if watching else TICK):
                    peer: Channel | WorkerProcess = key.data
                    if events & selectors.EVENT_WRITE:
                        (peer if isinstance(peer, Channel) else peer.channel).flush()
                    if events & selectors.EVENT_READ:
                        if isinstance(peer, Channel):
                            self.read_kernel()
                        else:
                            self.read_worker(peer)
                    if not self.running:
                        break
                self.housekeeping()
                self.schedule()
                self.update_interest()
        finally:
            self.stop_all()

    def update_interest(self) -> None:
        peers: list[Channel | WorkerProcess] = [self.kernel, *self.workers.values()]
        for peer in peers:
            channel = peer if isinstance(peer, Channel) else peer.channel
            if channel.closed:
                continue
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if channel.wants_write else 0)
            if self.selector.get_key(channel.sock).events != events:
                self.selector.modify(channel.sock, events, peer)

    def housekeeping(self) -> None:
        if os.getppid() != self.kernel_pid:  # the kernel died (even by SIGKILL): so do we
            self.running = False
            return
        now = time.monotonic()
        memory_limited = any(job.memory_limit for job in self.jobs.values())
        # Nothing to sample before the first worker or job (the first pass, at start): psutil is then
        # imported while the workers start, not before the first one is spawned.
        interval = WATCH_TICK if memory_limited else SAMPLE_INTERVAL
        if (self.workers or self.jobs) and now - self.last_sample >= interval:
            self.last_sample = now
            self.sample_memory()
        self.enforce_limits(now)
        for worker in self.workers.values():  # stopped, and still there past the grace: SIGKILL
            if worker.stop_by is not None and now >= worker.stop_by:
                signal_group(worker.pid, signal.SIGKILL)
        self.stopping.due(now)
        self.resize()
        if self.routed_since_trim > TRIM_AFTER and not any(job.queue for job in self.jobs.values()):
            # glibc keeps freed payload memory around; hand it back so the sidecar stays small.
            self.routed_since_trim = 0
            return_free_memory()

    # -- the kernel side --------------------------------------------------------------------

    def read_kernel(self) -> None:
        try:
            frames = list(self.kernel.receive())
        except EOFError:
            self.running = False
            return
        for frame in frames:
            handler = KERNEL_OPS.get(frame.op)
            if handler is None:  # only the kernel's ops: never a handler of the sidecar's own
                close_all(frame.fds)
                self.kernel.send(msg.unknown_op(frame.op, "sidecar"))
                continue
            try:
                handler(self, frame)
            except Exception:  # a bug here must be reported, not take the pool down

                self.kernel.send(msg.error(message=traceback.format_exc()))

    def on_hello(self, frame: Frame) -> None:
        self.kernel.send(msg.hello_reply(pid=os.getpid()))

    def on_configure(self, frame: Frame) -> None:
        header = msg.view(frame, msg.Configure)
        self.startup.started()  # new settings: try starting workers again at once
        if "workers" in header:
            self.size = max(1, int(header["workers"]))
        if "max_tasks_per_worker" in header:
            self.max_tasks = int(header["max_tasks_per_worker"] or 0)
        if "env" in header:
            self.env = {**self.env, **header["env"]}
        if "preload" in header and list(header["preload"]) != self.preload:
            self.preload = list(header["preload"])
            for worker in list(self.workers.values()):  # new workers import the new preload list
                self.retire(worker)
        self.resize()

    def on_job(self, frame: Frame) -> None:
        header = msg.view(frame, msg.Job)
        job = self.jobs[header["job"]] = Job(header, frame.payload, frame.fds)
        if job.rate:
            job.pace_next = self.paces.get((header["key"], job.rate), 0.0)

    def on_chunk(self, frame: Frame) -> None:
        self.routed_since_trim += len(frame.payload)
        header = msg.view(frame, msg.Chunk)
        job = self.jobs.get(header["job"])
        chunk = Chunk(header["job"], header["chunk"], header["start"], header["count"],
                      frame.payload, frame.fds, header.get("oob"))
        if job is None:
            chunk.close()
        else:
            job.queue.append(chunk)
            self.fail_waiting()  # at once, if no worker can start
            if lost(job):  # nor run this job's items
                self.fail_queue(job)

    def on_cancel(self, frame: Frame) -> None:
        job_id = msg.view(frame, msg.Cancel)["job"]
        if job_id in self.jobs:
            for worker in list(self.workers.values()):
                if job_id in worker.jobs_running():
                    self.requeue_others(worker, job_id)
                    worker.kill()
        self.drop_job(job_id)
        self.kernel.send(msg.cancelled(job=job_id))

    def on_end(self, frame: Frame) -> None:
        job_id = msg.view(frame, msg.End)["job"]
        self.drop_job(job_id)
        for worker in self.workers.values():
            if job_id in worker.jobs:
                worker.jobs.discard(job_id)
                worker.channel.send(msg.end(job=job_id))

    def on_status(self, frame: Frame) -> None:
        import psutil  # costs the sidecar ~2 MB: only once a status is asked for

        rss = psutil.Process().memory_info().rss
        self.kernel.send(
            msg.status(
                req=msg.view(frame, msg.StatusRequest).get("req"),
                pid=os.getpid(),
                rss=rss,
                rss_peak=max(self.rss_peak, rss),
                size=self.size,
                workers=[w.describe() for w in self.workers.values() if not w.retiring],
                queued=sum(len(job.queue) for job in self.jobs.values()),
                jobs=len(self.jobs),
                tmpdir=self.tmpdir,
            )
        )

    def on_shutdown(self, frame: Frame) -> None:
        self.running = False


#: The kernel's ops and their handlers: the kernel can address these and nothing else.
KERNEL_OPS: dict[str, Callable[[Sidecar, Frame], None]] = {
    "hello": Sidecar.on_hello,
    "configure": Sidecar.on_configure,
    "job": Sidecar.on_job,
    "chunk": Sidecar.on_chunk,
    "cancel": Sidecar.on_cancel,
    "end": Sidecar.on_end,
    "status": Sidecar.on_status,
    "shutdown": Sidecar.on_shutdown,
}


def main(argv: list[str]) -> None:
    fd, kernel_pid = int(argv[0]), int(argv[1])
    # Belt and braces: we run in our own session, but a stray SIGINT must never stop the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Sidecar(socket.socket(fileno=fd), kernel_pid).run()
