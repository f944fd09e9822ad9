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

*cold* is the first timed call, *warm* the median of the later ones (the pool is warm in both). Two
more reference rows are the physical floors of moving the array into shared memory, measured in
the same run: "floor: write into a fresh memfd" (pwrite of the whole array into a new memfd: the
kernel allocates the shmem pages as it copies) and "floor: copy into mapped shared pages" (a copy
into a memfd whose pages are already allocated and mapped, the best of memmove and numpy's copy).
nbparallel's cold call is compared with the first, its warm calls with the second. "nbparallel
(placing only)" times nothing but nbparallel's move of the 64 slices into shared memory (pickling
and placement, in the caller, no workers): cold (an array never sent, an empty pool), warm (the same
array again: found placed and compared), and "new array" (another array of the same size each time:
copied into a pooled segment). Its ratios are over floors measured in the same child, interleaved
with it repeat by repeat, so both see the same load; its *cold* and *warm* columns are medians.
"""

from __future__ import annotations

import resource
import time
from statistics import median
from typing import Any

from . import report, tasks
from .harness import Case, Options, Outcome, med
from .peers import make_peer

NAME = "s3_array"
TITLE = "S3  large array reduced in 64 slices"
SLICES = 64
REFERENCES = ("serial", "shared-read", "floor-fresh", "floor-warm")
FLOOR_LABELS = {"floor-fresh": "floor: write into a fresh memfd", "floor-warm": "floor: copy into mapped shared pages"}
PLACING = "nbparallel-place"  # nbparallel's move into shared memory alone
# nbparallel with the array allocated in shared memory from the start (nbparallel.shared_array),
# where the engine has it: the "under 0.1 s for a shared array" target.
SHARED_NBP = "nbparallel-shared"


def plan(opts: Options) -> list[Case]:
    params = {"mib": opts.s3_mib, "workers": opts.workers, "repeats": opts.repeats}
    extra = [SHARED_NBP, PLACING] if "nbparallel" in opts.peers else []
    return [Case(NAME, peer, params, opts.timeout) for peer in [*opts.peers, *extra, *REFERENCES]]


def _shared_array_factory() -> Any:
    import nbparallel

    for where in (nbparallel, getattr(nbparallel, "shm", None)):
        try:
            return getattr(where, "shared_array")
        except AttributeError:
            continue
    try:
        from nbparallel.payload.shared import shared_array  # type: ignore[import-not-found,unused-ignore]
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
    extra: dict[str, Any] = {}
    total = expected
    if peer_name in FLOOR_LABELS:
        label = FLOOR_LABELS[peer_name]
        samples = (_fresh_floor if peer_name == "floor-fresh" else _warm_floor)(array, params["repeats"])
    elif peer_name == PLACING:
        label = "nbparallel (placing only)"
        extra["placing"] = _placing(array, params["repeats"])
        samples = extra["placing"]["cold"][:1] + extra["placing"]["warm"]
    elif peer_name == "serial":
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
            # Workers up, and numpy imported in them, before the clock starts.
            peer.map(tasks.slice_sum, [np.ones(16) for _ in range(2 * params["workers"])])
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
            "caller_peak_extra": max(0, _peak_rss() - base_rss), **extra}


def _fresh_floor(array: Any, repeats: int) -> list[float]:
    """Writing the array's bytes into a fresh memfd: the least a first move into shared memory costs."""
    import os

    raw = memoryview(array).cast("B")
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fd = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
        done = 0
        while done < raw.nbytes:
            done += os.pwrite(fd, raw[done:], done)
        samples.append(time.perf_counter() - started)
        os.close(fd)
    return samples


def _warm_floor(array: Any, repeats: int) -> list[float]:
    """Copying the array into a memfd whose pages are allocated and mapped already (each sample the
    better of memmove and numpy's copy): the least a move into reused shared memory costs."""
    import ctypes
    import mmap
    import os

    import numpy as np

    fd = os.memfd_create("bench-floor", os.MFD_CLOEXEC)
    os.ftruncate(fd, array.nbytes)
    mapping = mmap.mmap(fd, array.nbytes)
    target = np.frombuffer(mapping, dtype=array.dtype)
    target[:] = array  # every page allocated and mapped before the clock starts
    address, source = ctypes.addressof(ctypes.c_char.from_buffer(mapping)), array.ctypes.data
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        ctypes.memmove(address, source, array.nbytes)
        by_memmove = time.perf_counter() - started
        started = time.perf_counter()
        np.copyto(target, array)
        samples.append(min(by_memmove, time.perf_counter() - started))
    del target
    mapping.close()
    os.close(fd)
    return samples


