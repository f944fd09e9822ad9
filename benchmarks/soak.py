"""Soak: a million tasks through imap, then 200 calls in a row, watching memory and leaks.

    .venv/bin/python -m benchmarks.soak [--tasks 1000000] [--calls 200]

Prints the RSS of the caller, the sidecar and each worker at the start, at the peak and at the end,
and what leaked after the calls (processes, file descriptors, shared-memory segments): all should
be flat and nothing should leak.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import psutil

import nbparallel


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _memfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:nbparallel")
        except OSError:
            pass
    return count


class Sampler(threading.Thread):
    """RSS of the caller, the sidecar and the workers, every ``interval`` seconds."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[int, int, int]] = []  # caller, sidecar, largest worker
        self.halt = threading.Event()

    def sample(self) -> tuple[int, int, int]:
        me = psutil.Process()
        sidecar = [p for p in me.children() if "nbparallel.sidecar" in " ".join(p.cmdline())]
        side = sidecar[0].memory_info().rss if sidecar else 0
        workers = [w.memory_info().rss for w in (sidecar[0].children() if sidecar else [])]
        return me.memory_info().rss, side, max(workers, default=0)

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            try:
                self.samples.append(self.sample())
            except psutil.Error:
                continue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    status = nbparallel.status()
    sidecar = status["pid"]
    sampler = Sampler()
    start = sampler.sample()
    sampler.start()
    began = time.perf_counter()
    total = 0
    for value in nbparallel.imap(lambda x: x & 1, range(args.tasks), progress=False):
        total += value
    elapsed = time.perf_counter() - began
    sampler.halt.set()
    sampler.join()
    end = sampler.sample()
    peaks = [max(s[i] for s in sampler.samples + [start, end]) for i in range(3)]
    mib = 2**20
    print(f"{args.tasks:,} tasks through imap in {elapsed:.2f} s ({args.tasks / elapsed:,.0f}/s), checksum {total}")
    print(f"{'process':<10}{'start MiB':>12}{'peak MiB':>12}{'end MiB':>12}")
    for i, name in enumerate(("caller", "sidecar", "worker")):
        print(f"{name:<10}{start[i] / mib:>12.1f}{peaks[i] / mib:>12.1f}{end[i] / mib:>12.1f}")

    before = (len(psutil.Process().children(recursive=True)), _fds(os.getpid()), _fds(sidecar),
              _memfds(os.getpid()) + _memfds(sidecar))
    import numpy as np

    array = np.ones(2**18)  # 2 MiB: travels through shared memory
    for k in range(args.calls):
        nbparallel.map(lambda a: float(a[0]) + k, [array, array], progress=False)
    time.sleep(0.5)
    after = (len(psutil.Process().children(recursive=True)), _fds(os.getpid()), _fds(sidecar),
             _memfds(os.getpid()) + _memfds(sidecar))
    names = ("processes", "caller fds", "sidecar fds", "shm segments held")
    print(f"after {args.calls} calls with a 2 MiB array each:")
    for name, b, a in zip(names, before, after):
        print(f"  {name:<18} {b:>4} -> {a:<4} {'ok' if a <= b else 'LEAK'}")
    nbparallel.shutdown()


if __name__ == "__main__":
    main()
