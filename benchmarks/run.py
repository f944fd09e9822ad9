"""Run the benchmarks: ``python -m benchmarks.run [--quick] [--scenarios S1,S4] [--json out.json]``.

Every measurement runs in a fresh child process (see harness.py); the parent only plans, watches,
cleans up and prints. Tables go to stdout, progress to stderr, everything measured to the JSON file.
See benchmarks/README.md for what each scenario measures and how to read the tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .harness import ROOT, Case, Options, Outcome, machine_info, run_child
from .peers import TIMING_PEERS

SCENARIOS = {"S1": "s1_tiny", "S2": "s2_fat", "S3": "s3_array", "S4": "s4_scaling", "S5": "s5_kinds",
             "S6": "s6_joblib"}


def parse(argv: list[str]) -> tuple[Options, list[str], Path]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and one repeat (S2 0.5 and 2 GiB, S3 256 MiB, S4 0.1 s tasks)")
    parser.add_argument("--scenarios", default="S1,S2,S3,S4,S5,S6", help="comma-separated, e.g. S1,S4")
    parser.add_argument("--peers", default=",".join(TIMING_PEERS), help="comma-separated subset for S1-S4")
    parser.add_argument("--json", type=Path, help="where to write the results (default benchmarks/results/run-<time>.json)")
    parser.add_argument("--workers", type=int, default=None, help="workers per peer (default: usable CPUs)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3; quick 1)")
    parser.add_argument("--s1-items", type=int, default=100_000)
    parser.add_argument("--s1-dask-items", type=int, default=None,
                        help="items for Dask's one-task-per-item row (default 5000; quick 2000)")
    parser.add_argument("--s2-sizes", default=None,
                        help="caller sizes in GiB (default 1,4; quick 0.5,2; the issue's 1,8 needs ~20 GiB free)")
    parser.add_argument("--s3-mib", type=int, default=None, help="array size in MiB (default 1024; quick 256)")
    parser.add_argument("--s4-seconds", type=float, default=None, help="serial length of one task (default 0.25; quick 0.1)")
    parser.add_argument("--s4-tasks", type=int, default=16)
    parser.add_argument("--s6-mb", type=int, default=200, help="S6: the array's size in MB (default 200)")
    parser.add_argument("--s6-tasks", type=int, default=40, help="S6: delayed(np.sum)(a) calls per Parallel call")
    parser.add_argument("--s5-timeout", type=float, default=None, help="seconds before a case counts as hanging (default 20; quick 10)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed to one S1-S4 child")
    args = parser.parse_args(argv)
    quick = args.quick
    from nbparallel.config import usable_cpus

    opts = Options(
        quick=quick,
        workers=args.workers or usable_cpus(),
        repeats=args.repeats or (1 if quick else 3),
        peers=[p for p in args.peers.split(",") if p],
        s1_items=args.s1_items,
        s1_dask_items=args.s1_dask_items or (2000 if quick else 5000),
        s2_sizes_gib=[float(s) for s in (args.s2_sizes or ("0.5,2" if quick else "1,4")).split(",")],
        s3_mib=args.s3_mib or (256 if quick else 1024),
        s4_seconds=args.s4_seconds or (0.1 if quick else 0.25),
        s4_tasks=args.s4_tasks,
        s6_mb=args.s6_mb,
        s6_tasks=args.s6_tasks,
        s5_timeout=args.s5_timeout or (10 if quick else 20),
        timeout=args.timeout,
    )
    chosen = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    out = args.json or ROOT / "benchmarks" / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return opts, chosen, out


def run_scenario(module: ModuleType, opts: Options) -> list[tuple[Case, Outcome]]:
    results = []
    for case in module.plan(opts):
        print(f"  {case.scenario} {case.peer} {_brief(case.params)} ...", end="", file=sys.stderr, flush=True)
        outcome = run_child(case.child_args(), case.timeout)
        note = outcome.status if outcome.status != "error" else f"error: {outcome.data.get('error')}"
        leaked = f", killed {len(outcome.leaked)} leftover process(es)" if outcome.leaked else ""
        if outcome.killed:
            leaked = f", killed its {len(outcome.killed)} process(es)"
        print(f" {note} ({outcome.wall_s:.1f} s{leaked})", file=sys.stderr, flush=True)
        results.append((case, outcome))
    return results


def _brief(params: dict[str, Any]) -> str:
    keys = ("size_gib", "kind", "mode")
    return " ".join(f"{k}={params[k]}" for k in keys if k in params)


def main(argv: list[str] | None = None) -> None:
    opts, chosen, out = parse(sys.argv[1:] if argv is None else argv)
    meta = machine_info()
    source = meta["nbparallel_source"]
    print(f"nbparallel benchmarks, {meta['date']}: {meta['usable_cpus']} usable CPUs, {meta['ram_gib']} GiB, "
          f"Python {meta['python']}, load average {meta['load_avg'][0]:.2f}; nbparallel from {source['path']} "
          f"({source.get('source') or source.get('commit', '?')}, edits: {source.get('engine_edits', 'n/a')})",
          file=sys.stderr)
    record: dict[str, Any] = {"meta": meta, "options": vars(opts), "scenarios": {}}
    tables = []
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{SCENARIOS[name]}")
        print(f"{name}: {module.TITLE}", file=sys.stderr)
        started = time.perf_counter()
        results = run_scenario(module, opts)
        text = module.render(results, opts)
        tables.append(text)
        print("\n" + text + "\n", flush=True)
        record["scenarios"][name] = {
            "title": module.TITLE,
            "seconds": round(time.perf_counter() - started, 1),
            "table": text,
            "cases": [{"peer": c.peer, "params": c.params, **o.to_json()} for c, o in results],
        }
    record["meta"]["load_avg_end"] = list(__import__("os").getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"results written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
