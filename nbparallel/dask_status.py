"""The Dask bridge's answer to ``status``: the sidecar's shape, with one worker per Dask worker.

The widget's lanes, ``nbparallel.status()`` and ``%nbparallel status`` read it. It asks the scheduler
for its workers (memory, threads) and what each is processing; a worker's pid is asked of the worker
once, the first time it is seen.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dask_bridge import Bridge


def reply(bridge: Bridge) -> dict[str, Any]:
    import psutil

    info = bridge.client.scheduler_info()
    processing = bridge.client.processing()
    unknown = [address for address in info.get("workers", {}) if address not in bridge.pids]
    if unknown:
        bridge.pids.update(bridge.client.run(os.getpid, workers=unknown))

    def chunk_of(key: Any) -> tuple[int, int] | None:
        chunk = bridge.by_key.get(key) if isinstance(key, str) else None
        return None if chunk is None else (chunk.job, chunk.start)

    with bridge.lock:
        workers = describe_workers(info, processing, bridge.pids, bridge.tasks_done, chunk_of)
        queued = sum(len(job.waiting) for job in bridge.jobs.values())
        jobs = len(bridge.jobs)
    rss = psutil.Process().memory_info().rss
    bridge.rss_peak = max(bridge.rss_peak, rss)
    return {"pid": os.getpid(), "rss": rss, "rss_peak": bridge.rss_peak, "runner": "dask",
            "size": sum(int(w.get("threads") or 0) for w in workers), "workers": workers, "queued": queued,
            "jobs": jobs, "cluster": info.get("address") or bridge.address, "dashboard": bridge.dashboard(),
            "scattered": bridge.scattered, "bytes_scattered": bridge.bytes_scattered}


def describe_workers(info: dict[str, Any], processing: Mapping[str, Any], pids: Mapping[str, int],
                     tasks_done: Mapping[str, int], chunk_of: Callable[[Any], tuple[int, int] | None]
                     ) -> list[dict[str, Any]]:
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
