"""The cost per task of nbparallel on a Dask cluster, next to plain Dask ``client.map``, in one run.

    python benchmarks/dask_overhead.py [--workers 2] [--tasks 2000] [--repeats 3]

Starts a Dask scheduler and workers (one thread each) as separate processes on 127.0.0.1, with
Dask's own command-line entry points, then times on that cluster, alternating the rows:

- ``dask client.map``: plain Dask from this process, one task per item, then ``client.gather``;
- ``nbparallel chunksize=1``: ``nbparallel.map`` through the Dask bridge, one Dask task per item
  (the same granularity as the row above: the difference is what the bridge adds);
- ``nbparallel auto``: ``nbparallel.map`` with its default chunking (what a user gets).

Two workloads: no-op tasks (``x``: the overhead itself) and 5 ms tasks (``time.sleep``). The per-task
figure is the call's wall time divided by the number of tasks (median of the repeats), so with W
workers a task that takes ``t`` costs about ``t / W`` plus the overhead. Every process it starts is
stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def noop(x: int) -> int:
    return x


def five_ms(x: int) -> int:
    time.sleep(0.005)
    return x


def start_cluster(workers: int, folder: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    file = folder / "scheduler.json"
    procs = []
    for args, log in (
        (["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
          "--scheduler-file", str(file)], "scheduler.log"),
        (["distributed.cli.dask_worker", "--scheduler-file", str(file), "--host", "127.0.0.1", "--nworkers",
          str(workers), "--nthreads", "1", "--no-dashboard"], "workers.log"),
    ):
        with open(folder / log, "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True))
        while not file.exists():  # the workers read the scheduler's address from this file
            time.sleep(0.05)
    time.sleep(0.2)
    return json.loads(file.read_text())["address"], procs


def stop_cluster(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def timed(run: Callable[[], list[Any]], expected: list[Any]) -> float:
    started = time.perf_counter()
    got = run()
    seconds = time.perf_counter() - started
    assert got == expected, "wrong results"
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2000, help="no-op tasks per call")
    parser.add_argument("--sleep-tasks", type=int, default=400, help="5 ms tasks per call")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()

    import distributed

    import nbparallel

    with tempfile.TemporaryDirectory(prefix="nbparallel-bench-") as tmp:
        address, procs = start_cluster(opts.workers, Path(tmp))
        client = None
        try:
            client = distributed.Client(address, set_as_default=False)
            client.wait_for_workers(opts.workers, timeout=60)
            nbparallel.configure(cluster=address)

            def dask_map(fn: Callable[[int], int], n: int) -> list[Any]:
                return list(client.gather(client.map(fn, range(n), pure=False)))

            rows: dict[tuple[str, str], list[float]] = {}
            workloads = [("no-op", noop, opts.tasks), ("5 ms", five_ms, opts.sleep_tasks)]
            for label, fn, n in workloads:
                expected = list(range(n))
                runners = {
                    "dask client.map": lambda: dask_map(fn, n),
                    "nbparallel chunksize=1": lambda: nbparallel.map(fn, range(n), chunksize=1, progress=False),
                    "nbparallel auto": lambda: nbparallel.map(fn, range(n), progress=False),
                }
                for run in runners.values():  # warm up: imports, function caches, connections
                    timed(run, expected)
                for _ in range(opts.repeats):
                    for name, run in runners.items():
                        rows.setdefault((label, name), []).append(timed(run, expected) / n)
        finally:
            nbparallel.configure(cluster=None)
            nbparallel.shutdown()
            if client is not None:
                client.close()
            stop_cluster(procs)

    print(f"Dask {distributed.__version__}, {opts.workers} workers x 1 thread on 127.0.0.1, "
          f"{os.cpu_count()} CPUs; median of {opts.repeats}; wall time per task")
    print(f"{'workload':<8} {'row':<24} {'per task':>10} {'vs client.map':>14}")
    for (label, name), samples in rows.items():
        per_task = statistics.median(samples)
        base = statistics.median(rows[(label, "dask client.map")])
        print(f"{label:<8} {name:<24} {per_task * 1e6:>8.0f} µs {per_task / base:>13.2f}x")


if __name__ == "__main__":
    main()
