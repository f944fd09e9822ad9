"""S2: a fat caller. Does the caller's size slow the pool down or bloat its workers?

The child first becomes fat, like a notebook kernel after loading data: two thirds of the size in a
numpy array (pages written, so really resident) and one third in small Python objects, a list of
``(int, float)`` tuples (about 130 bytes each: ~2.7 million per GiB, ~22 million at 8 GiB, the
issue's "20 million small objects"). Then, per peer:

* first: pool start + the first result of one small task (nbparallel: sidecar start included);
* first warm: one more single-task call on the started pool;
* 200 tasks: a map of 200 small tasks on the started pool;
* worker USS/PSS: measured from outside (psutil memory_full_info) on the processes that ran tasks;
* CoW growth: each worker walks the caller's list (writing refcounts) and reports its own USS before
  and after. Only forked workers inherit the list; spawned ones (and nbparallel's) see an empty
  list, so their growth is 0 by construction: the objects are simply not there to touch.
"""

from __future__ import annotations

import time
from typing import Any

from . import report, tasks
from .harness import Case, Options, Outcome, memory
from .peers import make_peer

NAME = "s2_fat"
TITLE = "S2  fat caller: start + first result, 200 small tasks, worker memory"
BYTES_PER_OBJECT = 130  # a 2-tuple (56 B + GC header) + a float (24 B) + an int (28 B) + the list slot (8 B)


def plan(opts: Options) -> list[Case]:
    return [Case(NAME, peer, {"size_gib": size, "workers": opts.workers}, opts.timeout)
            for size in opts.s2_sizes_gib for peer in opts.peers]


def become_fat(size_gib: float) -> Any:
    """Fill this process with an array and many small objects; return the array (keep it alive)."""
    import numpy as np

    total = int(size_gib * 2**30)
    array = np.ones(total * 2 // 3 // 8)  # np.ones writes every page: resident, not just reserved
    count = total // 3 // BYTES_PER_OBJECT
    tasks.FAT_OBJECTS[:] = [(i, float(i)) for i in range(count)]
    return array


def measure(peer_name: str, params: dict[str, Any]) -> dict[str, Any]:
    import psutil

    workers = params["workers"]
    array = become_fat(params["size_gib"])
    caller_rss = psutil.Process().memory_info().rss
    peer = make_peer(peer_name)
    result: dict[str, Any] = {"label": peer.label(), "caller_rss": caller_rss, "objects": len(tasks.FAT_OBJECTS),
                              "array_bytes": array.nbytes}
    started = time.perf_counter()
    try:
        peer.start(workers)
        peer.map(tasks.small, [0])
        result["first_s"] = time.perf_counter() - started
        started = time.perf_counter()
        peer.map(tasks.small, [1])
        result["first_warm_s"] = time.perf_counter() - started
        started = time.perf_counter()
        pids = peer.map(tasks.small, list(range(200)))
        result["tasks200_s"] = time.perf_counter() - started
        result["workers"] = {str(pid): memory(pid) for pid in sorted(set(pids))}
        if peer_name == "nbparallel":
            import nbparallel

            status = nbparallel.status()
            result["sidecar"] = {**memory(status["pid"]), "rss_peak": status.get("rss_peak")}
        # Two tasks per worker, one at a time each (the task sleeps), so every worker walks the list.
        touched = peer.map(tasks.touch_objects, list(range(2 * workers)), chunksize=1)
        growth: dict[str, dict[str, int]] = {}
        for pid, seen, before, after in touched:
            entry = growth.setdefault(str(pid), {"seen": seen, "uss_before": before, "uss_after": after})
            entry["uss_after"] = max(entry["uss_after"], after)
            entry["uss_before"] = min(entry["uss_before"], before)
        result["touch"] = growth
    finally:
        peer.close()
    del array
    return result


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    blocks = []
    firsts: dict[str, dict[float, float]] = {}  # label -> size -> first_s, for the size-ratio table
    for size in opts.s2_sizes_gib:
        rows = [(c, o) for c, o in results if c.params["size_gib"] == size]
        first, warm, many = ({_label(c, o): o.data.get(key) if o.status == "ok" else None for c, o in rows}
                             for key in ("first_s", "first_warm_s", "tasks200_s"))
        uss = {_label(c, o): _max_worker(o, "uss") for c, o in rows}
        first_ratio, warm_ratio, many_ratio = report.ratios(first), report.ratios(warm), report.ratios(many)
        uss_ratio = report.ratios(uss)
        caller = next((o.data["caller_rss"] for _, o in rows if o.status == "ok"), None)
        objects = next((o.data["objects"] for _, o in rows if o.status == "ok"), 0)
        lines = []
        for case, outcome in rows:
            label = _label(case, outcome)
            if outcome.status != "ok":
                lines.append(report.failed_row(label, outcome, 12))
                continue
            data = outcome.data
            firsts.setdefault(label, {})[size] = data["first_s"]
            growth = [t["uss_after"] - t["uss_before"] for t in data["touch"].values()]
            seen = max(t["seen"] for t in data["touch"].values())
            cow = report.mib(max(growth)) if seen else "no access"
            side = f"sidecar RSS {report.mib(data['sidecar']['rss'])}" if "sidecar" in data else None
            notes = "; ".join(n for n in (side, report.status_note(outcome)) if n) or None
            lines.append([label, report.seconds(data["first_s"]), report.times(first_ratio[label]),
                          report.seconds(data["first_warm_s"]), report.times(warm_ratio[label]),
                          report.seconds(data["tasks200_s"]), report.times(many_ratio[label]),
                          report.mib(uss[label]), report.times(uss_ratio[label]),
                          report.mib(_max_worker(outcome, "pss")), cow, notes])
        head = (f"{TITLE}\ncaller {size:g} GiB (RSS {report.mib(caller)}, {objects:,} small objects), "
                f"{opts.workers} workers, one run per peer\n")
        blocks.append(head + report.table(
            ["peer", "first", "÷best", "first warm", "÷best", "200 tasks", "÷best", "worker USS", "÷best", "worker PSS",
             "CoW growth", "note"], lines))
    if len(opts.s2_sizes_gib) > 1:
        small, big = min(opts.s2_sizes_gib), max(opts.s2_sizes_gib)
        lines = [[label, report.seconds(by.get(small)), report.seconds(by.get(big)),
                  report.times(by[big] / by[small]) if by.get(small) and by.get(big) else None]
                 for label, by in firsts.items()]
        blocks.append(f"S2  does the caller's size slow the first result? ({big:g} GiB ÷ {small:g} GiB)\n"
                      + report.table(["peer", f"first @{small:g} GiB", f"first @{big:g} GiB", "growth"], lines))
    return "\n\n".join(blocks)


def _label(case: Case, outcome: Outcome) -> str:
    return str(outcome.data.get("label", case.peer))


def _max_worker(outcome: Outcome, key: str) -> float | None:
    if outcome.status != "ok":
        return None
    values = [m[key] for m in outcome.data.get("workers", {}).values() if key in m]
    return max(values) if values else None
