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
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from .. import config
from ..errors import ProtocolError
from ..wire import messages as msg
from ..wire import worker_messages as wmsg
from ..wire import strays
from ..wire.channel import Channel
from .workers import Stopping, WorkerProcess, return_free_memory, sample_memory, signal_group
from ..wire.frames import Frame
from ..wire.frames import close_fds as close_all
from .health import Startup, describe_exit
from .jobs import Chunk, Job
from .policy import PREFETCH, blame, lost, functions_to_forget, limit_breached, may_prefetch, next_chunk_for, pace

TICK = 0.25  # seconds between housekeeping passes (kernel alive? memory samples)
SAMPLE_INTERVAL = 0.5  # seconds between memory samples of the workers
# While a job has a time or memory limit, look more often: a limit is only as sharp as this.
WATCH_TICK = 0.05
TRIM_AFTER = 16 * 2**20  # bytes routed between two returns of free memory to the system
PACES_KEPT = 64  # paced functions whose next free start time outlives their job (see on_job)


class Sidecar:
    def __init__(self, kernel_sock: socket.socket, kernel_pid: int) -> None:
        self.kernel = Channel(kernel_sock)
        self.kernel_pid = kernel_pid
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.kernel.sock, selectors.EVENT_READ, self.kernel)
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.jobs: dict[int, Job] = {}
        self.size = 1
        self.max_tasks = 0  # replace a worker after this many items (0: never)
        self.routed_since_trim = 0
        self.preload: list[str] = []
        self.env = dict(os.environ)
        self.running = True
        # Where memfd exists we write no file at all; elsewhere our files live in a directory of
        # mode 0700 that goes when the sidecar does.
        self.tmpdir = None if hasattr(os, "memfd_create") else tempfile.mkdtemp(prefix="nbparallel-")
        self.last_sample = 0.0
        self.rss_peak = 0
        # (function key, rate) -> the next free start time of the last job that ran it: a call run
        # again right away continues its pace rather than bursting past a quota.
        self.paces: dict[tuple[str, float], float] = {}
        self.startup = Startup()  # workers dying before they are ready: paced, then the pool is broken
        # The mark of this pool's processes (strays.py): the kernel's, or our own when started by hand.
        self.pool = os.environ.get(strays.POOL_ENV) or strays.pool_token(kernel_pid)
        self.marks: dict[int, str] = {}  # worker pid -> the mark its processes carry
        self.stopping = Stopping()  # stopped workers' process groups and marks, SIGKILLed after a grace
        self.spawned = 0

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
        if now - self.last_sample >= (WATCH_TICK if memory_limited else SAMPLE_INTERVAL):
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

    def enforce_limits(self, now: float) -> None:
        """Kill a worker whose item ran past the job's timeout or whose memory passed its limit."""
        for worker in self.workers.values():
            if worker.assigned and worker.kill_reason is None:
                worker.kill_reason = limit_breached(worker, self.jobs.get(worker.assigned[0].job), now)
                if worker.kill_reason is not None:  # its exit is handled like a crash, with the reason attached
                    worker.kill(at_once=worker.kill_reason.reason == "memory")  # memory: no grace

    def sample_memory(self) -> None:
        self.rss_peak = max(self.rss_peak, sample_memory(self.workers.values()))

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

    def drop_job(self, job_id: int) -> Job | None:
        """Forget a job and release the shared memory it held (workers keep their own mappings)."""
        job = self.jobs.pop(job_id, None)
        if job is not None and job.rate:
            self.keep_pace(job)
        if job is not None:
            for chunk in job.queue:
                chunk.close()
            job.queue.clear()
            close_all(job.fds)
            job.fds = []
        return job

    def keep_pace(self, job: Job) -> None:
        now = time.monotonic()
        if len(self.paces) >= PACES_KEPT:
            self.paces = {key: at for key, at in self.paces.items() if at > now}
        if job.pace_next > now:
            self.paces[(job.header["key"], job.rate)] = job.pace_next

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

    # -- the workers ------------------------------------------------------------------------

    def target_size(self) -> int:
        asked = [job.limit for job in self.jobs.values() if job.limit]
        return max([self.size, *asked])

    def resize(self) -> None:
        for worker in list(self.workers.values()):
            if not worker.retiring and not worker.assigned and (
                    worker.worn_out or (self.max_tasks and worker.tasks_done >= self.max_tasks)):
                self.retire(worker)
        alive = [w for w in self.workers.values() if not w.retiring]
        for _ in range(self.target_size() - len(alive)):
            if not self.startup.may_spawn(time.monotonic()):  # workers die as they start: pause
                break
            self.spawn()
        extra = len(alive) - self.target_size()
        for worker in alive:
            if extra <= 0:
                break
            if not worker.assigned:
                self.retire(worker)
                extra -= 1

    def spawn(self) -> None:
        self.spawned += 1
        mark = strays.worker_token(self.pool, self.spawned)
        try:
            worker = WorkerProcess(self.preload, {**self.env, strays.POOL_ENV: mark}, self.tmpdir)
        except OSError as exc:  # a limit on processes, memory or descriptors
            self.startup.failed(f"it could not be started: {type(exc).__name__}: {exc}", self.preload,
                                time.monotonic())
            self.fail_waiting()
            return
        self.workers[worker.pid] = worker
        self.marks[worker.pid] = mark
        self.selector.register(worker.channel.sock, selectors.EVENT_READ, worker)

    def fail_waiting(self) -> None:
        """While no worker can start (``startup.cause``) and none is ready, fail the waiting work."""
        cause = self.startup.cause
        if cause is None or any(w.ready and not w.retiring for w in self.workers.values()):
            return
        for job in self.jobs.values():
            while job.queue:
                chunk = job.queue.popleft()
                indices = [chunk.start + offset for offset in chunk.remaining()]
                chunk.close()
                if indices:
                    self.kernel.send(msg.crashed(job=chunk.job, chunk=chunk.id, indices=indices, pid=0,
                                                 exitcode=None, memory=None, attempts=1, cause=cause))

    def retire(self, worker: WorkerProcess) -> None:
        """Ask an idle worker to exit; a busy one is killed and its chunks go back to the queue."""
        if worker.assigned:
            self.requeue_others(worker, None)
            worker.kill()
        else:
            worker.retiring = True
            worker.channel.send(wmsg.exit())

    def requeue_others(self, worker: WorkerProcess, except_job: int | None) -> None:
        """Put the worker's chunks back at the front of their queues (dropping ``except_job``'s)."""
        for chunk in reversed(worker.assigned):
            job = self.jobs.get(chunk.job)
            if job is not None and chunk.job != except_job:
                job.queue.appendleft(chunk)
            else:
                chunk.close()
        worker.assigned.clear()

    def read_worker(self, worker: WorkerProcess) -> None:
        try:
            frames = list(worker.channel.receive())
        except EOFError:
            frames = None
        except ProtocolError:  # a task wrote into the worker's socket: the worker is lost, not the pool
            worker.kill()
            frames = None
        for frame in frames or ():
            if frame.op == "result":
                self.on_worker_result(worker, frame)
            elif frame.op == "output":
                line = msg.view(frame, wmsg.WorkerOutput)
                if line["job"] in self.jobs:
                    self.kernel.send(msg.output(job=line["job"], index=line["index"], stream=line["stream"],
                                                text=line["text"], pid=worker.pid))
            elif frame.op == "display":  # a task's display(): its bundle is passed on as it is
                shown = msg.view(frame, wmsg.WorkerDisplay)
                if shown["job"] in self.jobs:
                    header = msg.display(job=shown["job"], index=shown["index"], pid=worker.pid)
                    if "display_id" in shown:
                        header["display_id"] = shown["display_id"]
                        header["update"] = bool(shown.get("update"))
                    self.kernel.send(header, frame.buffers)
            elif frame.op == "hello":
                worker.ready = True
                self.startup.started()
                self.sample_memory()  # so status() shows its memory from the start
        if frames is None:
            self.on_worker_exit(worker)

    def on_worker_result(self, worker: WorkerProcess, frame: Frame) -> None:
        done = msg.view(frame, wmsg.WorkerResult)
        # The head's, but an async job's chunks run side by side and may finish in any order.
        chunk = next((c for c in worker.assigned if c.id == done["chunk"]), None)
        if chunk is None:
            close_all(frame.fds)
            return  # a job cancelled meanwhile
        chunk.resume = done["upto"]
        if "settled" in done:  # an async chunk's outcomes past ``upto``: never run them again
            chunk.skip.extend(done["settled"])
        job = self.jobs.get(chunk.job)
        if job is not None:
            job.deaths_outside = 0  # its items do run
        if done["final"]:
            worker.assigned.remove(chunk)
            if done.get("requeue") and job is not None and chunk.remaining():
                job.queue.appendleft(chunk)  # they missed their start times (rate=): new ones come with it
            else:
                chunk.close()
            worker.tasks_done += chunk.count
            if job is not None and job.header.get("max_tasks"):  # an Executor's max_tasks_per_child
                done_here = worker.group_tasks[job.group] = worker.group_tasks.get(job.group, 0) + chunk.count
                worker.worn_out = worker.worn_out or done_here >= int(job.header["max_tasks"])
            worker.head_since = time.monotonic()
            if job is not None:
                old, new = job.chunk_seconds, float(done["elapsed"])
                job.chunk_seconds = new if old is None else 0.7 * old + 0.3 * new
        self.routed_since_trim += len(frame.payload)
        if job is not None:
            header = msg.result(job=done["job"], chunk=done["chunk"], start=chunk.start, upto=done["upto"],
                                n=done["n"], failed=done["failed"], elapsed=done["elapsed"], final=done["final"],
                                pid=worker.pid)
            if "running" in done:
                header["running"] = done["running"]
            if "oob" in done:
                header["oob"] = done["oob"]
            self.kernel.send(header, frame.buffers, frame.fds, close_fds=True)
        else:
            close_all(frame.fds)

    def on_worker_exit(self, worker: WorkerProcess) -> None:
        self.selector.unregister(worker.channel.sock)
        slot = worker.slot.read()
        exitcode = worker.reap()
        del self.workers[worker.pid]
        # What its tasks started goes with it: SIGTERM now, SIGKILL after the grace (workers.py).
        self.stopping.add(worker.pid, self.marks.pop(worker.pid, ""), worker.stop_by)
        if not worker.ready and not worker.retiring:  # it died while starting
            self.startup.failed(describe_exit(exitcode), self.preload, time.monotonic())
            self.fail_waiting()
        running = worker.assigned.popleft() if worker.assigned else None
        self.requeue_others(worker, None)
        if running is None or running.job not in self.jobs:
            if running is not None:
                running.close()
            return
        culprits, attempts = blame(running, self.jobs[running.job], slot.chunk, slot.offset, slot.width)
        if culprits:
            breach = worker.kill_reason
            header = msg.crashed(
                job=running.job,
                chunk=running.id,
                indices=[running.start + off for off in culprits],
                pid=worker.pid,
                exitcode=exitcode,
                memory=breach.memory if breach is not None and breach.memory is not None else (worker.rss_peak or None),
                attempts=attempts,
            )
            if breach is not None:
                header["reason"], header["limit"] = breach.reason, breach.limit
            self.kernel.send(header)
        if running.remaining():  # the items after it (and those done but unsent) run again elsewhere
            self.jobs[running.job].queue.appendleft(running)
        else:
            running.close()
        self.jobs[running.job].last_death = (worker.pid, exitcode)
        if lost(self.jobs[running.job]):
            self.fail_queue(self.jobs[running.job])

    def fail_queue(self, job: Job) -> None:
        """Fail every item of ``job`` still waiting for a worker: ``crashed``, as its last worker died."""
        pid, exitcode = job.last_death
        while job.queue:
            chunk = job.queue.popleft()
            indices = [chunk.start + offset for offset in chunk.remaining()]
            chunk.close()
            if indices:
                self.kernel.send(msg.crashed(job=job.id, chunk=chunk.id, indices=indices, pid=pid, exitcode=exitcode,
                                             memory=None, attempts=max(1, chunk.deaths)))

    def schedule(self) -> None:
        if not any(job.queue for job in self.jobs.values()):
            return
        ready = [w for w in self.workers.values() if w.ready and not w.retiring and not w.worn_out]
        for depth in range(PREFETCH):
            for worker in ready:
                if len(worker.assigned) != depth:
                    continue
                if depth and not may_prefetch(worker, self.jobs, time.monotonic()):
                    continue
                chunk = next_chunk_for(worker, self.jobs, self.workers.values(), time.monotonic())
                if chunk is None:
                    continue
                self.send_chunk(worker, chunk)

    def send_chunk(self, worker: WorkerProcess, chunk: Chunk) -> None:
        job = self.jobs[chunk.job]
        if chunk.job not in worker.jobs:
            key = job.header["key"]
            if key in worker.keys:
                worker.keys.move_to_end(key)
                worker.channel.send(job.header)  # the kernel's job header, forwarded as it came
            else:
                worker.channel.send(job.header, [job.function], job.fds)
                worker.keys[key] = None
                for old in functions_to_forget(worker, self.jobs):
                    del worker.keys[old]
                    worker.channel.send(wmsg.forget(key=old))
            worker.jobs.add(chunk.job)
        header = wmsg.worker_chunk(job=chunk.job, chunk=chunk.id, start=chunk.start, count=chunk.count)
        if chunk.resume:
            header["resume"] = chunk.resume
        if chunk.skip:
            header["skip"] = chunk.skip
        if chunk.careful:
            header["careful"] = True
        if job.rate:
            header["pace"] = pace(job, len(chunk.remaining()), time.monotonic())
        if chunk.oob:
            header["oob"] = chunk.oob
        worker.channel.send(header, [chunk.payload], chunk.fds)
        if not worker.assigned:
            worker.head_since = time.monotonic()
        worker.assigned.append(chunk)
        if job.header.get("report_started"):  # a submitted task: its future turns RUNNING
            self.kernel.send(msg.started(job=chunk.job, chunk=chunk.id, pid=worker.pid))

    def stop_all(self) -> None:
        for job_id in list(self.jobs):
            self.drop_job(job_id)
        for worker in self.workers.values():
            worker.kill()
        deadline = time.monotonic() + config.KILL_GRACE
        for worker in self.workers.values():
            try:
                worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
            self.stopping.add(worker.pid, self.marks.get(worker.pid, ""), deadline)
        # And whatever their tasks started, in any process group or session: given the rest of the
        # grace to clean up (a resource tracker), then killed.
        self.stopping.settle(self.pool, deadline)
        self.kernel.close()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


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
