"""A real Dask cluster for the tests: a scheduler and workers as separate processes (Dask's own CLIs),
optionally each inside a network namespace (``ip netns exec NAME ...``) to stand for separate hosts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _shm_leftovers import SHM, holders

SEMAPHORE_LOOK = 0.2  # seconds between looks for the semaphores the cluster's processes map
START_WITHIN = 60.0  # seconds for the scheduler and every worker to come up on a busy 2-core machine
# Each Dask process is started through this: the kernel kills it if the test process dies (even by
# pytest-timeout's os._exit, which skips every teardown), and the nannies take their workers along.
LAUNCH = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
          "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


@dataclass
class DaskCluster:
    address: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    # Named semaphores (/dev/shm/sem.*) any process of the cluster mapped, looked for every
    # SEMAPHORE_LOOK seconds while it runs: see release_orphaned_semaphores.
    semaphores: set[str] = field(default_factory=set)
    stopping: threading.Event = field(default_factory=threading.Event)
    watcher: threading.Thread | None = None

    def start_scheduler(self, folder: Path, host: str, *, netns: str | None = None,
                        env: dict[str, str] | None = None) -> str:
        file = folder / "scheduler.json"
        self._start(["distributed.cli.dask_scheduler", "--host", host, "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(file)], folder / "scheduler.log", netns, env)
        deadline = time.monotonic() + START_WITHIN
        while time.monotonic() < deadline:
            if file.exists():
                try:
                    self.address = str(json.loads(file.read_text())["address"])
                    return self.address
                except (ValueError, KeyError):
                    pass  # written only in part so far
            self._check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"the Dask scheduler did not start:\n{self.log_tail()}")

    def start_workers(self, folder: Path, host: str, count: int, *, netns: str | None = None,
                      env: dict[str, str] | None = None) -> None:
        # --nworkers N: one nanny process per worker, each restarting its worker if it dies.
        self._start(["distributed.cli.dask_worker", self.address, "--host", host, "--nworkers", str(count),
                     "--nthreads", "1", "--no-dashboard", "--death-timeout", "30"],
                    folder / f"workers-{len(self.logs)}.log", netns, env)

    def wait_for_workers(self, count: int) -> None:
        """Until ``count`` workers have registered (read from the logs: no Dask client in this process)."""
        deadline = time.monotonic() + START_WITHIN
        while time.monotonic() < deadline:
            registered = sum(log.read_text(errors="replace").count("Registered to:") for log in self.logs[1:]
                             if log.exists())
            if registered >= count:
                return
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"{count} Dask workers did not register:\n{self.log_tail()}")

    def _start(self, module_args: list[str], log: Path, netns: str | None, env: dict[str, str] | None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.logs.append(log)
        with open(log, "wb") as out:
            self.processes.append(subprocess.Popen(
                [*prefix, sys.executable, "-c", LAUNCH, "-m", *module_args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                start_new_session=True))  # a group of its own: stop() takes nannies and workers together
        if self.watcher is None:
            self.watcher = threading.Thread(target=self._watch_semaphores, name="dask-semaphores", daemon=True)
            self.watcher.start()

    def _watch_semaphores(self) -> None:
        while not self.stopping.wait(SEMAPHORE_LOOK):
            for proc in list(self.processes):
                try:
                    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for member in tree:
                    try:
                        with open(f"/proc/{member.pid}/maps", "rb") as maps:
                            for line in maps:
                                if b"/dev/shm/sem." in line:
                                    self.semaphores.add(line.rsplit(b"/dev/shm/", 1)[1].split()[0].decode())
                    except OSError:
                        continue

    def release_orphaned_semaphores(self) -> list[str]:
        """Unlink the semaphores the cluster's processes mapped that are still there with nobody holding
        them; return their names. A Dask worker the tests SIGKILL (or that a task ends with os._exit)
        cannot unlink what it made, and on Python 3.10 with distributed 2024.1 nothing does it for
        them: this is the clean-up that the killed process would have done."""
        released = []
        for name in sorted(self.semaphores):
            if (SHM / name).exists() and not holders(name):
                try:
                    (SHM / name).unlink()
                    released.append(name)
                except FileNotFoundError:
                    pass
        return released

    def _check_alive(self) -> None:
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"a Dask process exited with {proc.returncode}:\n{self.log_tail()}")

    def worker_pids(self) -> list[int]:
        """The Dask worker processes (the nannies' children)."""
        pids = []
        for proc in self.processes[1:]:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if any("spawn_main" in part for part in child.cmdline()):
                        pids.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return pids

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
                         for log in self.logs if log.exists())

    def stop(self) -> None:
        # SIGTERM first: the nannies close their workers, and multiprocessing's resource tracker
        # (which ignores SIGTERM) outlives them long enough to unlink their semaphores from
        # /dev/shm. Only what is still there after that is killed.
        for signum, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            for proc in reversed(self.processes):  # workers first, so they do not wait for the scheduler
                try:
                    os.killpg(proc.pid, signum)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait
            for proc in self.processes:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(proc.poll() is not None for proc in self.processes):
                break
        self.stopping.set()
        if self.watcher is not None:
            self.watcher.join(timeout=5)
        self.release_orphaned_semaphores()