def _placing(array: Any, repeats: int) -> dict[str, list[float]]:
    """nbparallel's move of 64 slices into shared memory alone, as the runner does it when it sends
    a call's chunk (pickle, then place; then released, as a finished call's are), each repeat
    interleaved with the two floors so the ratios see the same machine load: *cold* (an array never
    sent, an empty pool), *warm* (the same array again: found placed, compared) and *new array*
    (another array of the same size: a pooled segment, copied into)."""
    import numpy as np

    from nbparallel.payload import pickling, placement

    jobs = iter(range(10**9))
    edges = np.linspace(0, len(array), SLICES + 1).astype(int)

    def place_once(source: Any) -> float:
        job = next(jobs)
        parts = [source[a:b] for a, b in zip(edges[:-1], edges[1:])]
        started = time.perf_counter()
        packed = pickling.pack(parts)
        packed.place(("job", job), ("bench", job))
        took = time.perf_counter() - started
        packed.close()
        placement.release(("bench", job))
        placement.settle()  # its segments mapped for the next call, as between two cells
        return took

    def written_copy() -> Any:
        copy = np.empty_like(array)
        copy[:] = array  # its pages written before the clock starts
        return copy

    out: dict[str, list[float]] = {"fresh_floor": [], "cold": [], "warm_floor": [], "warm": [], "new_array": []}
    for _ in range(repeats):
        placement.clear()  # nothing pooled: the next placement is a first one
        source = written_copy()
        out["fresh_floor"] += _fresh_floor(array, 1)
        out["cold"].append(place_once(source))
        out["warm_floor"] += _warm_floor(array, 1)
        out["warm"].append(place_once(source))
        out["new_array"].append(place_once(written_copy()))
        del source
    placement.clear()
    return out


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cold_warm(peer: str, samples: list[float]) -> tuple[float, float]:
    """The first call and the median of the later ones (a floor's samples are all alike: their median)."""
    if peer in FLOOR_LABELS or len(samples) < 2:
        return median(samples), median(samples)
    return samples[0], median(samples[1:])


def _placing_row(label: str, placing: dict[str, list[float]], cold_key: str, warm_key: str,
                 outcome: Outcome) -> list[Any]:
    """Placing's own row: its ratios over the floors measured in the same child, interleaved."""
    cold, warm = median(placing[cold_key]), median(placing[warm_key])
    fresh, mapped = median(placing["fresh_floor"]), median(placing["warm_floor"])
    speed = f"{outcome.data['array_bytes'] / warm / 2**30:.2f} GiB/s" if warm else None
    return [label, report.seconds(cold) if warm_key == "warm" else None, report.seconds(warm), speed, None,
            report.times(cold / fresh) if warm_key == "warm" else None, report.times(warm / mapped),
            None, None]  # its caller peak holds the copies it makes to have new arrays: not comparable


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    fallback = {SHARED_NBP: "nbparallel (shared_array)", "shared-read": "limit: shared read (fork)",
                PLACING: "nbparallel (placing only)", **FLOOR_LABELS}
    labels = {c.peer: str(o.data.get("label", fallback.get(c.peer, c.peer))) for c, o in results}
    timing = {c.peer: _cold_warm(c.peer, o.data["seconds"]) for c, o in results if o.status == "ok"}
    cost = {labels[c.peer]: timing[c.peer][1] if c.peer in timing else None for c, _ in results}
    ratio = report.ratios(cost, reference={labels[r] for r in (*REFERENCES, PLACING) if r in labels})
    fresh_floor, warm_floor = (timing.get(f, (None, None))[0] for f in ("floor-fresh", "floor-warm"))

    def over(value: float | None, floor: float | None) -> str | None:
        return report.times(value / floor) if value is not None and floor else None

    lines = []
    for case, outcome in results:
        label = labels[case.peer]
        if outcome.status != "ok":
            lines.append(report.failed_row(label, outcome, 9))
            continue
        cold, warm = timing[case.peer]
        speed = f"{outcome.data['array_bytes'] / warm / 2**30:.2f} GiB/s" if warm else None
        shown_ratio = None if case.peer in REFERENCES or case.peer == PLACING else report.times(ratio[label])
        floors = (None, None) if case.peer in FLOOR_LABELS else (over(cold, fresh_floor), over(warm, warm_floor))
        lines.append([label, report.seconds(cold), report.seconds(warm), speed, shown_ratio, *floors,
                      report.mib(outcome.data["caller_peak_extra"]), report.status_note(outcome)])
        placing = outcome.data.get("placing")
        if placing:
            lines[-1] = _placing_row(label, placing, "cold", "warm", outcome)
            lines.append(_placing_row("nbparallel (placing, new array)", placing, "cold", "new_array", outcome))
    head = (f"{TITLE}: {opts.s3_mib} MiB float64, {SLICES} slices, {opts.workers} workers (started), "
            f"{opts.repeats} calls: cold = the first, warm = the median of the others; ÷best compares warm; "
            "÷floor: cold over the fresh-memfd floor, warm over the mapped-pages floor\n")
    return head + report.table(["peer", "cold", "warm", "throughput", "÷best", "cold ÷floor", "warm ÷floor",
                                "caller peak +", "note"], lines)
