"""S4: CPU-bound scaling: 16 tasks of ~0.25 s of pure-Python work each; speedup over serial.

The task is a fixed number of loop iterations, calibrated once in the parent so one task takes
``--s4-seconds`` here (not a timed spin, which would finish "on time" however busy the CPUs are).
Each repeat runs the 16 tasks serially in the caller, then on the started pool, back to back, so
both see the same machine load; the speedup is their ratio and the table shows the median.
On a 2-core machine shared with other work, 2.0 is the ceiling and 1.3 to 1.7 is typical.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

from . import report, tasks
from .harness import Case, Options, Outcome, med
from .peers import make_peer

NAME = "s4_scaling"
TITLE = "S4  CPU-bound scaling"


def calibrate(seconds: float) -> int:
    """Iterations of ``tasks.busy`` that take ``seconds`` here (best of three short probes)."""
    probe = 200_000
    best = min(_timed(probe) for _ in range(3))
    return max(1000, int(probe * seconds / best))


def _timed(iterations: int) -> float:
    started = time.perf_counter()
    tasks.busy(iterations)
    return time.perf_counter() - started


def plan(opts: Options) -> list[Case]:
    iterations = calibrate(opts.s4_seconds)
    params = {"iterations": iterations, "tasks": opts.s4_tasks, "workers": opts.workers, "repeats": opts.repeats}
    return [Case(NAME, peer, params, opts.timeout) for peer in opts.peers]


def measure(peer_name: str, params: dict[str, Any]) -> dict[str, Any]:
    work = [params["iterations"]] * params["tasks"]
    peer = make_peer(peer_name)
    serial: list[float] = []
    parallel: list[float] = []
    peer.start(params["workers"])
    try:
        peer.map(tasks.busy, [1000] * (2 * params["workers"]))  # workers up before the clock starts
        for _ in range(params["repeats"]):
            started = time.perf_counter()
            expected = [tasks.busy(n) for n in work]
            serial.append(time.perf_counter() - started)
            started = time.perf_counter()
            got = peer.map(tasks.busy, work)
            parallel.append(time.perf_counter() - started)
            if got != expected:
                raise AssertionError(f"{peer_name} returned wrong results")
    finally:
        peer.close()
    return {"label": peer.label(), "serial_s": serial, "parallel_s": parallel,
            "speedups": [s / p for s, p in zip(serial, parallel)]}


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    labels = {c.peer: str(o.data.get("label", c.peer)) for c, o in results}
    speedup = {labels[c.peer]: median(o.data["speedups"]) if o.status == "ok" else None for c, o in results}
    # Ratio on the inverse of speedup (a cost), so 1.00x = the best peer's speedup, >1 = worse.
    ratio = report.ratios({k: (1 / v if v else None) for k, v in speedup.items()})
    lines = []
    for case, outcome in results:
        label = labels[case.peer]
        if outcome.status != "ok":
            lines.append(report.failed_row(label, outcome, 6))
            continue
        data = outcome.data
        lines.append([label, report.seconds(med(data["serial_s"])), report.seconds(med(data["parallel_s"])),
                      f"{speedup[label]:.2f}", report.times(ratio[label]), report.status_note(outcome)])
    iterations = results[0][0].params["iterations"] if results else 0
    head = (f"{TITLE}: {opts.s4_tasks} tasks of ~{opts.s4_seconds:g} s ({iterations:,} iterations), "
            f"{opts.workers} workers (started), median of {opts.repeats}; ÷best compares 1/speedup\n")
    return head + report.table(["peer", "serial", "parallel", "speedup", "÷best", "note"], lines)
