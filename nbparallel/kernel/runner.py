"""The kernel's side of the sidecar: start it, talk to it, notice when it dies.

One ``Client`` per process, made on first use and reused by every call (``get_client``). Its
reader thread hands every frame about a job to that job's handle; the caller's thread does the rest.
If the sidecar has died, the next call starts a new one and says so once.

The runner is the sidecar, or, with ``configure(cluster=...)``, the Dask bridge (cluster/bridge.py):
another process that speaks the same protocol, so nothing else here knows the difference.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from .. import config
from ..errors import ClusterUnavailable, ProtocolError, SidecarDied
from ..payload import placement
from ..wire import messages as msg
from ..wire import strays
from ..wire.frames import Buffer, Frame, check_hello, close_fds, read_frame, send_frame
from . import inline
from .sending import Outbox
from .delivery import mark_internal


class JobHandle(Protocol):
    """What the reader thread calls for frames about one job."""

    def on_frame(self, frame: Frame) -> None: ...

    def on_died(self, error: SidecarDied) -> None: ...


class SidecarRestarted(UserWarning):
    """The sidecar had stopped; a new one was started."""


def runner_command(settings: config.Settings, fd: int) -> tuple[list[str], str, float]:
    """The command line that starts the runner, what to call it in messages, and how long it may
    take to answer: the sidecar, or the Dask bridge when a cluster is configured."""
    head = [sys.executable, "-m"]
    if settings.cluster is None:
        return [*head, "nbparallel.sidecar", str(fd), str(os.getpid())], "sidecar", config.START_TIMEOUT
    options = {"workers": config.resolve_workers(settings.workers), "connect_timeout": config.CLUSTER_CONNECT_TIMEOUT}
    return ([*head, "nbparallel.cluster", str(fd), str(os.getpid()), settings.cluster, json.dumps(options)],
            "Dask bridge", config.CLUSTER_START_TIMEOUT)


class Client:
    """A running sidecar (or Dask bridge) and the connection to it."""

    def __init__(self, settings: config.Settings) -> None:
        parent, child = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])  # the folder holding nbparallel/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env[config.ROLE_ENV] = "runner"  # see nbparallel/__init__.py
        self.pool = strays.pool_token(os.getpid())  # marks its processes and theirs (wire/strays.py)
        env[strays.POOL_ENV] = self.pool
        command, self.kind, start_timeout = runner_command(settings, child.fileno())
        self.cluster = settings.cluster
        self.process = subprocess.Popen(
            command,
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
            # Its own session: the stop button's SIGINT to the kernel's process group misses it.
            start_new_session=True,
        )
        child.close()
        self.pid = self.process.pid
        self.sock = parent
        self.send_lock = threading.Lock()
        self.jobs: dict[int, JobHandle] = {}
        self.scopes: dict[int, tuple[str, int]] = {}  # job -> the call it belongs to (placement.py)
        self.jobs_lock = threading.Lock()
        self.job_ids = itertools.count(1)
        self.chunk_ids = itertools.count(1)
        self.replies: dict[int, tuple[threading.Event, list[Frame]]] = {}
        self.request_ids = itertools.count(1)
        self.dead: SidecarDied | None = None
        self.errors: list[str] = []  # internal errors the sidecar reported
        try:
            self.sock.settimeout(start_timeout)
            send_frame(self.sock, msg.hello())
            hello = read_frame(self.sock)
            refusal = msg.view(hello, msg.Error)
            if hello.op == "error" and refusal.get("fatal"):  # the bridge could not reach its cluster
                raise ClusterUnavailable(f"nbparallel: {refusal.get('message')}")
            check_hello(hello, self.kind)
            self.sock.settimeout(None)
        except (OSError, EOFError, ProtocolError, ClusterUnavailable) as exc:
            self._kill()
            if isinstance(exc, ClusterUnavailable):
                raise
            raise SidecarDied(f"the {self.kind} did not start: {exc}") from exc
        #: What the runner said about itself: a Dask bridge adds its cluster, dashboard and size.
        self.info: dict[str, Any] = dict(msg.view(hello, msg.HelloReply))
        #: Threads on the cluster (None for the sidecar: its pool is ``settings.workers``).
        self.size: int | None = int(self.info["workers"]) if self.info.get("workers") else None
        # Frames go out through a thread of their own, which also notices a frozen sidecar (sending.py).
        self.given_up: str | None = None  # why this side killed the runner, if it did
        self.outbox = Outbox(self.sock, busy=lambda: bool(self.jobs), failed=self._mark_dead, frozen=self._frozen,
                             watch=self.kind == "sidecar")
        self.configure(settings)
        self.reader = threading.Thread(target=self._read, name="nbparallel-reader", daemon=True)
        self.reader.start()

    # -- sending ------------------------------------------------------------------------------

    def send(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = ()) -> None:
        """Send a frame; ``fds`` are duplicated into the sidecar (the caller still closes its own).
        Never blocks: the frame is queued for the sending thread (sending.py)."""
        if self.dead is not None:
            raise self.dead
        self.outbox.put(header, buffers, fds)

    def send_packed(self, header: Mapping[str, Any], packed: Any) -> None:
        """Send a value made by ``serialization.pack``. Its large buffers are placed in shared memory
        now, once per call (payload/placement.py; the batches of one joblib call are one call), and
        stay pinned until the job is unregistered; segments made for it alone are then the
        sidecar's to keep (our descriptors are closed)."""
        try:
            job = int(header["job"])
            if header.get("op") == "job":
                group = header.get("group")
                one_call = group is not None and packed.group_is_one_call
                self.scopes[job] = ("group", int(group or 0)) if one_call else ("job", job)
            packed.place(self.scopes.get(job, ("job", job)), (self.pid, job))
            if packed.specs:
                header = {**header, "oob": packed.specs}
            self.send(header, [packed.data], packed.fds)
        finally:
            packed.close()

    def configure(self, settings: config.Settings) -> None:
        size = config.resolve_workers(settings.workers)
        env = dict(settings.env)
        if settings.limit_threads:
            env = {**config.thread_limits(size), **env}
        self.send(msg.configure(workers=size, preload=settings.preload, env=env,
                                max_tasks_per_worker=settings.max_tasks_per_worker))

    def new_job_id(self) -> int:
        return next(self.job_ids)

    def new_chunk_id(self) -> int:
        return next(self.chunk_ids)

    def register(self, job_id: int, handle: JobHandle) -> None:
        with self.jobs_lock:
            if self.dead is not None:
                raise self.dead
            self.jobs[job_id] = handle

    def unregister(self, job_id: int) -> None:
        with self.jobs_lock:
            self.jobs.pop(job_id, None)
            self.scopes.pop(job_id, None)
        placement.release((self.pid, job_id))  # its segments may be reused once nobody maps them

    def request(self, header: Mapping[str, Any], timeout: float = 5.0) -> Frame:
        """Send a request and wait for the reply that carries the same ``req`` (``header`` without it)."""
        return self.ask(lambda req: {**header, "req": req}, timeout)

    def ask_status(self, timeout: float = 5.0) -> msg.Status:
        """The runner's ``status`` reply."""
        return msg.view(self.ask(lambda req: msg.status_request(req=req), timeout), msg.Status)

    def ask(self, build: Callable[[int], Mapping[str, Any]], timeout: float) -> Frame:
        """Send the request ``build(req)`` and wait for the reply that carries the same ``req``."""
        req = next(self.request_ids)
        event = threading.Event()
        box: list[Frame] = []
        self.replies[req] = (event, box)
        try:
            header = build(req)
            self.send(header)
            if not event.wait(timeout):
                if self.dead is not None:
                    raise self.dead
                raise TimeoutError(f"the {self.kind} did not answer {header['op']!r} within {timeout} s")
            return box[0]
        finally:
            self.replies.pop(req, None)

    # -- receiving ----------------------------------------------------------------------------

    def _read(self) -> None:
        """The reader thread: hands each frame to its job's handle (which runs none of the user's
        code here: see delivery.py). Should it fail all the same, every pending call fails at once
        with the reason, and the next call starts a new runner."""
        mark_internal()
        try:
            self._read_frames()
        except BaseException as exc:  # a bug of ours: no call may wait forever for this thread
            self._mark_dead(f"nbparallel's reader thread failed: {type(exc).__name__}: {exc}")
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # the runner sees the kernel go, and exits
            except OSError:
                pass

    def _read_frames(self) -> None:
        while True:
            try:
                frame = read_frame(self.sock)
            except (EOFError, OSError):
                self._mark_dead()
                return
            except ProtocolError as exc:  # e.g. descriptors dropped at the open-file limit: say so
                self._mark_dead(str(exc))
                return
            self.outbox.heard()
            job = frame.get("job")
            if job is not None:
                with self.jobs_lock:
                    handle = self.jobs.get(job)
                if handle is not None:
                    self._hand(job, handle, frame)
                    handle = None  # a finished call's future, and its result, must not wait for the next frame
                else:
                    close_fds(frame.fds)
            elif frame.get("req") is not None:
                waiting = self.replies.get(frame["req"])
                if waiting is not None:
                    waiting[1].append(frame)
                    waiting[0].set()
            elif frame.op == "error":
                error = msg.view(frame, msg.Error)
                self.errors.append(str(error.get("message")))
                if error.get("fatal"):  # the runner says why it stops (the Dask bridge lost its scheduler)
                    print(f"nbparallel: {error.get('message')}", file=sys.stderr)
                else:
                    print(f"nbparallel: the {self.kind} reported an internal error:\n{error.get('message')}",
                          file=sys.stderr)

    def _hand(self, job: int, handle: JobHandle, frame: Frame) -> None:
        """Give ``frame`` to ``handle``; if that fails, fail that call alone, saying why."""
        try:
            handle.on_frame(frame)
        except Exception as exc:  # a bug of ours about one call: the others go on
            close_fds(frame.fds)
            with self.jobs_lock:
                self.jobs.pop(job, None)
            handle.on_died(SidecarDied(f"nbparallel could not handle a {frame.op!r} frame of this call "
                                       f"({type(exc).__name__}: {exc}); the other calls go on"))

    def _mark_dead(self, reason: str | None = None) -> SidecarDied:
        """``reason``: why this side gave up on the connection, when it was this side."""
        reason = reason or self.given_up
        if self.dead is None:
            try:
                code = self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                code = None
            how = f"exit code {code}" if code is not None and code >= 0 else (
                f"killed by signal {-code}" if code is not None else reason or "connection lost")
            if reason and code is not None:
                how = f"{reason}; {how}"
            self.dead = SidecarDied(
                f"the nbparallel {self.kind} (pid {self.pid}) stopped ({how}). Results that had arrived are "
                f"kept; the next call starts a new {self.kind}."
            )
            with self.jobs_lock:
                handles = list(self.jobs.values())
                self.jobs.clear()
            for handle in handles:
                handle.on_died(self.dead)
            for event, _ in list(self.replies.values()):
                event.set()
            placement.release_all()  # the runner and its workers are gone: nothing is in flight
            self.outbox.dead = True
            # Its workers, and what their tasks started, go with it: SIGTERM, SIGKILL after a grace
            # (so a resource tracker among them unlinks what it tracked, as when the sidecar stops them).
            strays.stop(self.pool, config.KILL_GRACE)
        return self.dead

    def _frozen(self, why: str) -> None:
        """The sending thread found the sidecar frozen or wedged: kill it (the calls raise SidecarDied)."""
        self.given_up = f"{why}: frozen or wedged (stopped, or swapping), it was killed"
        self._kill()
        self._mark_dead()

    # -- stopping -----------------------------------------------------------------------------

    def close(self, timeout: float = 2.0) -> None:
        """Stop the sidecar and its workers; wait for it to go."""
        if self.dead is None:
            try:
                self.send(msg.shutdown())
            except SidecarDied:
                pass
        self.outbox.close(timeout)  # what is queued goes out first
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        # What the runner's workers started and is still going (a resource tracker unlinking what it
        # tracked, once the processes holding its pipe are gone) gets the grace; then it is killed.
        deadline = time.monotonic() + config.KILL_GRACE
        while time.monotonic() < deadline and strays.find(self.pool):
            time.sleep(0.02)
        strays.stop(self.pool, config.KILL_GRACE)  # nothing, unless the sidecar could not stop it all
        self.sock.close()
        placement.release_all()
        placement.clear()  # give the pooled segments back
        if self.reader.is_alive() and self.reader is not threading.current_thread():
            self.reader.join(timeout)

    def _kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass


