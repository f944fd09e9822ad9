"""The Dask side of the bridge: chunks submitted as Dask tasks, finished tasks handed to the kernel.

``DaskSide`` holds what the bridge knows of its jobs and their tasks; ``Bridge`` (dask_bridge.py)
adds the kernel's side. Three threads meet here: the bridge's main thread (submitting, cancelling),
Dask's callback thread (a task finished: its future goes on ``done``) and the collector (fetching
results and sending them on). ``lock`` guards the books; ``out_lock`` makes deciding to send a job's
outcomes and queueing them one step, so none can follow the job's ``cancelled``.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from . import frames
from .frames import Chunk, Job
from ..errors import NbParallelError
from .task import run_chunk
from ..wire import messages as msg
from ..wire.frames import Buffer, close_fds


class DaskSide:
    client: Any  # distributed.Client
    token: str  # keeps our task keys apart from other clients' on a shared scheduler
    jobs: dict[int, Job]
    by_key: dict[str, Chunk]  # our tasks on the cluster, by Dask key
    in_group: Counter[Any]  # tasks submitted and not finished, per limit group
    done: queue.SimpleQueue[Any]  # finished Dask futures, for the collector
    tasks_done: Counter[str]  # items run, per Dask worker address
    pids: dict[str, int]  # Dask worker address -> its process id
    scattered: int  # payloads scattered to the cluster (the status reply says how many)
    bytes_scattered: int
    lock: threading.RLock
    out_lock: threading.Lock

    def send(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = (),
             *, owned: bool = False) -> None:
        raise NotImplementedError

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
