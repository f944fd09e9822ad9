"""The wire format between the kernel, the sidecar and the workers (see docs/protocol.md).

A frame is a fixed prefix, a JSON header and raw payload bytes::

    !IQ  header length (bytes), payload length (bytes)
    header  UTF-8 JSON object; "op" names the message; "sizes" splits the payload into buffers;
            "fds" counts the file descriptors (shared-memory segments) passed with the frame
    payload the buffers, back to back; never base64

File descriptors travel as SCM_RIGHTS ancillary data attached to the frame's first byte.

Payloads are opaque here: the sidecar routes them without unpickling. Only the standard library is
used, so the sidecar can import this module and stay small.
"""

from __future__ import annotations

import array
import json
import os
import resource
import socket
import struct
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError

PROTOCOL_VERSION = 1

PREFIX = struct.Struct("!IQ")
MAX_HEADER = 16 * 2**20  # a header is metadata; anything this big is a corrupt stream
MAX_FDS = 250  # the kernel passes at most 253 descriptors in one message
ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

Buffer = bytes | bytearray | memoryview


@dataclass
class Frame:
    """One message: its header fields and its payload buffers."""

    header: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)  # owned by whoever holds the frame: close them

    @property
    def op(self) -> str:
        return str(self.header["op"])

    @property
    def payload(self) -> Buffer:
        """The single payload buffer (empty if none)."""
        if not self.buffers:
            return b""
        if len(self.buffers) == 1:
            return self.buffers[0]
        return b"".join(self.buffers)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def encode(header: Mapping[str, Any], buffers: Sequence[Buffer] = (), nfds: int = 0) -> list[Buffer]:
    """The pieces of one frame, ready for ``sendmsg``/``writev`` without joining them."""
    if len(buffers) > 1:
        header = {**header, "sizes": [memoryview(b).nbytes for b in buffers]}
    if nfds:
        if nfds > MAX_FDS:
            raise ProtocolError(f"{nfds} descriptors in one frame; at most {MAX_FDS}")
        header = {**header, "fds": nfds}
    head = json.dumps(header, separators=(",", ":")).encode()
    total = sum(memoryview(b).nbytes for b in buffers)
    return [PREFIX.pack(len(head), total) + head, *buffers]


def _split(header: dict[str, Any], payload: memoryview) -> list[Buffer]:
    sizes = header.pop("sizes", None)
    if sizes is None:
        return [payload] if payload.nbytes else []
    out: list[Buffer] = []
    at = 0
    for size in sizes:
        out.append(payload[at : at + size])
        at += size
    if at != payload.nbytes:
        raise ProtocolError(f"buffer sizes {sizes} do not add up to the payload ({payload.nbytes} bytes)")
    return out


def _decode_header(raw: Buffer) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw))
    except ValueError as exc:
        raise ProtocolError(f"a frame header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or "op" not in header:
        raise ProtocolError(f"a frame header has no 'op': {str(header)[:200]}")
    return header


class FrameParser:
    """Incremental decoder for a non-blocking reader: ``feed`` bytes, get whole frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.fds: deque[int] = deque()  # received descriptors not yet claimed by a frame

    def feed(self, data: Buffer) -> Iterator[Frame]:
        self._buf += data
        buf = self._buf
        at = 0
        while len(buf) - at >= PREFIX.size:
            head_len, payload_len = PREFIX.unpack_from(buf, at)
            if head_len > MAX_HEADER:
                raise ProtocolError(f"frame header of {head_len} bytes: the stream is corrupt")
            end = at + PREFIX.size + head_len + payload_len
            if len(buf) < end:
                break
            start = at + PREFIX.size
            header = _decode_header(buf[start : start + head_len])
            # Copy the payload out: the buffer is compacted below and may be reused.
            with memoryview(buf) as view:
                payload = memoryview(bytes(view[start + head_len : end]))
            at = end
            wanted = int(header.pop("fds", 0))
            if wanted > len(self.fds):
                raise ProtocolError(f"a frame announces {wanted} descriptors but {len(self.fds)} arrived")
            fds = [self.fds.popleft() for _ in range(wanted)]
            yield Frame(header, _split(header, payload), fds)
        if at:
            del buf[:at]

    @property
    def pending(self) -> int:
        return len(self._buf)


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors we own, ignoring any already gone."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_from(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in ``recvmsg`` ancillary data."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def ancillary_for(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> memoryview:
    out = memoryview(bytearray(size))
    got = 0
    while got < size:
        n, ancillary, flags, _ = sock.recvmsg_into([out[got:]], ANCILLARY_SPACE)
        fds.extend(fds_from(ancillary))
        if flags & socket.MSG_CTRUNC:  # the kernel dropped descriptors it could not install here
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            raise ProtocolError(f"descriptors sent with a frame were dropped: this process is at its limit on "
                                f"open files (RLIMIT_NOFILE, `ulimit -n`: {soft})")
        if n == 0:
            raise EOFError("the other end closed the connection")
        got += n
    return out


def read_frame(sock: socket.socket) -> Frame:
    """Read one frame from a blocking socket. Raises EOFError when the peer has gone.

    Senders attach a frame's descriptors to its first byte (``send_frame`` and ``Channel`` do), so
    the descriptors that arrive while this frame is read are this frame's.
    """
    fds: list[int] = []
    try:
        head_len, payload_len = PREFIX.unpack(_recv_exact(sock, PREFIX.size, fds))
        if head_len > MAX_HEADER:
            raise ProtocolError(f"frame header of {head_len} bytes: the stream is corrupt")
        header = _decode_header(_recv_exact(sock, head_len, fds))
        payload = _recv_exact(sock, payload_len, fds) if payload_len else memoryview(b"")
        if int(header.pop("fds", 0)) != len(fds):
            raise ProtocolError(f"a frame announced {header.get('fds')} descriptors, {len(fds)} arrived")
    except BaseException:
        close_fds(fds)
        raise
    return Frame(header, _split(header, payload), fds)


def send_frame(sock: socket.socket, header: Mapping[str, Any], buffers: Sequence[Buffer] = (),
               fds: Sequence[int] = ()) -> None:
    """Write one frame to a blocking socket (the caller serialises concurrent writers).

    ``fds`` are passed to the peer (duplicated into it); the caller still owns its own copies.
    """
    pieces = [memoryview(p).cast("B") for p in encode(header, buffers, len(fds))]
    ancillary = ancillary_for(fds)
    while pieces:
        sent = sock.sendmsg(pieces[:512], ancillary)
        ancillary = []  # sent with the first bytes, once
        while sent and pieces:
            size = pieces[0].nbytes
            if sent >= size:
                sent -= size
                pieces.pop(0)
            else:
                pieces[0] = pieces[0][sent:]
                sent = 0
        while pieces and pieces[0].nbytes == 0:
            pieces.pop(0)


def check_hello(frame: Frame, peer: str) -> None:
    """Validate the first frame from ``peer``: right op, same protocol version."""
    if frame.op != "hello":
        raise ProtocolError(f"the {peer} began with {frame.op!r} instead of 'hello'")
    version = frame.get("version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the {peer} speaks protocol version {version}, this side {PROTOCOL_VERSION}: "
            "the kernel and the sidecar come from different installs; restart the kernel"
        )
