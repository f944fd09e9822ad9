"""Worker processes as the sidecar sees them: start, talk to, watch, kill."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from ..config import KILL_GRACE, ROLE_ENV
from ..wire import strays
from ..wire.channel import Channel
from ..wire.slot import Slot
from .jobs import Chunk



def _slot_file(tmpdir: str | None) -> Any:
    """Memory to share with one worker. Linux: an anonymous memfd, so no file ever exists. Elsewhere
    a temporary file in the sidecar's private directory, unlinked as soon as it is made."""
    if tmpdir is None:
        return open(os.memfd_create("nbparallel-slot"), "w+b")
    return tempfile.TemporaryFile(dir=tmpdir)


REAP_WAIT = 0.25  # seconds a worker whose socket closed may take to exit before it is killed


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (a worker's: what its tasks started too)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Stopping:
    """What went with stopped workers and must not outlive them: each worker's process group and
    the processes carrying its mark (wire/strays.py). They get SIGTERM at once and SIGKILL once
    ``KILL_GRACE`` has passed: a resource tracker (which ignores SIGTERM) unlinks what it tracks as
    soon as the processes that hold its pipe are gone, then exits by itself."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, int, str]] = []  # (SIGKILL at, process group, mark)

    def add(self, pgid: int, mark: str, deadline: float | None = None) -> None:
        signal_group(pgid, signal.SIGTERM)
        for pid in strays.find(mark) if mark else ():
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        self.pending.append((deadline or time.monotonic() + KILL_GRACE, pgid, mark))

    def due(self, now: float, *, everything: bool = False) -> None:
        """SIGKILL what is past its grace (``everything``: all of it, now)."""
        keep = []
        for deadline, pgid, mark in self.pending:
            if everything or now >= deadline:
                signal_group(pgid, signal.SIGKILL)
                if mark:
                    strays.sweep(mark)
            else:
                keep.append((deadline, pgid, mark))
        self.pending = keep

    def settle(self, token: str, deadline: float) -> None:
        """Wait until nothing marked ``token`` is left, or ``deadline``; then SIGKILL the rest."""
        while time.monotonic() < deadline and token and strays.find(token):
            time.sleep(0.02)
        self.due(time.monotonic(), everything=True)
        if token:
            strays.sweep(token)


class Breach(NamedTuple):
    """Why the sidecar killed a worker: its item ran past the job's ``timeout``, or its memory
    passed the job's ``memory_limit`` (``memory``: what it had then)."""

    reason: Literal["timeout", "memory"]
    limit: float
    memory: int | None = None


class WorkerProcess:
    """One worker: its process, its socket, its slot, and the chunks sent to it."""

    def __init__(self, preload: list[str], env: dict[str, str], tmpdir: str | None) -> None:
        parent, child = socket.socketpair()
        with _slot_file(tmpdir) as slot_file:
            slot_fd = slot_file.fileno()
            self.slot = Slot.create(slot_fd)
            args = [str(child.fileno()), str(slot_fd), str(os.getpid()), json.dumps(preload)]
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nbparallel.worker", *args],
                pass_fds=(child.fileno(), slot_fd),
                stdin=subprocess.DEVNULL,
                env={**env, ROLE_ENV: "worker"},  # see nbparallel/__init__.py
                # Its own process group: a kill takes the task's own children with it.
                start_new_session=True,
            )
        child.close()
        self.pid = self.process.pid
        self.channel = Channel(parent)
        self.ready = False
        self.retiring = False  # asked to exit, or killed on purpose: its exit is not a crash
        self.kill_reason: Breach | None = None  # set when killed for a timeout or memory limit
        self.assigned: deque[Chunk] = deque()
        self.keys: OrderedDict[str, None] = OrderedDict()  # functions it holds, oldest first
        self.jobs: set[int] = set()  # jobs whose settings it has
        self.stop_by: float | None = None  # killed: when its process group gets SIGKILL
        self.tasks_done = 0
        self.group_tasks: dict[Any, int] = {}  # items done per job group (an Executor's max_tasks_per_child)
        self.worn_out = False  # ran a group's max_tasks: takes no more work, replaced once idle
        self.head_since = 0.0  # when the chunk now at the head of ``assigned`` started running
        self.rss = 0
        self.rss_peak = 0

    def fileno(self) -> int:
        return self.channel.fileno()

    def kill(self, *, at_once: bool = False) -> None:
        """Stop the worker and everything it started: SIGTERM to its process group now, so that
        what a task started can clean up (loky's resource tracker unlinks its semaphores and
        folders once the processes holding its pipe are gone), SIGKILL ``KILL_GRACE`` later
        (``Stopping``). ``at_once``: the worker itself gets SIGKILL now (its memory must go)."""
        self.retiring = True
        if self.stop_by is None:
            self.stop_by = time.monotonic() + KILL_GRACE
        signal_group(self.pid, signal.SIGTERM)
        if at_once:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self) -> int | None:
        """Wait for the process to end (it closed its socket, so it is dying) and return its code.
        Briefly: the whole pool waits meanwhile, and a worker whose task closed its descriptors would
        otherwise keep it waiting while the task runs on."""
        try:
            return self.process.wait(timeout=REAP_WAIT)
        except subprocess.TimeoutExpired:  # closed the socket but lingers: make sure
            self.kill(at_once=True)
            try:
                return self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                return None
        finally:
            self.channel.close()
            self.slot.close()

    def jobs_running(self) -> set[int]:
        return {chunk.job for chunk in self.assigned}

    def describe(self) -> dict[str, Any]:
        state = "starting" if not self.ready else ("busy" if self.assigned else "idle")
        current = self.assigned[0] if self.assigned else None
        index = None
        if current is not None:
            slot = self.slot.read()
            if slot.chunk == current.id and 0 <= slot.offset < current.count:
                index = current.start + slot.offset
        return {
            "pid": self.pid,
            "state": state,
            "job": current.job if current else None,
            "index": index,
            "rss": self.rss,
            "tasks_done": self.tasks_done,
        }


def sample_memory(workers: Iterable[WorkerProcess]) -> int:
    """Record each worker's RSS (and peak); return this process's own RSS."""
    import psutil  # costs the sidecar ~2 MB: only once memory is watched

    for worker in workers:
        try:
            worker.rss = psutil.Process(worker.pid).memory_info().rss
        except psutil.Error:
            continue
        worker.rss_peak = max(worker.rss_peak, worker.rss)
    return int(psutil.Process().memory_info().rss)


def return_free_memory() -> None:
    """glibc keeps freed memory for reuse; after routing large payloads, give it back."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # prctl on Linux only

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
