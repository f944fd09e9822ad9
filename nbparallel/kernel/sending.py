"""Frames to the runner, written by a thread of their own, which also watches that the runner lives.

A caller never blocks on a send: ``Outbox.put`` queues the frame and returns, so ``total_timeout``
and Ctrl-C keep working however slowly the runner reads, and a Ctrl-C can never land in the middle
of a frame (the writing thread never sees a KeyboardInterrupt; a frame cut short would corrupt the
stream for every call). The frame's descriptors are duplicated when it is queued: the caller may
close its own at once, as with a blocking send.

Between writes the thread checks the runner's liveness, while a call waits on it (``busy``): a
runner that has said nothing for ``LIVENESS_QUIET`` seconds is asked for its status; one that neither
answers nor reads what it was sent for ``LIVENESS_LIMIT`` seconds is frozen (SIGSTOP) or wedged
(swapping, a bug), and ``frozen`` is called: the client kills it, and every waiting call raises
``SidecarDied`` within seconds instead of waiting forever.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import config
from ..wire import messages as msg
from ..wire.frames import Buffer, ancillary_for, close_fds, encode

TICK = 0.25  # seconds between liveness checks while nothing is written
PING = -1  # the ``req`` of liveness pings: no caller waits for their answer
BATCH = 512  # pieces per sendmsg


class _Frame:
    __slots__ = ("pieces", "fds")

    def __init__(self, pieces: list[memoryview], fds: list[int]) -> None:
        self.pieces = pieces
        self.fds = fds  # our duplicates, closed once they went out with the first byte


_STOP = _Frame([], [])


class Outbox:
    """The writing thread of one connection to the runner."""

    def __init__(self, sock: socket.socket, *, busy: Callable[[], bool], failed: Callable[[str], Any],
                 frozen: Callable[[str], Any], watch: bool) -> None:
        """``busy()``: whether a call waits on the runner; ``failed(why)``: the connection broke;
        ``frozen(why)``: the runner stopped living (see the module's doc); ``watch``: check liveness
        (the Dask bridge asks its scheduler before it answers a status: it is not watched)."""
        self.sock = sock
        self.busy, self.failed, self.frozen, self.watch = busy, failed, frozen, watch
        self.frames: queue.SimpleQueue[_Frame] = queue.SimpleQueue()
        self.heard_at = time.monotonic()  # when the reader last got a frame (``heard``)
        self.ping_at: float | None = None
        self.stuck_since: float | None = None  # when the runner stopped taking our bytes
        self.dead = False
        self.thread = threading.Thread(target=self._run, name="nbparallel-sender", daemon=True)
        self.thread.start()

    def put(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = ()) -> None:
        """Queue a frame (``fds`` are duplicated: the caller keeps its own)."""
        pieces = [memoryview(p).cast("B") for p in encode(header, buffers, len(fds))]
        dups: list[int] = []
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except BaseException:
            close_fds(dups)
            raise
        self.frames.put(_Frame(pieces, dups))

    def heard(self) -> None:
        """The reader got a frame: the runner lives."""
        self.heard_at = time.monotonic()

    def close(self, timeout: float) -> None:
        """Send what is queued (for ``timeout`` seconds at most), then stop the thread."""
        self.frames.put(_STOP)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug of ours: no call may wait forever on frames never sent
            self.dead = True
            self.failed(f"nbparallel's sending thread failed: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        frame: _Frame | None = None
        last = time.monotonic()
        while True:
            if frame is None:
                try:
                    frame = self.frames.get(timeout=TICK)
                except queue.Empty:
                    frame = None
            if frame is _STOP:
                return
            if frame is not None and self.dead:  # nobody reads any more: let the descriptors go
                close_fds(frame.fds)
                frame = None
                continue
            if frame is not None and self._write(frame):
                frame = None
                continue
            now = time.monotonic()
            if now - last > config.LIVENESS_LIMIT / 2:  # this process itself was stopped (or starved):
                self.heard_at, self.ping_at = now, None  # the runner's silence meanwhile proves nothing
                self.stuck_since = now if self.stuck_since is not None else None
            last = now
            if frame is not None and not self.dead:
                self._wait_writable()
            self._check(now, frame is not None)

    def _write(self, frame: _Frame) -> bool:
        """Write what the socket takes now; True once the whole frame is out."""
        while frame.pieces:
            try:
                sent = self.sock.sendmsg(frame.pieces[:BATCH], ancillary_for(frame.fds), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if self.stuck_since is None:
                    self.stuck_since = time.monotonic()
                return False
            except OSError as exc:
                self.dead = True
                close_fds(frame.fds)
                frame.fds = []
                self.failed(f"could not send to it: {exc}")
                return True
            self.stuck_since = None
            if frame.fds:  # they went with the first byte
                close_fds(frame.fds)
                frame.fds = []
            while sent and frame.pieces:
                size = frame.pieces[0].nbytes
                if sent >= size:
                    sent -= size
                    frame.pieces.pop(0)
                else:
                    frame.pieces[0] = frame.pieces[0][sent:]
                    sent = 0
            while frame.pieces and frame.pieces[0].nbytes == 0:
                frame.pieces.pop(0)
        return True

    def _wait_writable(self) -> None:
        try:
            select.select([], [self.sock], [], TICK)
        except (OSError, ValueError):  # closed meanwhile: the next write says so
            time.sleep(TICK)

    def _check(self, now: float, writing: bool) -> None:
        """The liveness check (see the module's doc)."""
        if not self.watch or self.dead:
            return
        if writing:
            if self.stuck_since is not None and now - self.stuck_since > config.LIVENESS_LIMIT:
                self._give_up(f"it has read nothing of what was sent to it for {now - self.stuck_since:.0f} s")
            return
        if not self.busy():
            self.ping_at = None
            return
        if self.ping_at is not None and self.heard_at >= self.ping_at:
            self.ping_at = None  # it answered
        if self.ping_at is None:
            if now - self.heard_at > config.LIVENESS_QUIET:
                self.ping_at = now
                self.put(msg.status_request(req=PING))
        elif now - self.ping_at > config.LIVENESS_LIMIT:
            self._give_up(f"it has not answered for {now - self.ping_at:.0f} s")

    def _give_up(self, why: str) -> None:
        self.dead = True
        self.frozen(why)
