"""What a worker sends the sidecar: one socket shared by the task thread and any thread that prints,
a chunk's outcomes, and what tasks print, tagged with the item that printed it.

``print`` and ``logging`` output goes through ``TaggedOutput`` (sys.stdout and sys.stderr), sent as
``output`` frames tagged with the item ``WorkerState`` says is running; plain chunks (loop.py,
running.py) and async ones (aio.py) both keep that state, and flush the streams before their
results go out (``flush_std``).
"""

from __future__ import annotations

import io
import operator
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..payload.outcomes import Batch
from ..wire import worker_messages as wmsg
from ..wire.frames import send_frame

OUTPUT_PIECE = 65536  # characters of printed text per frame: escaped, far below the header limit


class Connection:
    """The socket to the sidecar, shared by the task thread and any thread that prints."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.forked = False  # in a process a task forked from the worker (see Worker.forked)

    def send(self, header: Mapping[str, Any], buffers: list[bytes] | None = None, fds: list[int] | None = None) -> None:
        if self.forked:  # a forked copy of the worker that came back here: it has no say on the wire
            os._exit(0)
        with self.lock:
            send_frame(self.sock, header, buffers or [], fds or [])


def send_outcomes(conn: Connection, header: wmsg.WorkerResult, batch: Batch) -> None:
    """A ``result`` frame: ``header`` and ``batch`` pickled, its large buffers in fresh segments."""
    packed = batch.pickle()
    try:
        if packed.specs:
            header["oob"] = packed.specs
        conn.send(header, [packed.data], packed.fds)
    finally:
        packed.close()


class TaggedOutput(io.TextIOBase):
    """A stand-in for sys.stdout/stderr that sends each line tagged with the current item."""

    def __init__(self, conn: Connection, name: str, state: WorkerState) -> None:
        self.conn = conn
        self.stream = name
        self.state = state
        self.pending: list[str] = []
        self.lock = threading.Lock()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self.conn.forked:  # held by a logging handler in a forked child: its own stderr instead
            stream = sys.__stderr__ if self.stream == "stderr" else sys.__stdout__
            return stream.write(text) if stream is not None else len(text)
        with self.lock:
            self.pending.append(text)
            if "\n" in text or sum(map(len, self.pending)) > 65536:
                self._send_locked()
        return len(text)

    def flush(self) -> None:
        with self.lock:
            self._send_locked()

    def _send_locked(self) -> None:
        if not self.pending:
            return
        text, self.pending = "".join(self.pending), []
        at = 0
        while at < len(text):  # in pieces, at line ends where it can: any size, never a header past the limit
            end = at + OUTPUT_PIECE
            if end < len(text):
                end = text.rfind("\n", at, end) + 1 or end
            self.conn.send(wmsg.worker_output(job=self.state.job, index=self.state.index, stream=self.stream,
                                              text=text[at:end]))
            at = end

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """A task closing sys.stdout must not take the capture away from the items after it."""
        self.flush()

    def fileno(self) -> int:
        raise io.UnsupportedOperation("worker output is captured; it has no file descriptor")


class WorkerState:
    """What the worker is doing now; read by the output streams to tag lines."""

    def __init__(self) -> None:
        self.job: int | None = None
        self._index: int | None = None
        self._run: tuple[int, Any, int] | None = None  # fast mode: (first index, iterator, its length)
        self.current: Callable[[], int | None] | None = None  # an async job: the running task's item (aio.py)

    @property
    def index(self) -> int | None:
        if self.current is not None:
            return self.current()
        if self._run is not None:  # the item map() is on: how far the iterator has gone
            first, pending, size = self._run
            return first + size - operator.length_hint(pending) - 1
        return self._index

    @index.setter
    def index(self, value: int | None) -> None:
        self._run, self._index = None, value

    def follow(self, first: int, pending: Any, size: int) -> None:
        self._run = (first, pending, size)

    def clear(self) -> None:
        self._run = self._index = None

    def drop_run(self) -> None:
        """Leave the items of the run map() is on unrun (in a forked child: they are the worker's)."""
        if self._run is not None:
            for _ in self._run[1]:
                pass


def flush_std() -> None:
    """Flush this worker's streams, so what an item printed goes out before its result."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a task may have closed or replaced them
            pass
