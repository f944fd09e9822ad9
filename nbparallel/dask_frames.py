"""The Dask bridge's conversions between the wire protocol and Dask, and its connection to a cluster.

Frames from the kernel carry large buffers as shared-memory descriptors (shm.py). Those cannot
cross machines, so the bridge copies each into bytes once (``payload_from``) and Dask carries the
bytes; results come back as bytes and are put into fresh shared-memory segments for the kernel
(``outcome_frame``), which maps them as it does a local worker's. Nothing here unpickles a user's
value: streams and buffers are routed as they are.
"""

from __future__ import annotations

import importlib.util
import logging
import mmap
import os
from typing import Any

from . import serialization as ser
from . import shm
from .errors import NbParallelError
from .protocol import Frame
from .worker import Batch

# A payload this big or bigger is scattered to the cluster once, and the task refers to it, rather
# than riding inside the task through the scheduler (which warns about, and chokes on, big graphs).
SCATTER_ABOVE = 64 * 2**10
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler (the kernel waits a little longer for us)

Payload = tuple[bytes, list[bytes]]  # as in dask_task.py: a pickle stream and its buffers


def payload_from(frame: Frame) -> Payload:
    """A frame's pickle stream and its out-of-band buffers as bytes; closes the frame's descriptors."""
    fds, frame.fds = frame.fds, []
    maps: dict[int, mmap.mmap] = {}
    try:
        buffers: list[bytes] = []
        for spec in frame.get("oob") or ():
            index = int(spec["fd"])
            if index not in maps:
                maps[index] = mmap.mmap(fds[index], 0, access=mmap.ACCESS_READ)
            buffers.append(maps[index][spec["offset"] : spec["offset"] + spec["size"]])
        return bytes(frame.payload), buffers
    finally:
        for mapping in maps.values():
            mapping.close()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def size_of(payload: Payload) -> int:
    return len(payload[0]) + sum(len(b) for b in payload[1])


def outcome_frame(stream: bytes, buffers: list[Any]) -> tuple[dict[str, Any], list[int]]:
    """The ``oob`` header field and the descriptors for a result's buffers (each in a new segment).
    The caller sends them and then closes the descriptors."""
    specs: list[dict[str, Any]] = []
    fds: list[int] = []
    try:
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            fd, mapping = shm._new_segment(view.nbytes, "nbparallel-dask-result")
            with mapping:
                mapping[: view.nbytes] = view
            specs.append({"fd": len(fds), "offset": 0, "size": view.nbytes, "writable": False})
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return ({"oob": specs} if specs else {}), fds


def failed_outcomes(start: int, offsets: range, error: NbParallelError) -> shm.Packed:
    """Outcomes that fail every offset with ``error`` (made by the bridge: our own error type)."""
    batch = Batch(start)
    for offset in offsets:
        batch.add_problem(offset, ser.FAILED, error)
    return batch.pickle()


def unsupported(header: dict[str, Any]) -> str | None:
    """Why a job's limits cannot be kept on a Dask cluster, or None."""
    names = [name for name in ("timeout", "memory_limit") if header.get(name)]
    if not names:
        return None
    return (f"{' and '.join(f'{name}=' for name in names)} cannot be enforced on a Dask cluster: Dask cannot stop "
            "a task that is running. Use total_timeout= (it cancels the whole call), Dask's own worker "
            "memory limits, or configure(cluster=None) to run on this machine.")


def crash_header(job: int, chunk: int, indices: list[int], error: BaseException, pid: int | None,
                 address: str | None) -> dict[str, Any]:
    """A ``crashed`` frame for a chunk Dask gave up on (its workers died running it)."""
    failures = getattr(error, "allowed_failures", None)
    attempts = failures + 1 if isinstance(failures, int) else 1
    cause = (f"the Dask workers running it died {attempts} time{'s' if attempts > 1 else ''}, and Dask gave up "
             "(KilledWorker; distributed.scheduler.allowed-failures sets how often it retries). A segfault, "
             "os._exit or the worker's memory limit are the usual causes; the worker logs say which")
    return {"op": "crashed", "job": job, "chunk": chunk, "indices": indices, "pid": pid, "exitcode": None,
            "memory": None, "attempts": attempts, "cause": cause, "worker": address}


def last_worker(error: BaseException) -> str | None:
    worker = getattr(error, "last_worker", None)
    address = getattr(worker, "address", worker)
    return str(address) if address else None


def has_dashboard() -> bool:
    return importlib.util.find_spec("bokeh") is not None


def connect(address: str, workers: int, timeout: float) -> tuple[Any, Any]:
    """(Dask client, LocalCluster or None): a new LocalCluster for ``"local"``, else the scheduler
    at ``address``. Raises what Dask raises when the scheduler cannot be reached."""
    from distributed import Client, LocalCluster

    quiet = logging.ERROR  # the kernel hears of failures through frames; the log stays readable
    logging.getLogger("distributed").setLevel(quiet)
    if address == "local":
        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=":0" if has_dashboard() else None, silence_logs=quiet)
        try:
            return Client(cluster, timeout=timeout, set_as_default=False), cluster
        except BaseException:
            cluster.close()
            raise
    return Client(address, timeout=timeout, set_as_default=False), None


def describe_workers(info: dict[str, Any], processing: dict[str, Any], pids: dict[str, int],
                     tasks_done: dict[str, int], chunk_of: Any) -> list[dict[str, Any]]:
    """The ``workers`` of a ``status`` reply, one per Dask worker, shaped like the sidecar's.

    ``chunk_of(key)`` gives ``(job, first index)`` for the keys of our own tasks, else None.
    """
    described = []
    for address, worker in sorted(info.get("workers", {}).items()):
        keys = processing.get(address) or ()
        ours = [found for found in map(chunk_of, keys) if found is not None]
        job, index = ours[0] if ours else (None, None)
        metrics = worker.get("metrics") or {}
        described.append({
            "pid": pids.get(address, 0),
            "state": "busy" if keys else "idle",
            "job": job,
            "index": index,
            "rss": int(metrics.get("memory") or 0),
            "tasks_done": tasks_done.get(address, 0),
            "address": address,
            "threads": worker.get("nthreads"),
            "memory_limit": worker.get("memory_limit"),
        })
    return described
