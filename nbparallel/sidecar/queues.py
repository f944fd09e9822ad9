"""The jobs' queues of chunks: given out to workers, put back when a worker goes, failed when no
worker can run them, dropped with their job (its shared memory released).

Which chunk goes to which worker, and when, is policy.py's to say (pure); this sends it.
"""

from __future__ import annotations

import time

from ..wire import messages as msg
from ..wire import worker_messages as wmsg
from ..wire.frames import close_fds as close_all
from .jobs import Chunk, Job
from .policy import PREFETCH, functions_to_forget, may_prefetch, next_chunk_for, pace
from .state import SidecarState
from .workers import WorkerProcess

PACES_KEPT = 64  # paced functions whose next free start time outlives their job (see Sidecar.on_job)


class JobQueues(SidecarState):
    """The jobs' chunks, from their queue to a worker and back (the state: see state.py)."""

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

    def requeue_others(self, worker: WorkerProcess, except_job: int | None) -> None:
        """Put the worker's chunks back at the front of their queues (dropping ``except_job``'s)."""
        for chunk in reversed(worker.assigned):
            job = self.jobs.get(chunk.job)
            if job is not None and chunk.job != except_job:
                job.queue.appendleft(chunk)
            else:
                chunk.close()
        worker.assigned.clear()

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
