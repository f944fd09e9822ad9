"""nbparallel calls that a task makes: run in its own worker, serially.

A task that calls ``nbparallel.map`` (or ``imap``, ``submit``, an ``Executor``, joblib through our
backend) runs in a worker. Starting a sidecar there would give each worker a pool of its own (N
workers, about N(N+1) processes, for one nested call). So in a worker (``config.in_worker``), the
client is an ``InlineClient``: it takes the frames a runner takes, and runs each chunk at once, in
the calling thread, item after item, then hands its outcomes to the call as the reader thread would.
The call itself goes as anywhere: values in order, a task's exception as itself, ``errors=``,
``err.completed``, what the items print (tagged with the outer item). What needs a process to kill
cannot apply: a per-item ``timeout``, ``memory_limit`` and ``total_timeout`` are not enforced, and
an item that kills its process kills the outer item's worker (that item fails with WorkerCrashed).
"""

from __future__ import annotations

import inspect
import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..payload.calls import call_item
from ..payload import pickling as ser
from ..payload import shm
from ..payload.outcomes import Batch
from ..wire import messages as msg
from ..wire.frames import Buffer, Frame, close_fds


class InlineClient:
    """Stands in for the runner in a worker (see the module's doc); has what the calls use of ``Client``."""

    kind = "worker"
    cluster: str | None = None
    size = 1  # one worker: this one
    dead = None
    reader = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.info: dict[str, Any] = {}
        self.errors: list[str] = []
        self.handles: dict[int, Any] = {}
        self.headers: dict[int, Mapping[str, Any]] = {}
        self.functions: dict[int, Callable[..., Any]] = {}
        self.job_ids = itertools.count(1)
        self.chunk_ids = itertools.count(1)

    def new_job_id(self) -> int:
        return next(self.job_ids)

    def new_chunk_id(self) -> int:
        return next(self.chunk_ids)

    def register(self, job_id: int, handle: Any) -> None:
        self.handles[job_id] = handle

    def unregister(self, job_id: int) -> None:
        self.handles.pop(job_id, None)
        self.headers.pop(job_id, None)
        self.functions.pop(job_id, None)

    def configure(self, settings: Any) -> None:
        """Nothing to configure: there is no pool."""

    def close(self, timeout: float = 2.0) -> None:
        """Nothing to stop."""

    def request(self, header: Mapping[str, Any], timeout: float = 5.0) -> Frame:
        return Frame(dict(msg.status(req=header.get("req"), workers=[], pid=self.pid, size=1, jobs=len(self.headers))))

    def ask_status(self, timeout: float = 5.0) -> msg.Status:
        return msg.status(req=None, workers=[], pid=self.pid, size=1, jobs=len(self.headers))

    def send_packed(self, header: Mapping[str, Any], packed: Any) -> None:
        try:
            packed.place()  # its large buffers in a segment of its own, as a worker would get them
            if packed.specs:
                header = {**header, "oob": packed.specs}
            self.send(header, [packed.data], packed.fds)
        finally:
            packed.close()

    def send(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = ()) -> None:
        """Do what the runner would with this frame, now."""
        op, job = header.get("op"), header.get("job")
        if op == "job" and isinstance(job, int):
            self.headers[job] = header
            self.functions[job] = _load(header, buffers, fds)
        elif op == "chunk" and isinstance(job, int) and job in self.functions:
            self.run_chunk(header, _load(header, buffers, fds))
        elif op == "cancel" and isinstance(job, int):
            self.hand(job, Frame(dict(msg.cancelled(job=job))))
        elif op == "end" and isinstance(job, int):
            self.headers.pop(job, None)
            self.functions.pop(job, None)

    def hand(self, job: int, frame: Frame) -> None:
        handle = self.handles.get(job)
        if handle is None:
            close_fds(frame.fds)
        else:
            handle.on_frame(frame)

    def run_chunk(self, chunk: Mapping[str, Any], items: list[Any]) -> None:
        job = int(chunk["job"])
        header, fn = self.headers[job], self.functions[job]
        call, stop_on_error = header.get("call", "one"), bool(header.get("stop_on_error"))
        batch = Batch(int(chunk["start"]))
        began = time.perf_counter()
        upto = len(items)
        for offset, item in enumerate(items):
            try:
                value = call_item(fn, call, item)
                if inspect.isawaitable(value):  # a coroutine function's item: on an event loop of its own
                    value = _run_awaitable(value)
            except BaseException as exc:  # SystemExit and KeyboardInterrupt in a task are its outcome too
                batch.add_problem(offset, ser.RAISED, ser.encode_exception(exc))
                if stop_on_error:
                    upto = offset + 1
                    break
            else:
                batch.offsets.append(offset)
                batch.values.append(value)
        packed = batch.pickle()
        try:
            result = msg.result(job=job, chunk=int(chunk["chunk"]), start=int(chunk["start"]), upto=upto,
                                n=len(batch.offsets) + len(batch.problems), failed=len(batch.problems),
                                elapsed=time.perf_counter() - began, final=True, pid=self.pid)
            if packed.specs:
                result["oob"] = packed.specs
            frame = Frame(dict(result), [packed.data], [os.dup(fd) for fd in packed.fds])
        finally:
            packed.close()
        self.hand(job, frame)


def _load(header: Mapping[str, Any], buffers: Sequence[Buffer], fds: Sequence[int]) -> Any:
    """What a frame carries, unpickled as a worker would (from copies of the descriptors)."""
    payload = b"".join(bytes(memoryview(b)) for b in buffers)
    return shm.loads(payload, [os.dup(fd) for fd in fds], list(header.get("oob") or []))


def _run_awaitable(value: Any) -> Any:
    import asyncio  # heavy (~15 ms at a cold start): only for a nested call that returned an awaitable

    async def wait() -> Any:
        return await value

    return asyncio.run(wait())


_client: InlineClient | None = None
_lock = threading.Lock()


def client() -> InlineClient:
    """This worker's inline client."""
    global _client
    with _lock:
        if _client is None or _client.pid != os.getpid():
            _client = InlineClient()
        return _client
