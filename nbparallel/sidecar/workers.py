"""Worker processes as the sidecar sees them: start, talk to, watch, kill."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from ..config import ROLE_ENV
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
        self.tasks_done = 0
        self.head_since = 0.0  # when the chunk now at the head of ``assigned`` started running
        self.rss = 0
        self.rss_peak = 0

    def fileno(self) -> int:
        return self.channel.fileno()

    def kill(self) -> None:
        """SIGKILL the worker and everything it started."""
        self.retiring = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
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
            self.kill()
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
