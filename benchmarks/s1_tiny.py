"""S1: 100,000 tiny tasks (``x * 2``): the per-item overhead of each peer.

"cold" is pool start plus the call (for nbparallel: the sidecar and its workers start inside the
timed region); "warm" is the same call on a pool that already ran a warm-up call (for nbparallel:
the sidecar already started, as after ``%load_ext``). Both are medians over ``repeats``; cold
repeats are full start/close cycles in the same child, so from the second cycle on a library's
lazy imports are already done (the JSON keeps every sample, the first included).
Dask runs twice: dask.bag (items in partitions, its idiom for tiny tasks) on every item, and
client.map with one task per item on fewer items (at ~500 tasks/s all of them would take minutes).
"""

from __future__ import annotations

import math
import time
from typing import Any

from . import report
from .harness import Case, Options, Outcome, cpu_seconds, cpu_used, med
from .peers import Dask, make_peer
from .tasks import tiny

NAME = "s1_tiny"
TITLE = "S1  tiny tasks (x * 2)"


def plan(opts: Options) -> list[Case]:
    cases = []
    for peer in opts.peers:
        params: dict[str, Any] = {"n": opts.s1_items, "workers": opts.workers, "repeats": opts.repeats}
        if peer == "dask":
            cases.append(Case(NAME, "dask-bag", {**params, "peer": "dask", "mode": "bag"}, opts.timeout))
            params = {**params, "peer": "dask", "n": min(opts.s1_items, opts.s1_dask_items), "mode": "per-item"}
            cases.append(Case(NAME, "dask-per-item", params, opts.timeout))
        else:
            cases.append(Case(NAME, peer, params, opts.timeout))
    return cases


def measure(peer_name: str, params: dict[str, Any]) -> dict[str, Any]:
    n, workers, repeats = params["n"], params["workers"], params["repeats"]
    peer = make_peer(params.get("peer", peer_name))
    items = list(range(n))
    expected = [2 * x for x in items]

    def call() -> list[Any]:
        if params.get("mode") == "bag":
            assert isinstance(peer, Dask)
            return peer.map_batched(tiny, items)
        return peer.map(tiny, items)

    cold: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            peer.start(workers)
            out = call()
            cold.append(time.perf_counter() - started)
        finally:
            peer.close()
        if out != expected:
            raise AssertionError(f"{peer_name} returned wrong results")
    warm: list[float] = []
    peer.start(workers)
    try:
        peer.map(tiny, items[:1000])  # every worker up and holding the function
        for _ in range(repeats):
            started = time.perf_counter()
            out = call()
            warm.append(time.perf_counter() - started)
            if out != expected:
                raise AssertionError(f"{peer_name} returned wrong results")
        # Where the CPU goes: the kernel counts CPU time in 10 ms ticks, so average it over
        # enough warm calls to fill ~0.6 s (untimed, apart from the timings above).
        calls = min(10, max(1, math.ceil(0.6 / (med(warm) or 0.6))))
        before = cpu_seconds()
        for _ in range(calls):
            call()
        caller, helpers = cpu_used(before, cpu_seconds())
    finally:
        peer.close()
    return {"label": peer.label() + (" (bag)" if params.get("mode") == "bag" else ""), "n": n,
            "cold_s": cold, "warm_s": warm, "warm_cpu_caller_s": caller / calls,
            "warm_cpu_helpers_s": helpers / calls, "cpu_calls": calls}


def render(results: list[tuple[Case, Outcome]], opts: Options) -> str:
    # Ratios are taken on time per item, so the per-item Dask row (fewer items) compares fairly.
    cold_cost: dict[str, float | None] = {}
    warm_cost: dict[str, float | None] = {}
    rows: list[tuple[str, Case, Outcome]] = []
    for case, outcome in results:
        data = outcome.data
        label = data.get("label", case.peer)
        if case.peer == "dask-per-item":
            label = f"dask (client.map, {case.params['n']:,} items)"
        rows.append((label, case, outcome))
        ok = outcome.status == "ok"
        cold_cost[label] = med(data["cold_s"]) / data["n"] if ok and data["cold_s"] else None
        warm_cost[label] = med(data["warm_s"]) / data["n"] if ok and data["warm_s"] else None
    cold_ratio = report.ratios(cold_cost)
    warm_ratio = report.ratios(warm_cost)
    lines = []
    for label, case, outcome in rows:
        data = outcome.data
        if outcome.status != "ok":
            lines.append(report.failed_row(label, outcome, 10))
            continue
        cold, warm = med(data["cold_s"]), med(data["warm_s"])
        lines.append([label, report.seconds(cold), report.rate(data["n"], cold), report.times(cold_ratio[label]),
                      report.seconds(warm), report.rate(data["n"], warm), report.times(warm_ratio[label]),
                      report.seconds(data["warm_cpu_caller_s"]), report.seconds(data["warm_cpu_helpers_s"]),
                      report.status_note(outcome)])
    header = (f"{TITLE}: {opts.s1_items:,} items, {opts.workers} workers, median of {opts.repeats}\n"
              "cold = pool start + call; warm = call on a started pool (nbparallel: sidecar already up);\n"
              "CPU = CPU time per warm call in the caller, and in all its helper processes together\n")
    return header + report.table(
        ["peer", "cold", "cold rate", "cold ÷best", "warm", "warm rate", "warm ÷best", "CPU caller",
         "CPU others", "note"], lines)
