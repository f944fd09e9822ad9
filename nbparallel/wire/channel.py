"""A non-blocking framed connection, for the sidecar's single-threaded event loop."""

from __future__ import annotations

import itertools
import socket
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .frames import ANCILLARY_SPACE, Buffer, Frame, FrameParser, ancillary_for, encode, fds_from
from .frames import close_fds as _close

READ_SIZE = 1 << 20
BATCH = 256  # pieces per sendmsg


class _Piece:
    """Bytes waiting to go out; the first piece of a frame may carry descriptors."""

    __slots__ = ("view", "fds", "close_fds")

    def __init__(self, view: memoryview, fds: Sequence[int] = (), close_fds: bool = False) -> None:
        self.view = view
        self.fds = list(fds)
        self.close_fds = close_fds

    def sent_fds(self) -> None:
        if self.close_fds:
            _close(self.fds)
        self.fds = []


class Channel:
    """One socket: frames in through ``receive``, frames out through ``send`` (never blocks).

    Outgoing bytes that the socket cannot take now wait in a queue; the event loop calls ``flush``
    when the socket becomes writable (``wants_write``). A frame's descriptors always leave with its
    first byte and never with an earlier frame's bytes, so a blocking reader on the other side can
    tell whose they are.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.parser = FrameParser()
        self.outgoing: deque[_Piece] = deque()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self.outgoing)

    def send(self, header: Mapping[str, Any], buffers: Sequence[Buffer] = (), fds: Sequence[int] = (),
             close_fds: bool = False) -> None:
        """Queue a frame. ``close_fds``: close our copies of ``fds`` once they have been sent."""
        if self.closed:
            if close_fds:
                _close(fds)
            return
        for position, piece in enumerate(encode(header, buffers, len(fds))):
            view = memoryview(piece).cast("B")
            if position == 0:  # the prefix and header: never empty, and it carries the descriptors
                self.outgoing.append(_Piece(view, fds, close_fds))
            elif view.nbytes:
                self.outgoing.append(_Piece(view))
        self.flush()

    def flush(self) -> None:
        while self.outgoing and not self.closed:
            head = self.outgoing[0]
            batch = [head.view]
            for piece in itertools.islice(self.outgoing, 1, BATCH):
                if piece.fds:
                    break  # those descriptors must travel with their own frame's first byte
                batch.append(piece.view)
            try:
                sent = self.sock.sendmsg(batch, ancillary_for(head.fds))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the peer is gone; the read side will see EOF and clean up
                self._drop_outgoing()
                return
            if head.fds:
                head.sent_fds()
            while sent and self.outgoing:
                piece = self.outgoing[0]
                if sent >= piece.view.nbytes:
                    sent -= piece.view.nbytes
                    self.outgoing.popleft()
                else:
                    piece.view = piece.view[sent:]
                    sent = 0

    def receive(self) -> Iterator[Frame]:
        """Frames now readable. Raises EOFError when the peer has closed."""
        try:
            data, ancillary, _, _ = self.sock.recvmsg(READ_SIZE, ANCILLARY_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            data, ancillary = b"", []
        self.parser.fds.extend(fds_from(ancillary))
        if not data:
            raise EOFError
        yield from self.parser.feed(data)

    def _drop_outgoing(self) -> None:
        for piece in self.outgoing:
            if piece.fds:
                piece.sent_fds()
        self.outgoing.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._drop_outgoing()
            _close(self.parser.fds)
            self.parser.fds.clear()
            self.sock.close()
