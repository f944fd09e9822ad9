"""The Dask side of the bridge: chunks submitted as Dask tasks, finished tasks handed to the kernel.

``DaskTasks(client, send, token)`` owns what the bridge knows of its jobs and their tasks: the jobs,
our tasks by Dask key, the tasks running per limit group, the queue of finished futures, the items
run per worker, what was scattered, and the locks that guard them. ``Bridge`` (bridge.py) holds one
(``bridge.tasks``), built once the client is connected, and hands it the kernel's ``job``, ``chunk``,
``cancel`` and ``end``; what goes back to the kernel leaves through ``send``, the bridge's outbox,
which never blocks.

Three threads meet here: the bridge's main thread (submitting, cancelling), Dask's callback thread
(a task finished: its future goes on ``done``) and the collector (``collect``, on a thread the
bridge starts: fetching results and sending them on); the bridge's status thread reads the books
too. ``lock`` guards the books; ``out_lock`` makes deciding to send a job's outcomes and queueing
them one step, so none can follow the job's ``cancelled``.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from . import frames
from .frames import Chunk, Job
from ..errors import NbParallelError
from .status import describe_workers
from .task import run_chunk
from ..wire import messages as msg
from ..wire.frames import Buffer, close_fds

class Send(Protocol):
    """Queues a frame for the kernel (``owned``: close ``fds`` once sent); it never blocks (see
    ``Bridge.send``)."""

    def __call__(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = (),
                 *, owned: bool = False) -> None: ...


class DaskTasks:
    """Our jobs and their Dask tasks, on one client; outcomes go to the kernel through ``send``."""

    def __init__(self, client: Any, send: Send, token: str) -> None:
        self.client = client  # distributed.Client
        self.send = send
        self.token = token  # keeps our task keys apart from other clients' on a shared scheduler
        self.lock = threading.RLock()  # the jobs and their tasks
        # Held while deciding to send a job's outcomes and queueing them, and while marking a job
        # cancelled and queueing ``cancelled``: so no outcome follows ``cancelled``, as from the sidecar.
        self.out_lock = threading.Lock()
        self.jobs: dict[int, Job] = {}
        self.by_key: dict[str, Chunk] = {}  # our tasks on the cluster, by Dask key
        self.in_group: Counter[Any] = Counter()  # tasks submitted and not finished, per limit group
        self.done: queue.SimpleQueue[Any] = queue.SimpleQueue()  # finished Dask futures, for the collector
        self.tasks_done: Counter[str] = Counter()  # items run, per Dask worker address
        self.pids: dict[str, int] = {}  # Dask worker address -> its process id
        self.scattered = 0  # payloads scattered to the cluster (the status reply says how many)
        self.bytes_scattered = 0

    # -- from the kernel ---------------------------------------------------------------------------

    def add_job(self, header: msg.Job, function: Any) -> None:
        """A new call (``job``); a large function is scattered to every worker once."""
        if frames.size_of(function) > frames.SCATTER_ABOVE:
            function = self.scatter(function, broadcast=True)
        with self.lock:
            self.jobs[header["job"]] = Job(header, function, frames.unsupported(header))

    def add_chunk(self, header: msg.Chunk, items: Any) -> None:
        """A chunk of a job: it waits until ``submit_all`` (the bridge submits those that came along
        together at once)."""
        with self.lock:
            job = self.jobs.get(header["job"])
            if job is None or job.cancelled:
                return
            chunk = Chunk(header["job"], header["chunk"], header["start"], header["count"], items)
            if job.refusal is not None:  # a limit Dask cannot keep: say so rather than ignore it
                self.send_failure(chunk, NbParallelError(job.refusal), job)
                return
            job.waiting.append(chunk)

    def cancel(self, job_id: int) -> None:
        """Cancel the job's tasks and answer ``cancelled``; no outcome of the job follows it."""
        with self.lock:
            job = self.jobs.get(job_id)
            futures = self.forget_tasks(job) if job is not None else []
            with self.out_lock:
                if job is not None:
                    job.cancelled = True
                self.send(msg.cancelled(job=job_id))
        if futures:
            self.client.cancel(futures, force=True)
        self.submit_all()  # the call's places in its group are free for the others

    def end(self, job_id: int) -> None:
        """Forget the job, cancel what it still has running, and release a scattered function."""
        with self.lock:
            job = self.jobs.pop(job_id, None)
            futures = self.forget_tasks(job) if job is not None else []
        if futures:
            self.client.cancel(futures, force=True)
        if job is not None and hasattr(job.function, "release"):
            job.function.release()
        self.submit_all()

    def cancel_all(self) -> None:
        """Cancel every task of ours still on the cluster (the bridge is stopping; no lock taken)."""
        futures = [chunk.future for chunk in self.by_key.values() if chunk.future is not None]
        if futures:
            self.client.cancel(futures, force=True)

    def describe(self, info: dict[str, Any], processing: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int, int]:
        """For the status reply: the workers (a worker's pid is asked of it once, when first seen),
        the chunks waiting and the jobs open."""
        unknown = [address for address in info.get("workers", {}) if address not in self.pids]
        if unknown:
            self.pids.update(self.client.run(os.getpid, workers=unknown))

        def chunk_of(key: Any) -> tuple[int, int] | None:
            chunk = self.by_key.get(key) if isinstance(key, str) else None
            return None if chunk is None else (chunk.job, chunk.start)

        with self.lock:
            workers = describe_workers(info, processing, self.pids, self.tasks_done, chunk_of)
            queued = sum(len(job.waiting) for job in self.jobs.values())
            return workers, queued, len(self.jobs)

    # -- to Dask -----------------------------------------------------------------------------------

    def scatter(self, payload: Any, *, broadcast: bool = False) -> Any:
        future = self.client.scatter([payload], broadcast=broadcast, hash=False)[0]
        self.scattered += 1
        self.bytes_scattered += frames.size_of(payload)
        return future

    def submit_all(self) -> None:
        """Submit the chunks waiting in every job, while each job's ``limit`` (workers=N, an
        Executor's max_workers) leaves room, as one batch of Dask tasks."""

        batch: list[tuple[Job, Chunk, str]] = []
        with self.lock:
            for job in self.jobs.values():
                while job.waiting and not job.cancelled and (not job.limit or self.in_group[job.group] < job.limit):
                    chunk = job.waiting.popleft()
                    job.running[chunk.id] = chunk
                    self.in_group[job.group] += 1
                    key = f"nbparallel-{self.token}-{chunk.job}-{chunk.id}"
                    self.by_key[key] = chunk
                    batch.append((job, chunk, key))
        if not batch:
            return
        items = [self.scatter(chunk.items) if frames.size_of(chunk.items) > frames.SCATTER_ABOVE else chunk.items
                 for _, chunk, _ in batch]
        futures = self.client.map(run_chunk, [job.function for job, _, _ in batch], [job.spec for job, _, _ in batch],
                                  [chunk.start for _, chunk, _ in batch], [chunk.count for _, chunk, _ in batch], items,
                                  key=[key for _, _, key in batch], pure=False)
        dropped = []
        with self.lock:
            for (job, chunk, key), future in zip(batch, futures):
                chunk.items = None  # Dask holds them now
                chunk.future = future
                if job.running.get(chunk.id) is not chunk:  # cancelled or ended meanwhile
                    self.by_key.pop(key, None)
                    dropped.append(future)
        if dropped:
            self.client.cancel(dropped, force=True)
        gone = {id(future) for future in dropped}
        for future in futures:
            if id(future) not in gone:
                future.add_done_callback(self.done.put)

    def forget_tasks(self, job: Job) -> list[Any]:
        """Drop the job's waiting and running chunks (under the lock); their futures to cancel."""
        futures = []
        for chunk in job.running.values():
            self.in_group[job.group] -= 1
            if chunk.future is not None:
                futures.append(chunk.future)
                self.by_key.pop(chunk.future.key, None)
        job.running.clear()
        job.waiting.clear()
        return futures

    def collect(self) -> None:
        """Hand each finished task's outcomes to the kernel; gather many at once when they pile up."""
        while True:
            batch = [self.done.get()]
            while len(batch) < 256:
                try:
                    batch.append(self.done.get_nowait())
                except queue.Empty:
                    break
            try:
                self.collect_batch(batch)
            except Exception:
                self.send(msg.error(message=traceback.format_exc()))

    def collect_batch(self, futures: list[Any]) -> None:
        with self.lock:  # a future we no longer know of was cancelled, or its job ended
            mine = [(f, chunk) for f in futures if (chunk := self.by_key.get(f.key)) is not None]
        finished = [f for f, _ in mine if f.status == "finished"]
        results: dict[int, Any] = {}
        problems: dict[int, BaseException] = {}
        if finished:
            try:
                results = dict(zip(map(id, finished), self.client.gather(finished)))
            except Exception:  # one was cancelled or lost meanwhile: take them one by one
                for future in finished:
                    try:
                        results[id(future)] = self.client.gather(future)
                    except Exception as exc:
                        problems[id(future)] = exc
        for future, chunk in mine:
            if id(future) in results:
                self.deliver(chunk, results[id(future)])
            elif future.status in ("error", "cancelled") or id(future) in problems:
                self.fail(chunk, future, problems.get(id(future)))
            else:  # "lost": its result was on a worker that died since; Dask computes it again
                future.add_done_callback(self.done.put)
        self.submit_all()

    def finish_task(self, chunk: Chunk) -> Job | None:
        """Take a finished chunk off the books (under the lock); its job if it still wants outcomes."""
        future = chunk.future
        if future is None or self.by_key.pop(future.key, None) is None:
            return None
        job = self.jobs.get(chunk.job)
        if job is None or job.running.pop(chunk.id, None) is None:
            return None
        self.in_group[job.group] -= 1
        chunk.future = None
        return None if job.cancelled else job

    def deliver(self, chunk: Chunk, result: Any) -> None:
        with self.lock:
            job = self.finish_task(chunk)
            if job is None:
                return
            meta = result[0]
            self.tasks_done[meta.get("worker") or "?"] += int(meta.get("n") or 0)
            self.pids.setdefault(meta.get("worker") or "?", int(meta.get("pid") or 0))
        outputs, header, stream, fds = frames.result_frames(chunk, result)
        with self.out_lock:
            if job.cancelled:
                close_fds(fds)
                return
            for output in outputs:  # what the items printed comes before their results, as locally
                self.send(output)
            self.send(header, [stream], fds, owned=True)

    def fail(self, chunk: Chunk, future: Any, error: BaseException | None = None) -> None:
        """A task that did not finish: its workers died, Dask lost it, or run_chunk itself failed
        (``error``: why its result could not be fetched, when that is the problem)."""
        if error is None:
            try:
                error = future.exception(timeout=5)
            except BaseException as exc:  # cancelled by someone other than us: the scheduler
                error = exc
        with self.lock:
            job = self.finish_task(chunk)
            if job is None:
                return
            failure = frames.failure_frame(chunk, error, future.status == "cancelled", self.pids)
        if isinstance(failure, NbParallelError):
            self.send_failure(chunk, failure, job)
            return
        with self.out_lock:
            if not job.cancelled:
                self.send(failure)

    def send_failure(self, chunk: Chunk, error: NbParallelError, job: Job) -> None:
        """Fail every item of the chunk with ``error`` (a ``result`` frame the bridge makes itself)."""
        header, packed = frames.failed_result(chunk, error)
        with self.out_lock:
            if job.cancelled:
                packed.close()
            else:
                self.send(header, [packed.data], packed.fds, owned=True)  # our own error: fresh segments only
