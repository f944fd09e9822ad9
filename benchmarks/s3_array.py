"""S3: a large float64 array held by the caller, reduced in 64 slices by the workers.

Each peer gets the slices the way its documentation suggests: as ``map`` arguments (Pool,
ProcessPoolExecutor and mpire pickle them through a pipe; joblib memory-maps arrays above 1 MB
into a temporary folder; nbparallel today pickles them through the sidecar), Dask scatters them
first. The pool is started and warmed before timing: this is the cost of moving data, not of
starting workers. Two reference rows bound it: "serial" sums the slices in the caller, and
"limit: shared read" is forked workers summing an array they already share (nothing moves), the
floor any zero-copy scheme can reach. Where the engine has ``shared_array``, a row
"nbparallel (shared_array)" allocates the array in shared memory from the start. ``peak RSS`` is the caller's high-water mark (ru_maxrss)
beyond the array itself: what the copies cost the caller.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from . import report, tasks
from .harness import Case, Options, Outcome, med
from .peers import make_peer

NAME = "s3_array"
TITLE = "S3  large array reduced in 64 slices"
SLICES = 64
REFERENCES = ("serial", "shared-read")
# nbparallel with the array allocated in shared memory from the start (nbparallel.shared_array),
# where the engine has it: the "under 0.1 s for a shared array" target.
SHARED_NBP = "nbparallel-shared"


def plan(opts: Options) -> list[Case]:
    params = {"mib": opts.s3_mib, "workers": opts.workers, "repeats": opts.repeats}
    extra = [SHARED_NBP] if "nbparallel" in opts.peers else []
    return [Case(NAME, peer, params, opts.timeout) for peer in [*opts.peers, *extra, *REFERENCES]]


def _shared_array_factory() -> Any:
    import nbparallel

    for where in (nbparallel, getattr(nbparallel, "shm", None)):
        try:
            return getattr(where, "shared_array")
        except AttributeError:
            continue
    try:
        from nbparallel.payload.shm import shared_array  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return shared_array


def measure(peer_name: str, params: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    count = params["mib"] * 2**20 // 8
    if peer_name == SHARED_NBP:
        factory = _shared_array_factory()
        if factory is None:
            raise RuntimeError("this nbparallel has no shared_array")
        array = factory(count, np.float64)
        array[:] = np.arange(count, dtype=np.float64)
    else:
        array = np.arange(count, dtype=np.float64)  # written, so resident
    edges = np.linspace(0, len(array), SLICES + 1).astype(int)
    bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    slices = [array[a:b] for a, b in bounds]  # views: no copy in the caller
    expected = float(array.sum())
    base_rss = _peak_rss()
    samples: list[float] = []
    label = peer_name
    if peer_name == "serial":
        for _ in range(params["repeats"]):
            started = time.perf_counter()
            total = sum(tasks.slice_sum(s) for s in slices)
            samples.append(time.perf_counter() - started)
    else:
        if peer_name == "shared-read":
            tasks.SHARED_ARRAY = array  # inherited by the forked workers below
            peer = make_peer("pool-fork")
            label = "limit: shared read (fork)"
        else:
            peer = make_peer("nbparallel" if peer_name == SHARED_NBP else peer_name)
            label = "nbparallel (shared_array)" if peer_name == SHARED_NBP else peer.label()
        peer.start(params["workers"])
        try:
            peer.map(tasks.small, list(range(2 * params["workers"])))  # workers up before the clock starts
            for _ in range(params["repeats"]):
                started = time.perf_counter()
                if peer_name == "shared-read":
                    total = sum(peer.map(tasks.shared_slice_sum, bounds))
                else:
                    total = sum(peer.map_arrays(tasks.slice_sum, slices))
                samples.append(time.perf_counter() - started)
        finally:
            peer.close()
    if abs(total - expected) > 1e-9 * abs(expected):
        raise AssertionError(f"{label}: sum {total!r} != {expected!r}")
    return {"label": label, "array_bytes": array.nbytes, "seconds": samples,
            "caller_peak_extra": max(0, _peak_rss() - base_rss)}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    fallback = {SHARED_NBP: "nbparallel (shared_array)", "shared-read": "limit: shared read (fork)"}
    labels = {c.peer: str(o.data.get("label", fallback.get(c.peer, c.peer))) for c, o in results}
    cost = {labels[c.peer]: med(o.data["seconds"]) if o.status == "ok" else None for c, o in results}
    ratio = report.ratios(cost, reference={labels[r] for r in REFERENCES if r in labels})
    lines = []
    for case, outcome in results:
        label = labels[case.peer]
        if outcome.status != "ok":
            lines.append(report.failed_row(label, outcome, 6))
            continue
        secs = cost[label]
        speed = f"{outcome.data['array_bytes'] / secs / 2**30:.2f} GiB/s" if secs else None
        shown_ratio = None if case.peer in REFERENCES else report.times(ratio[label])
        lines.append([label, report.seconds(secs), speed, shown_ratio,
                      report.mib(outcome.data["caller_peak_extra"]), report.status_note(outcome)])
    head = (f"{TITLE}: {opts.s3_mib} MiB float64, {SLICES} slices, {opts.workers} workers (started), "
            f"median of {opts.repeats}\n")
    return head + report.table(["peer", "time", "throughput", "÷best", "caller peak +", "note"], lines)
