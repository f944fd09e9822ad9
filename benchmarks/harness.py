"""Run one measurement in a fresh child process, watch every process it starts, clean up after it.

Why a child per measurement: the caller's memory, imports and leftover pools would otherwise leak
from one peer into the next (a fork pool copies whatever the previous peer left in the caller).
Why the watcher: a peer that hangs, or forgets a worker, must not outlive the run or skew the next
measurement; the parent remembers every descendant it saw and kills any that outlive the child.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
OUT_ENV = "NBP_BENCH_OUT"  # where a child writes its JSON (stdout is left to the peers' chatter)
WATCH_INTERVAL = 0.5  # seconds between scans for new descendants; cheap beside the work measured
GRACE = 3.0  # seconds a descendant may take to exit after its parent child process ended


@dataclass
class Options:
    """What run.py's flags decided; every scenario's ``plan`` reads it."""

    quick: bool
    workers: int
    repeats: int
    peers: list[str]
    s1_items: int
    s1_dask_items: int
    s2_sizes_gib: list[float]
    s3_mib: int
    s4_seconds: float
    s4_tasks: int
    s6_mb: int
    s6_tasks: int
    s5_timeout: float
    timeout: float  # seconds allowed to one child of S1-S4


@dataclass
class Case:
    """One child run: which scenario and peer, with what parameters and arguments."""

    scenario: str
    peer: str
    params: dict[str, Any]
    timeout: float
    args: list[str] = field(default_factory=list)  # default: python -m benchmarks.child ...

    def child_args(self) -> list[str]:
        return self.args or ["-m", "benchmarks.child", self.scenario, self.peer, json.dumps(self.params)]


@dataclass
class Outcome:
    """What one child run produced."""

    status: str  # "ok", "error" (it reported an exception), "timeout" or "crashed"
    data: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    leaked: list[str] = field(default_factory=list)  # still alive GRACE s after the child ended: killed
    killed: list[str] = field(default_factory=list)  # the child and its processes, killed on timeout
    stderr_tail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def child_env() -> dict[str, str]:
    """The environment for children: the repo root importable by every worker, whatever starts it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_child(args: list[str], timeout: float) -> Outcome:
    """Run ``python ARGS`` in its own session; return its JSON, or how it failed."""
    with tempfile.TemporaryDirectory(prefix="nbp-bench-") as tmp:
        out_path = Path(tmp) / "out.json"
        err_path = Path(tmp) / "stderr.txt"
        env = child_env()
        env[OUT_ENV] = str(out_path)
        # A private temporary folder, removed with this one: what a killed child leaves there
        # (multiprocessing's pymp-* socket folders, Dask's scratch space) goes with it.
        (Path(tmp) / "tmp").mkdir()
        env["TMPDIR"] = str(Path(tmp) / "tmp")
        started = time.perf_counter()
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            seen: dict[int, psutil.Process] = {}
            timed_out = False
            while True:
                _remember(proc.pid, seen)
                try:
                    proc.wait(timeout=WATCH_INTERVAL)
                    break
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - started > timeout:
                        timed_out = True
                        _remember(proc.pid, seen)
                        proc.kill()
                        proc.wait()
                        break
        wall = time.perf_counter() - started
        if timed_out:
            # Kill everything but the resource trackers first: once the processes holding their
            # pipe are gone, they unlink the named semaphores (/dev/shm/sem.mp-*) and segments
            # the killed processes registered. Killing them too would leave those behind.
            trackers = [p for p in seen.values() if _is_tracker(p)]
            killed = _reap([p for p in seen.values() if p not in trackers], grace=0.0)
            killed += _reap(trackers, grace=GRACE)
            tail = err_path.read_text(errors="replace")[-2000:]
            return Outcome("timeout", wall_s=wall, killed=killed, stderr_tail=tail)
        leaked = _reap(seen.values(), grace=GRACE)
        tail = err_path.read_text(errors="replace")[-2000:]
        if not out_path.exists():
            return Outcome("crashed", {"returncode": proc.returncode}, wall_s=wall, leaked=leaked, stderr_tail=tail)
        data = json.loads(out_path.read_text())
        return Outcome("error" if "error" in data else "ok", data, wall_s=wall, leaked=leaked, stderr_tail=tail)


def _remember(pid: int, seen: dict[int, psutil.Process]) -> None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            seen.setdefault(child.pid, child)
    except psutil.Error:
        pass


def _reap(processes: Any, grace: float) -> list[str]:
    """Wait ``grace`` seconds for the processes to exit; kill and name the ones that don't."""
    alive = [p for p in processes if _alive(p)]
    if alive and grace:
        _, alive = psutil.wait_procs(alive, timeout=grace)
    leaked = []
    for proc in alive:
        try:
            leaked.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=2)
    return leaked


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return "resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running checks the PID wasn't reused
    except psutil.Error:
        return False


def emit(data: dict[str, Any]) -> None:
    """Child side: hand the result to the parent."""
    Path(os.environ[OUT_ENV]).write_text(json.dumps(data))


def med(values: list[float]) -> float | None:
    return median(values) if values else None


def memory(pid: int) -> dict[str, int]:
    """USS, PSS and RSS of one process, in bytes (empty if it is gone)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return {}
    return {"uss": info.uss, "pss": getattr(info, "pss", 0), "rss": info.rss}


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) used so far by this process ("self") and each live descendant."""
    me = psutil.Process()
    out: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out["self" if proc.pid == me.pid else str(proc.pid)] = times.user + times.system
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(this process, its descendants) CPU seconds between two ``cpu_seconds`` snapshots."""
    caller = after.get("self", 0.0) - before.get("self", 0.0)
    helpers = sum(t - before.get(pid, 0.0) for pid, t in after.items() if pid != "self")
    return caller, helpers


def source_info() -> dict[str, str]:
    """Which nbparallel was measured: its path and, from git, the commit and whether it had edits."""
    import nbparallel

    info = {"path": str(Path(nbparallel.__file__).parent)}
    if os.environ.get("NBP_BENCH_SOURCE"):
        info["source"] = os.environ["NBP_BENCH_SOURCE"]
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:  # not a checkout (e.g. a copy made with git archive): say nothing
            info["commit"] = head.stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--", "nbparallel"], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            info["engine_edits"] = "uncommitted edits in nbparallel/" if dirty else "none"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine_info() -> dict[str, Any]:
    """Where and with what the run happened, for RESULTS.md."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for dist in ("nbparallel", "numpy", "cloudpickle", "psutil", "joblib", "mpire", "dask", "distributed"):
        try:
            versions[dist] = version(dist)  # metadata, not __version__: mpire has none
        except PackageNotFoundError:  # not installed: the peer's rows will say so
            versions[dist] = "missing"
    try:
        from joblib.externals import loky

        versions["loky"] = loky.__version__
    except Exception:
        pass
    try:
        from nbparallel.config import usable_cpus

        usable = usable_cpus()
    except Exception:
        usable = os.cpu_count() or 1
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "load_avg": list(os.getloadavg()),
        "nbparallel_source": source_info(),
    }
