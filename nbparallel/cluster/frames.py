"""The Dask bridge's conversions between the wire protocol and Dask, and its connection to a cluster.

Frames from the kernel carry large buffers as shared-memory descriptors (shm.py). Those cannot
cross machines, so the bridge copies each into bytes once (``payload_from``) and Dask carries the
bytes; results come back as bytes and are put into fresh shared-memory segments for the kernel
(``outcome_segments``), which maps them as it does a local worker's. Nothing here unpickles a user's
value: streams and buffers are routed as they are.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import mmap
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..payload import pickling as ser
from ..payload import segments, shm
from ..errors import NbParallelError
from ..wire import messages as msg
from ..wire.frames import Frame, close_fds
from ..payload.outcomes import Batch

# A payload this big or bigger is scattered to the cluster once, and the task refers to it, rather
# than riding inside the task through the scheduler (which warns about, and chokes on, big graphs).
SCATTER_ABOVE = 64 * 2**10
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler (the kernel waits a little longer for us)

Payload = tuple[bytes, list[bytes]]  # as in task.py: a pickle stream and its buffers


@dataclass
class Chunk:
    job: int
    id: int
    start: int
    count: int
    items: Any  # a payload (bytes), or the Dask future of one scattered to the cluster
    future: Any = None


@dataclass
class Job:
    header: msg.Job
    function: Any  # a payload, or the Dask future it was scattered to
    refusal: str | None  # why the job's limits cannot be kept here
    waiting: deque[Chunk] = field(default_factory=deque)  # held back by ``limit``
    running: dict[int, Chunk] = field(default_factory=dict)
    cancelled: bool = False
    _spec: str | None = None

    @property
    def spec(self) -> str:
        """What run_chunk needs to know of the job, as one JSON string (Dask walks nested arguments
        of every task it is given; a string it passes along as it is)."""
        if self._spec is None:
            self._spec = json.dumps({"key": self.header["key"], "call": self.header.get("call", "one"),
                                     "stop_on_error": bool(self.header.get("stop_on_error")),
                                     "path": self.header.get("path") or [], "out_of_band": segments.AVAILABLE,
                                     "concurrency": int(self.header.get("concurrency") or 0)})
        return self._spec

    @property
    def limit(self) -> int:
        return int(self.header.get("limit") or 0)

    @property
    def group(self) -> Any:
        return self.header.get("group") or ("job", self.header["job"])


def payload_from(frame: Frame) -> Payload:
    """A frame's pickle stream and its out-of-band buffers as bytes; closes the frame's descriptors."""
    fds, frame.fds = frame.fds, []
    maps: dict[int, mmap.mmap] = {}
    try:
        stream = bytes(frame.payload)
        buffers: list[bytes] = []
        for spec in frame.get("oob") or ():
            index = int(spec["fd"])
            if index not in maps:
                maps[index] = mmap.mmap(fds[index], 0, access=mmap.ACCESS_READ)
            data = maps[index][spec["offset"] : spec["offset"] + spec["size"]]
            if spec.get("stream"):  # the pickle stream itself, sent out of band (shm.dumps)
                stream = data
            else:
                buffers.append(data)
        return stream, buffers
    finally:
        for mapping in maps.values():
            mapping.close()
        close_fds(fds)


def size_of(payload: Payload) -> int:
    return len(payload[0]) + sum(len(b) for b in payload[1])


def outcome_segments(buffers: list[Any]) -> tuple[msg.Segments, list[int]]:
    """The ``oob`` header field and the descriptors for a result's buffers (each in a new segment).
    The caller sends them and then closes the descriptors."""
    specs: msg.Segments = []
    fds: list[int] = []
    try:
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            fds.append(shm.segment_with(view))
            specs.append({"fd": len(fds) - 1, "offset": 0, "size": view.nbytes, "writable": False})
    except BaseException:
        close_fds(fds)
        raise
    return specs, fds


def failed_result(chunk: Chunk, error: NbParallelError) -> tuple[msg.Result, shm.Packed]:
    """A ``result`` frame that fails every item of the chunk with ``error`` (made by the bridge:
    our own error type, the only thing it ever pickles)."""
    batch = Batch(chunk.start)
    for offset in range(chunk.count):
        batch.add_problem(offset, ser.FAILED, error)
    packed = batch.pickle()
    header = msg.result(job=chunk.job, chunk=chunk.id, start=chunk.start, upto=chunk.count, n=chunk.count,
                        failed=chunk.count, elapsed=0.0, final=True, pid=0)
    if packed.specs:
        header["oob"] = packed.specs
    return header, packed


def unsupported(header: msg.Job) -> str | None:
    """Why a job's limits cannot be kept on a Dask cluster, or None. A coroutine function's
    ``timeout`` is kept (its coroutines are cancelled in the task's event loop); ``rate`` is not: start
    times cannot be shared between machines."""
    if header.get("rate"):
        return ("rate= cannot be enforced on a Dask cluster: its workers share no clock to pace their starts. Use "
                "concurrency= to cap the items in flight, or configure(cluster=None) to run on this machine.")
    limits = {"timeout": None if header.get("concurrency") else header.get("timeout"),
              "memory_limit": header.get("memory_limit")}
    names = [name for name, value in limits.items() if value]
    if not names:
        return None
    return (f"{' and '.join(f'{name}=' for name in names)} cannot be enforced on a Dask cluster: Dask cannot stop "
            "a task that is running. Use total_timeout= (it cancels the whole call), Dask's own worker "
            "memory limits, or configure(cluster=None) to run on this machine.")


def failure_frame(chunk: Chunk, error: BaseException | None, cancelled: bool, pids: dict[str, int]
                  ) -> msg.Crashed | NbParallelError:
    """What to tell the kernel about a chunk whose task did not finish: a ``crashed`` header when its
    workers died (KilledWorker) or Dask dropped it, else the error that fails its items."""
    indices = list(range(chunk.start, chunk.start + chunk.count))
    if cancelled or type(error).__name__ == "KilledWorker":
        failures = getattr(error, "allowed_failures", None)
        attempts = failures + 1 if isinstance(failures, int) else 1
        worker = getattr(error, "last_worker", None)
        address = str(getattr(worker, "address", worker) or "") or None
        cause = (f"the Dask workers running it died {attempts} time{'s' if attempts > 1 else ''}, and Dask gave "
                 "up (KilledWorker; distributed.scheduler.allowed-failures sets how often it retries). A segfault, "
                 "os._exit or the worker's memory limit are the usual causes; the worker logs say which")
        if cancelled:
            cause = "Dask cancelled its task: the connection to the scheduler was lost, or the scheduler restarted"
        return msg.crashed(job=chunk.job, chunk=chunk.id, indices=indices, pid=pids.get(address or "", 0),
                           exitcode=None, memory=None, attempts=attempts, cause=cause, worker=address)
    text = f"{type(error).__name__}: {error}"
    return NbParallelError(f"the Dask task running items {indices[0]}..{indices[-1]} failed outside the "
                               f"function: {text}. Is nbparallel (the same version) installed on the Dask workers?")


def result_frames(chunk: Chunk, result: Any) -> tuple[list[msg.Output], msg.Result, bytes, list[int]]:
    """A finished task's ``output`` headers, its ``result`` header, payload and descriptors (each
    large buffer in a new segment; the caller closes them once sent)."""
    meta, lines, stream, buffers = result
    pid = int(meta.get("pid") or 0)
    outputs = [msg.output(job=chunk.job, index=index, stream=name, text=text, pid=pid) for index, name, text in lines]
    specs, fds = outcome_segments(buffers)
    header = msg.result(job=chunk.job, chunk=chunk.id, start=chunk.start, upto=meta["upto"], n=meta["n"],
                        failed=meta["failed"], elapsed=meta["elapsed"], final=True, pid=pid)
    if specs:
        header["oob"] = specs
    return outputs, header, stream, fds


def has_dashboard() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def connect(address: str, workers: int, timeout: float) -> tuple[Any, Any]:
    """(Dask client, LocalCluster or None): a new LocalCluster for ``"local"``, else the scheduler
    at ``address``. Raises what Dask raises when the scheduler cannot be reached."""
    from distributed import Client, LocalCluster  # optional: only the bridge process needs Dask

    quiet = logging.ERROR  # the kernel hears of failures through frames; the log stays readable
    logging.getLogger("distributed").setLevel(quiet)
    if address == "local":
        # ":0": a free port for its HTTP server (the dashboard, when bokeh is installed), never a clash.
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,  # type: ignore[no-untyped-call]
                               dashboard_address=":0", silence_logs=quiet)
        try:
            # Its workers are on this machine: fetch results from them, not through the scheduler.
            return (Client(cluster, timeout=timeout, set_as_default=False,  # type: ignore[no-untyped-call]
                           direct_to_workers=True), cluster)
        except BaseException:
            cluster.close()
            raise
    return Client(address, timeout=timeout, set_as_default=False), None  # type: ignore[no-untyped-call]
