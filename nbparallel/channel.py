"""A non-blocking framed connection, for the sidecar's single-threaded event loop."""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from .protocol import Buffer, Frame, FrameParser, encode

READ_SIZE = 1 << 20


class Channel:
    """One socket: frames in through ``receive``, frames out through ``send`` (never blocks).

    Outgoing bytes that the socket cannot take now wait in a queue; the event loop calls ``flush``
    when the socket becomes writable (``wants_write``).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.parser = FrameParser()
        self.outgoing: deque[memoryview] = deque()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self.outgoing)

    def send(self, header: dict[str, Any], buffers: Sequence[Buffer] = ()) -> None:
        if self.closed:
            return
        for piece in encode(header, buffers):
            view = memoryview(piece).cast("B")
            if view.nbytes:
                self.outgoing.append(view)
        self.flush()

    def flush(self) -> None:
        while self.outgoing and not self.closed:
            try:
                sent = self.sock.sendmsg(list(self.outgoing)[:256])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the peer is gone; the read side will see EOF and clean up
                self.outgoing.clear()
                return
            while sent:
                head = self.outgoing[0]
                if sent >= head.nbytes:
                    sent -= head.nbytes
                    self.outgoing.popleft()
                else:
                    self.outgoing[0] = head[sent:]
                    sent = 0

    def receive(self) -> Iterator[Frame]:
        """Frames now readable. Raises EOFError when the peer has closed."""
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            data = b""
        if not data:
            raise EOFError
        yield from self.parser.feed(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.outgoing.clear()
            self.sock.close()
