"""The Dask workers as ``status`` describes them: the sidecar's shape, one worker per Dask worker.

The widget's lanes, ``nbparallel.status()`` and ``%nbparallel status`` read it. The bridge asks the
scheduler for its workers (memory, threads) and what each is processing (``Bridge.status_reply``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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
