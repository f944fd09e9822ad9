"""The workers as the sidecar supervises them: the pool sized, workers started and retired, their
frames read, their limits enforced, and a death blamed on the item that was running.
"""

from __future__ import annotations

import selectors
import shutil
import time

from .. import config
from ..errors import ProtocolError
from ..wire import messages as msg
from ..wire import strays
from ..wire import worker_messages as wmsg
from ..wire.frames import Frame
from ..wire.frames import close_fds as close_all
from .health import describe_exit
from .policy import blame, limit_breached, lost
from .queues import JobQueues
from .workers import WorkerProcess, sample_memory


class WorkerSupervision(JobQueues):
    """The workers' lifecycles, from spawn to the blame for a death (its queues: see queues.py)."""

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

    def retire(self, worker: WorkerProcess) -> None:
        """Ask an idle worker to exit; a busy one is killed and its chunks go back to the queue."""
        if worker.assigned:
            self.requeue_others(worker, None)
            worker.kill()
        else:
            worker.retiring = True
            worker.channel.send(wmsg.exit())

    def read_worker(self, worker: WorkerProcess) -> None:
        # Whole frames read before the stream turned corrupt are kept and served: one read may bring
        # the result of the chunk before, sent just before a task of the next chunk wrote into the
        # socket. Dropped with the garbage, that result was lost: its chunk stayed at the head of
        # ``assigned`` while the slot named the next one, so the death was taken for one outside any
        # item and, the second time, its innocent items failed as crashed (not the culprit).
        frames: list[Frame] = []
        closed = False
        try:
            for frame in worker.channel.receive():
                frames.append(frame)
        except EOFError:
            closed = True
        except ProtocolError:  # a task wrote into the worker's socket: the worker is lost, not the pool
            worker.kill()
            closed = True
        for frame in frames:
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
        if closed:
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

    def enforce_limits(self, now: float) -> None:
        """Kill a worker whose item ran past the job's timeout or whose memory passed its limit."""
        for worker in self.workers.values():
            if worker.assigned and worker.kill_reason is None:
                worker.kill_reason = limit_breached(worker, self.jobs.get(worker.assigned[0].job), now)
                if worker.kill_reason is not None:  # its exit is handled like a crash, with the reason attached
                    worker.kill(at_once=worker.kill_reason.reason == "memory")  # memory: no grace

    def sample_memory(self) -> None:
        self.rss_peak = max(self.rss_peak, sample_memory(self.workers.values()))

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
