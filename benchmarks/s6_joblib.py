"""S6: joblib's usual pattern over one large array: ``Parallel(n_jobs=2)(delayed(np.sum)(a) for _ in
range(40))`` with a 200 MB ``a``, on joblib's own loky backend and on nbparallel's joblib backend.

Each child starts its pool with a small warm-up call, then times ``--repeats`` calls (first and
median of the rest). joblib memory-maps ``a`` into a file in /dev/shm once per call (its
memmapping reducer remembers the array by identity within the call); nbparallel places it in
shared memory once and every batch of the call refers to it (and keeps the segment pooled for the
next call). *peak shm +* is how far shared memory rose, during the timed calls, above where it was
before the first of them: the copies of ``a`` that existed at once, pooled ones included.
Machine-wide counters (Shmem) would add what other programs do meanwhile, so it counts what this
process and its descendants hold (``shared_memory_of_tree``), sampled every 20 ms; ``÷array``
divides it by the array's size.
"""

from __future__ import annotations

import threading
import time
from statistics import median
from typing import Any

from . import report
from .harness import Case, Options, Outcome

NAME = "s6_joblib"
TITLE = "S6  joblib's pattern: Parallel(n_jobs=2)(delayed(np.sum)(a) for _ in range(40))"
PEERS = ("joblib-loky", "nbparallel")


def plan(opts: Options) -> list[Case]:
    params = {"mb": opts.s6_mb, "tasks": opts.s6_tasks, "workers": opts.workers, "repeats": max(2, opts.repeats)}
    return [Case(NAME, peer, params, opts.timeout) for peer in PEERS]


def shared_memory_of_tree() -> int:
    """Bytes of shared memory this process and its descendants hold: every memfd or /dev/shm file
    one of them maps or has open, and joblib's memmapping files of this process (in /dev/shm folders
    named after its pid, which no process holds between a write and a worker's read), each counted
    once. Machine-wide counters (Shmem) would add whatever other programs do meanwhile."""
    import os

    import psutil

    sizes: dict[tuple[int, int], int] = {}

    def note(path: str) -> None:
        try:
            info = os.stat(path)
        except OSError:
            return
        sizes[(info.st_dev, info.st_ino)] = info.st_size

    pids = [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    if "/memfd:" in line or " /dev/shm/" in line:
                        note(f"/proc/{pid}/map_files/{line.split()[0]}")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith(("/memfd:", "/dev/shm/")):
                    note(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    try:
        folders = [f for f in os.listdir("/dev/shm") if f.startswith(f"joblib_memmapping_folder_{os.getpid()}_")]
    except OSError:
        folders = []
    for folder in folders:
        for root, _, files in os.walk(f"/dev/shm/{folder}"):
            for name in files:
                note(os.path.join(root, name))
    return sum(sizes.values())


class PeakShmem:
    """Samples ``shared_memory_of_tree`` in a thread while the block runs; ``rise`` is the peak above
    the start."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakShmem:
        self.start = self.peak = shared_memory_of_tree()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopped.set()
        self.thread.join()
        self.peak = max(self.peak, shared_memory_of_tree())

    def _watch(self) -> None:
        while not self.stopped.wait(0.02):
            self.peak = max(self.peak, shared_memory_of_tree())

    @property
    def rise(self) -> int:
        return max(0, self.peak - self.start)


def measure(peer_name: str, params: dict[str, Any]) -> dict[str, Any]:
    import joblib
    import numpy as np

    a = np.random.default_rng(0).random(params["mb"] * 1_000_000 // 8)  # written, so resident
    expected = float(np.sum(a))
    workers, tasks = params["workers"], params["tasks"]
    if peer_name == "nbparallel":
        import nbparallel
        import nbparallel.api

        nbparallel.configure(workers=workers)
        nbparallel.api.start()
        config = joblib.parallel_config(backend="nbparallel", progress=False)
    else:
        config = joblib.parallel_config(backend="loky")
    seconds: list[float] = []
    rises: list[int] = []
    try:
        with config:
            joblib.Parallel(n_jobs=workers)(joblib.delayed(np.sum)(np.ones(10)) for _ in range(4 * workers))
            baseline = shared_memory_of_tree()
            for _ in range(params["repeats"]):
                with PeakShmem() as peak:
                    started = time.perf_counter()
                    out = joblib.Parallel(n_jobs=workers)(joblib.delayed(np.sum)(a) for _ in range(tasks))
                    seconds.append(time.perf_counter() - started)
                rises.append(max(0, peak.peak - baseline))
                if len(out) != tasks or any(abs(float(v) - expected) > 1e-6 * abs(expected) for v in out):
                    raise AssertionError(f"{peer_name}: wrong sums")
    finally:
        if peer_name == "nbparallel":
            nbparallel.shutdown()
        else:
            from joblib.externals.loky import get_reusable_executor

            get_reusable_executor().shutdown(wait=True)
    return {"seconds": seconds, "shm_rise": rises, "array_bytes": a.nbytes}


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    ok = {c.peer: o.data for c, o in results if o.status == "ok"}
    loky = ok.get("joblib-loky")
    lines = []
    for case, outcome in results:
        if outcome.status != "ok":
            lines.append(report.failed_row(case.peer, outcome, 8))
            continue
        data = outcome.data
        first, rest = data["seconds"][0], median(data["seconds"][1:])
        ratio_first = report.times(first / loky["seconds"][0]) if loky else None
        ratio_rest = report.times(rest / median(loky["seconds"][1:])) if loky else None
        peak = max(data["shm_rise"])
        lines.append([case.peer, report.seconds(first), report.seconds(rest), ratio_first, ratio_rest,
                      report.mib(peak), report.times(peak / data["array_bytes"]), report.status_note(outcome)])
    head = (f"{TITLE}\n{opts.s6_mb} MB float64 array, {opts.s6_tasks} tasks, {opts.workers} workers (started), "
            f"{max(2, opts.repeats)} calls: the first, and the median of the others; ÷loky against joblib's loky "
            "backend in the same run\n")
    return head + report.table(["backend", "first", "later", "first ÷loky", "later ÷loky", "peak shm +", "÷array",
                                "note"], lines)
