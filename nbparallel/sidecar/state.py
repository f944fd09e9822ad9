"""What the sidecar knows, in one place: its channel to the kernel, its workers, jobs and settings.

The sidecar is one object, built in layers that each add one concern to the one below (no layer
calls up):

    SidecarState (here)  ->  JobQueues (queues.py)  ->  WorkerSupervision (supervision.py)  ->  Sidecar (loop.py)
    the state               jobs' chunks: given out,     workers: started, read, retired,       the event loop and
                            put back, failed              their deaths blamed                    the kernel's ops
"""

from __future__ import annotations

import os
import selectors
import socket
import tempfile

from ..wire import strays
from ..wire.channel import Channel
from .health import Startup
from .jobs import Job
from .workers import Stopping, WorkerProcess


class SidecarState:
    """The sidecar's state: everything the layers above read and change."""

    def __init__(self, kernel_sock: socket.socket, kernel_pid: int) -> None:
        self.kernel = Channel(kernel_sock)
        self.kernel_pid = kernel_pid
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.kernel.sock, selectors.EVENT_READ, self.kernel)
        self.workers: dict[int, WorkerProcess] = {}  # by pid
        self.jobs: dict[int, Job] = {}
        self.size = 1
        self.max_tasks = 0  # replace a worker after this many items (0: never)
        self.routed_since_trim = 0
        self.preload: list[str] = []
        self.env = dict(os.environ)
        self.running = True
        # Where memfd exists we write no file at all; elsewhere our files live in a directory of
        # mode 0700 that goes when the sidecar does.
        self.tmpdir = None if hasattr(os, "memfd_create") else tempfile.mkdtemp(prefix="nbparallel-")
        self.last_sample = 0.0
        self.rss_peak = 0
        # (function key, rate) -> the next free start time of the last job that ran it: a call run
        # again right away continues its pace rather than bursting past a quota.
        self.paces: dict[tuple[str, float], float] = {}
        self.startup = Startup()  # workers dying before they are ready: paced, then the pool is broken
        # The mark of this pool's processes (strays.py): the kernel's, or our own when started by hand.
        self.pool = os.environ.get(strays.POOL_ENV) or strays.pool_token(kernel_pid)
        self.marks: dict[int, str] = {}  # worker pid -> the mark its processes carry
        self.stopping = Stopping()  # stopped workers' process groups and marks, SIGKILLed after a grace
        self.spawned = 0
