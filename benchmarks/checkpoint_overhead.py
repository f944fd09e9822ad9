"""What a checkpoint costs: 100,000 tiny tasks with and without ``checkpoint=``, and resuming.

    python -m benchmarks.checkpoint_overhead [--items 100000] [--repeats 5] [--workers N] [--json out.json]

On a warm sidecar (a warm-up call first, as after ``%load_ext``), each repeat runs the same map
without a checkpoint and with a fresh journal, in alternation, so both see the same machine load.
Then, with a complete journal of that many items:

- ``resume (nothing left)``: the call run again: open the journal, check the function, compare every
  item, read every value back; nothing runs;
- ``resume (half left)``: the same with every other item missing from the journal (the other half
  runs), against the same map of that half without a checkpoint;
- ``plan``: only finding what is left (journal.py/sweep.py's ``plan``), without running anything.

Medians; the JSON keeps every sample. The issue's targets: at most 1.1x without, and a resume of a
100,000-item journal under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbparallel
from nbparallel.kernel.journal import Journal
from nbparallel.kernel.sweep import plan

from .tasks import tiny


def _timed(call: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workers", type=int, help="pool size (default: every usable CPU)")
    args = parser.parse_args(argv)
    if args.workers:
        nbparallel.configure(workers=args.workers)
    n = args.items
    items = list(range(n))
    expected = [tiny(x) for x in items]
    samples: dict[str, list[float]] = {"plain": [], "checkpoint": [], "resume_all": [], "resume_half": [],
                                       "plain_half": [], "plan": []}
    with tempfile.TemporaryDirectory(prefix="nbp-ckpt-bench-") as tmp:
        nbparallel.map(tiny, items, progress=False)  # warm: the sidecar, the workers, the chunk sizes
        nbparallel.map(tiny, items, progress=False, checkpoint=os.path.join(tmp, "warm.db"))
        for repeat in range(args.repeats):
            took, out = _timed(lambda: nbparallel.map(tiny, items, progress=False))
            assert out == expected
            samples["plain"].append(took)
            path = os.path.join(tmp, f"sweep-{repeat}.db")
            took, out = _timed(lambda: nbparallel.map(tiny, items, progress=False, checkpoint=path))
            assert out == expected
            samples["checkpoint"].append(took)
            took, out = _timed(lambda: nbparallel.map(tiny, items, progress=False, checkpoint=path))
            assert out == expected
            samples["resume_all"].append(took)
            journal = Journal.open(path, write=False)
            took, (_, restored, _) = _timed(lambda: plan(journal, items, True))
            journal.close()
            assert restored.count(1) == n
            samples["plan"].append(took)
            _drop_every_other(path, n)
            took, out = _timed(lambda: nbparallel.map(tiny, items, progress=False, checkpoint=path))
            assert out == expected
            samples["resume_half"].append(took)
            took, _ = _timed(lambda: nbparallel.map(tiny, items[1::2], progress=False))
            samples["plain_half"].append(took)
            print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in samples.items()),
                  file=sys.stderr)
        size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{n:,} tiny tasks, {nbparallel.status()['workers'].__len__()} workers, median of {args.repeats}")
    print(f"  map without a checkpoint      {med['plain'] * 1e3:8.1f} ms")
    print(f"  map with a fresh checkpoint   {med['checkpoint'] * 1e3:8.1f} ms   ({med['checkpoint'] / med['plain']:.2f}x)")
    best = {k: min(v) for k, v in samples.items()}  # the least disturbed run of each: a busy machine is noisy
    print(f"    best of {args.repeats}: {best['plain'] * 1e3:.1f} ms without, {best['checkpoint'] * 1e3:.1f} ms with "
          f"({best['checkpoint'] / best['plain']:.2f}x)")
    print(f"  resume, nothing left          {med['resume_all'] * 1e3:8.1f} ms")
    print(f"    of which finding what is left {med['plan'] * 1e3:6.1f} ms")
    print(f"  resume, half left             {med['resume_half'] * 1e3:8.1f} ms   "
          f"(the same half without a checkpoint: {med['plain_half'] * 1e3:.1f} ms)")
    print(f"  journal size                  {size / 2**20:8.2f} MiB")
    report = {"items": n, "repeats": args.repeats, "samples": samples, "median": med, "best": best, "journal_bytes": size,
              "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _drop_every_other(path: str, n: int) -> None:
    """Make the journal hold only the odd items: rewrite its batches as if the even ones never finished."""
    journal = Journal.open(path, write=True)
    rows = journal.rows(newest_first=False)
    journal.db.execute("DELETE FROM outcomes")
    for row in rows:
        values = row.outcomes()
        keep = [(i, v) for i, v in zip(row.indices, values) if i % 2]
        if keep:
            journal.call = row.call
            journal.record([i for i, _ in keep], [i for i, _ in keep], [v for _, v in keep])
    journal.close()


if __name__ == "__main__":
    main()