_client: Client | None = None
_client_lock = threading.Lock()
settings = config.Settings()


def get_client() -> Client:
    """The process's sidecar client, started (or restarted, with a warning) as needed. In a worker, the
    inline client: a call a task makes runs right there, serially, never in a pool of its own."""
    if config.in_worker:
        return cast(Client, inline.client())  # an InlineClient has what the calls use of a Client
    global _client
    with _client_lock:
        if _client is not None and _client.dead is not None:
            old = _client
            _client = None
            old.close(timeout=0.5)
            _client = Client(settings)
            warnings.warn(
                f"nbparallel: the previous {old.kind} (pid {old.pid}) had stopped; started a new one "
                f"(pid {_client.pid}).",
                SidecarRestarted,
                stacklevel=3,
            )
        if _client is not None and _client.cluster != settings.cluster:  # configure(cluster=...) changed it
            old, _client = _client, None
            old.close()
        if _client is None:
            _client = Client(settings)
        return _client


def current_client() -> Client | None:
    """The client if one is running, without starting one."""
    return _client


def shutdown_client() -> None:
    """Stop the sidecar and every worker (a later call starts them again)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
            _client = None


def _forget_after_fork() -> None:
    # A forked child (multiprocessing's fork, pre-forking servers) shares the parent's socket to its
    # sidecar: reading it would steal the parent's frames, closing the sidecar would end the parent's
    # calls, and the reader thread did not survive the fork anyway. The child closes its copy, sends
    # nothing, and starts a sidecar of its own if it calls nbparallel.
    global _client, _client_lock
    inherited, _client = _client, None
    _client_lock = threading.Lock()  # another thread may have held it at the fork
    if inherited is not None:
        inherited.sock.close()


atexit.register(shutdown_client)
os.register_at_fork(after_in_child=_forget_after_fork)
