"""The wire format: framing round trips, partial reads, bad input (without processes); and a real
sidecar answering an op the kernel may not send."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nbparallel.errors import ProtocolError
from nbparallel.wire import messages as msg
from nbparallel.wire.frames import PREFIX, PROTOCOL_VERSION, Frame, FrameParser, check_hello, encode, read_frame, send_frame


def _join(pieces: list) -> bytes:
    return b"".join(bytes(p) for p in pieces)


def test_round_trip_header_and_payload() -> None:
    data = _join(encode({"op": "chunk", "job": 3, "start": 10}, [b"\x00\x01binary\xff"]))
    (frame,) = list(FrameParser().feed(data))
    assert frame.op == "chunk"
    assert frame["job"] == 3 and frame["start"] == 10
    assert bytes(frame.payload) == b"\x00\x01binary\xff"


def test_payload_is_raw_bytes_not_base64() -> None:
    payload = bytes(range(256)) * 4
    data = _join(encode({"op": "result"}, [payload]))
    head_len, payload_len = PREFIX.unpack_from(data)
    assert payload_len == len(payload)
    assert data[PREFIX.size + head_len :] == payload
    assert json.loads(data[PREFIX.size : PREFIX.size + head_len]) == {"op": "result"}


def test_several_buffers_split_back() -> None:
    data = _join(encode({"op": "x"}, [b"abc", b"", b"defgh"]))
    (frame,) = list(FrameParser().feed(data))
    assert [bytes(b) for b in frame.buffers] == [b"abc", b"", b"defgh"]
    assert "sizes" not in frame.header


def test_parser_handles_byte_by_byte_and_many_frames() -> None:
    stream = b"".join(_join(encode({"op": "n", "i": i}, [bytes([i]) * i])) for i in range(50))
    parser = FrameParser()
    frames: list[Frame] = []
    for k in range(len(stream)):
        frames.extend(parser.feed(stream[k : k + 1]))
    assert [f["i"] for f in frames] == list(range(50))
    assert all(bytes(f.payload) == bytes([f["i"]]) * f["i"] for f in frames)
    assert parser.pending == 0


def test_empty_payload() -> None:
    (frame,) = list(FrameParser().feed(_join(encode({"op": "end", "job": 1}))))
    assert frame.buffers == [] and frame.payload == b""


def test_header_without_op_is_rejected() -> None:
    head = b'{"job": 1}'
    with pytest.raises(ProtocolError, match="no 'op'"):
        list(FrameParser().feed(PREFIX.pack(len(head), 0) + head))


def test_garbage_header_is_rejected() -> None:
    head = b"not json"
    with pytest.raises(ProtocolError, match="not valid JSON"):
        list(FrameParser().feed(PREFIX.pack(len(head), 0) + head))


def test_absurd_header_length_is_a_corrupt_stream() -> None:
    with pytest.raises(ProtocolError, match="corrupt"):
        list(FrameParser().feed(PREFIX.pack(2**31, 0) + b"x" * 20))


def test_sizes_that_do_not_add_up_are_rejected() -> None:
    head = json.dumps({"op": "x", "sizes": [1, 5]}).encode()
    with pytest.raises(ProtocolError, match="do not add up"):
        list(FrameParser().feed(PREFIX.pack(len(head), 3) + head + b"abc"))


def test_hello_version_check() -> None:
    check_hello(Frame({"op": "hello", "version": PROTOCOL_VERSION}), "sidecar")
    with pytest.raises(ProtocolError, match="version 999"):
        check_hello(Frame({"op": "hello", "version": 999}), "sidecar")
    with pytest.raises(ProtocolError, match="instead of 'hello'"):
        check_hello(Frame({"op": "result"}), "sidecar")


def test_blocking_socket_round_trip_with_large_payload() -> None:
    left, right = socket.socketpair()
    try:
        big = bytes(range(256)) * 20000  # 5 MB: larger than any socket buffer
        import threading

        sender = threading.Thread(target=send_frame, args=(left, {"op": "big"}, [big, b"tail"]))
        sender.start()
        frame = read_frame(right)
        sender.join()
        assert frame.op == "big"
        assert bytes(frame.buffers[0]) == big and bytes(frame.buffers[1]) == b"tail"
        left.close()
        with pytest.raises(EOFError):
            read_frame(right)
    finally:
        left.close()
        right.close()


def test_the_sidecar_takes_only_the_kernels_ops(script_env: dict[str, str]) -> None:
    """An op the kernel may not send (here, the name of one of the sidecar's own handlers) is a
    protocol error, answered as one; the sidecar goes on."""
    mine, theirs = socket.socketpair()
    sidecar = subprocess.Popen([sys.executable, "-m", "nbparallel.sidecar", str(theirs.fileno()), str(os.getpid())],
                               pass_fds=(theirs.fileno(),), env=script_env, start_new_session=True)
    theirs.close()
    try:
        mine.settimeout(30)
        send_frame(mine, msg.hello())
        check_hello(read_frame(mine), "sidecar")
        for op in ("worker_exit", "worker_result", "bogus"):
            send_frame(mine, {"op": op, "job": 1})
            reply = read_frame(mine)
            assert reply.op == "error"
            assert f"protocol error: the kernel sent op {op!r}" in msg.view(reply, msg.Error)["message"]
        send_frame(mine, msg.status_request(req=7))
        status = msg.view(read_frame(mine), msg.Status)
        assert status["req"] == 7 and status["pid"] == sidecar.pid
        send_frame(mine, msg.shutdown())
        assert sidecar.wait(timeout=10) == 0
    finally:
        mine.close()
        if sidecar.poll() is None:
            sidecar.kill()
            sidecar.wait()
