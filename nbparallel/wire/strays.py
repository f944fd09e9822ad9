"""Processes a task left behind, found by a mark in their environment and killed.

Every worker runs with ``NBPARALLEL_POOL=<pool>/<worker>`` in its environment, and whatever a task
starts inherits it: through ``subprocess``, ``os.fork``, ``setsid`` and double forks alike, which a
process group would not follow. So when a worker goes, the sidecar kills what carries that
worker's mark; when the sidecar goes (even by SIGKILL), it or the kernel kills what carries the
pool's. Linux only (``/proc``); elsewhere the workers' process groups are all there is.
A process started with an environment of its own (``env={}``) carries no mark and is not found.
Standard library only: the sidecar and the kernel both use it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable

#: The environment variable that marks the processes of one pool (and of one worker in it).
POOL_ENV = "NBPARALLEL_POOL"
PASSES = 5  # sweeps in a row at most: a process forking while we look is caught on the next pass


def pool_token(kernel_pid: int) -> str:
    """A mark for a new pool, unique on this machine."""
    return f"{kernel_pid}.{os.urandom(6).hex()}"


def worker_token(pool: str, worker: int) -> str:
    """The mark of one worker of ``pool`` (``sweep(pool)`` finds its processes too)."""
    return f"{pool}/{worker}"


def _marked(pid: int, needles: tuple[bytes, bytes]) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as file:
            env = b"\0" + file.read()
    except OSError:  # gone, or not ours to read
        return False
    exact, below = needles
    return exact in env + b"\0" or below in env


def find(token: str, spare: Iterable[int] = ()) -> list[int]:
    """The running processes marked ``token`` or below it, other than this one and ``spare``."""
    if not token or not os.path.isdir("/proc"):
        return []
    prefix = f"\0{POOL_ENV}={token}".encode()
    needles = (prefix + b"\0", prefix + b"/")
    skip = {os.getpid(), *spare}
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in skip and _marked(int(name), needles):
            found.append(int(name))
    return found


def sweep(token: str, spare: Iterable[int] = ()) -> int:
    """SIGKILL every process marked ``token`` or below it (this one and ``spare`` excepted); return
    how many were killed. They become zombies of their parents, or init's, which reap them."""
    spare = set(spare)
    killed = 0
    for _ in range(PASSES):
        pids = find(token, spare)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        spare.update(pids)  # zombies keep their environment until reaped: don't count them twice
    return killed


def stop(token: str, grace: float) -> int:
    """SIGTERM every process marked ``token`` or below it, wait up to ``grace`` seconds for them to
    go (a resource tracker unlinks what it tracked once its clients are gone), then ``sweep`` what is
    left; return how many got SIGKILL."""
    for pid in find(token):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and find(token):
        time.sleep(0.02)
    return sweep(token)
