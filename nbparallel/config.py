"""Tunables, in one place, and how many CPUs this process may really use."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

#: Set in the environment of the processes nbparallel starts (runner, worker): the package then
#: leaves the joblib hook alone. Workers remove it once started, so a task's own processes are plain.
ROLE_ENV = "NBPARALLEL_ROLE"

#: True in a worker process: an nbparallel call that a task makes runs right there, serially, and
#: never starts a sidecar of its own (kernel/inline.py). Set by the worker as it starts.
in_worker = False


@dataclass
class Settings:
    """What ``nbparallel.configure`` changes. Every field is documented where it is used."""

    #: Pool size; None means every usable CPU (cgroup quota and affinity counted).
    workers: int | None = None
    #: Modules every worker imports once at start, before any work arrives.
    preload: list[str] = field(default_factory=list)
    #: Extra environment variables for the workers.
    env: dict[str, str] = field(default_factory=dict)
    #: Limit BLAS/OpenMP threads in each worker so N workers don't start N x cores threads.
    limit_threads: bool = True
    #: Calls shorter than this (seconds) show no progress bar.
    progress_after: float = 1.0
    #: Prefix each line a worker prints with the item it was running.
    tag_output: bool = True
    #: Replace a worker after it has run this many items (None: never). Cures slow leaks.
    max_tasks_per_worker: int | None = None
    #: Worker output a call passes on to the caller before it drops the rest (a notebook drowns
    #: in megabytes of text).
    max_output_bytes: int = 2 * 2**20
    #: Where calls run: None for this machine's sidecar; a Dask scheduler's address
    #: ("tcp://host:8786"), or "local" for a Dask LocalCluster, for the Dask bridge (cluster/bridge.py).
    cluster: str | None = None


# Chunking: a chunk should take about CHUNK_SECONDS of work, so progress moves smoothly and
# the per-chunk cost (a few hundred microseconds of routing) stays small beside the work.
CHUNK_SECONDS = 0.05
MAX_CHUNK_ITEMS = 20_000
MAX_CHUNK_BYTES = 8 * 2**20
# Items in flight (sent, not yet handed to the caller), in chunks per worker: enough to keep every
# worker busy while results travel, few enough that a 10-million-item generator never sits in memory.
CHUNKS_IN_FLIGHT_PER_WORKER = 4
# ...and a bound in bytes, so big items don't pile up in the sidecar either.
MAX_BYTES_IN_FLIGHT = 256 * 2**20
# Coroutine functions (see nbparallel.map): items in flight across a call unless concurrency= says;
# the base of the exponential backoff between retries unless backoff= says (plain functions retry at
# once unless it says); and, with rate=, about how many seconds of starts one chunk carries.
ASYNC_CONCURRENCY = 64
ASYNC_BACKOFF = 0.5
PACED_CHUNK_SECONDS = 0.25
# How long to wait for the sidecar to confirm a cancellation before raising anyway.
CANCEL_WAIT = 0.8
# The sidecar's liveness (kernel/runner.py): while a call waits on it, a sidecar that has said
# nothing for LIVENESS_QUIET seconds is asked for its status; one that neither answers nor reads what
# it was sent for LIVENESS_LIMIT seconds is frozen or wedged (SIGSTOP, swapping): it is killed and
# the call raises SidecarDied.
LIVENESS_QUIET = 1.0
LIVENESS_LIMIT = 5.0
# A stopped worker's process group, and what its tasks started, get SIGTERM and then, this many seconds
# later, SIGKILL: a resource tracker (loky's, multiprocessing's) unlinks what it tracked meanwhile.
KILL_GRACE = 1.0
# How long the sidecar may take to start and answer its first message.
START_TIMEOUT = 30.0
# The Dask bridge answers once it has reached the scheduler (or started a LocalCluster): longer.
CLUSTER_CONNECT_TIMEOUT = 10.0  # seconds the bridge tries to reach a scheduler
CLUSTER_START_TIMEOUT = 60.0

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                "NUMEXPR_NUM_THREADS")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB", "512 MiB", "1.5g"."""
    if isinstance(size, bool):
        raise TypeError(f"a memory size must be an int or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        text = size.strip().lower().replace(" ", "")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        if not number or unit not in _UNITS:
            raise ValueError(f"cannot read the memory size {size!r}; write e.g. '2GB', '512MiB' or 2_000_000_000")
        value = int(float(number) * _UNITS[unit])
    else:
        raise TypeError(f"a memory size must be an int or a string like '2GB', got {size!r}")
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {size!r}")
    return value


def usable_cpus() -> int:
    """CPUs this process may use: affinity, then the cgroup CPU quota (v2 or v1), at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _read(path: str) -> str:
    # open(), not pathlib: this module is imported by the sidecar and every worker at their start
    with open(path) as file:
        return file.read()


def _cgroup_quota() -> float | None:
    try:
        text = _read("/sys/fs/cgroup/cpu.max").split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(_read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"))
        period = int(_read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def resolve_workers(workers: int | None) -> int:
    """joblib's n_jobs convention: None or -1 all usable CPUs, -2 all but one, n exactly n."""
    cpus = usable_cpus()
    if workers is None:
        return cpus
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TypeError(f"workers must be an int or None, got {workers!r}")
    if workers > 0:
        return workers
    if workers < 0 and cpus + 1 + workers >= 1:
        return cpus + 1 + workers
    raise ValueError(
        f"workers={workers} leaves no worker on this machine ({cpus} usable CPUs). Use a positive "
        "number, None or -1 for all CPUs, or -2 for all but one."
    )


def thread_limits(workers: int) -> dict[str, str]:
    """Environment that keeps each worker's BLAS/OpenMP pool to its share of the CPUs."""
    share = str(max(1, usable_cpus() // max(1, workers)))
    return {name: share for name in _THREAD_VARS if name not in os.environ}
