"""The caller's buffers in shared memory: each placed once, segments kept for reuse (kernel side).

When the kernel sends a large buffer (an array's data) it must be in shared memory, so it is
copied there once. This module decides where:

* **One buffer, one segment.** A placed buffer is remembered by its owner (the array that owns the
  memory: views of one base share it) and its byte range, as long as the owner lives. The same
  buffer sent again by the same call (a ``map`` job; the jobs of one joblib call or one
  ``Executor``: one *scope*) is referenced, not copied. Sent by another call, it is first compared
  with what the segment holds (memcmp, at memory speed): equal, it is referenced; changed, it is
  written again, in place if nobody uses the segment any more, else into another one.
* **Segments are reused.** A segment is pinned by every job it was sent with until the kernel is done
  with the job. Then it waits in a pool, bounded in bytes (``POOL_MAX_BYTES``, and a quarter of the
  memory available) and in time (``POOL_SECONDS``), given back under memory pressure and at
  shutdown. A new buffer goes into a pooled segment of a fitting size (a copy into pages already
  allocated and mapped, several times cheaper than fresh ones), but only once no other process
  maps it or holds its descriptor (``segments.held_by_descendants``): a segment is rewritten only
  when nobody can see it.

Only the kernel pins and pools (``place`` is given a scope and a job by the runner when it sends a
frame); workers put their results in fresh segments, which the kernel keeps as long as the results.
The record of which owner's bytes lie where is placed.py's.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Hashable
from typing import Any

from . import placed, segments
from .placed import Segment

POOL_SECONDS = 30.0  # a released segment unused this long is given back
POOL_MAX_BYTES = 4 << 30  # released segments kept at most (and at most a quarter of MemAvailable)
ALIGN = 64  # buffers start on cache-line boundaries, as numpy likes


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Request:
    """One buffer to place: its bytes, and (for a numpy array) its owner and address, so it can be
    found again. ``spec`` is the wire's description of it, completed with ``fd`` and ``offset``."""

    __slots__ = ("raw", "owner", "start", "spec")

    def __init__(self, raw: memoryview, spec: dict[str, Any], owner: Any = None, start: int | None = None) -> None:
        self.raw, self.spec, self.owner, self.start = raw, spec, owner, start


def _map_later(waiting: list[Segment]) -> None:
    """Map these segments in a thread, now that their call is over: faulting their pages in costs
    about as much as a copy, better paid between calls than in the next one's way."""

    def work() -> None:
        for segment in waiting:
            with segment.busy:
                if segment.view is None and segment.fd >= 0:
                    try:
                        segment.view = segments.map_fd(segment.fd, segment.size, segments.WRITE, populate=True)
                    except OSError:
                        pass  # base() maps it when it is needed

    if waiting:
        thread = threading.Thread(target=work, name="nbparallel-map-segments", daemon=True)
        _mappers.append(thread)
        thread.start()


_mappers: list[threading.Thread] = []


def settle() -> None:
    """Wait until the segments released so far are mapped (for measurements that must not
    overlap it)."""
    while _mappers:
        _mappers.pop(0).join()


_pinned: dict[Any, list[Segment]] = {}  # job -> the segments sent with it
_idle: list[Segment] = []  # released, oldest first
_live: dict[Segment, None] = {}  # every segment whose descriptor we hold, least recently used first
_timer: threading.Timer | None = None
_timer_due = 0.0
#: What placing cost, for tests and benchmarks: bytes copied, bytes compared, fresh segments.
counters = {"copied": 0, "compared": 0, "referenced": 0, "fresh": 0, "reused": 0}


def place(requests: list[Request], scope: Hashable, job: Any, fds: list[int], fd_index: dict[int, int],
          max_fds: int) -> None:
    """Put each request's bytes in a segment and complete its spec (``fd``: an index into ``fds``,
    to which the segments' descriptors are added; ``offset``). The segments are pinned by ``job``
    until ``release(job)``."""
    with placed.lock:
        pieces: list[Piece] = []
        held: list[set[int] | None] = []  # the scan of other processes, made once when needed
        for request in requests:
            found = placed.lookup(request.owner, request.start, request.raw.nbytes)
            if found is not None and (found.segment.fd in fd_index or len(fds) < max_fds - 1):
                if _usable(found, scope, held):
                    _use(found.segment, found.offset + (request.start or 0) - found.start, request, job, scope,
                         fds, fd_index)
                    counters["referenced"] += request.raw.nbytes
                    continue
            _add_piece(pieces, request)
        if pieces:
            segment = _new_home(pieces, held)
            for piece in pieces:
                if piece.owner is not None and piece.start is not None:  # found again while the owner lives
                    placed.record(piece.owner, piece.start, piece.raw.nbytes, segment, piece.offset, scope)
                for request, offset in piece.requests:
                    _use(segment, piece.offset + offset, request, job, scope, fds, fd_index)
        _trim()
        _limit_descriptors(keep=set(fd_index))


class Piece:
    """Bytes to copy into a new segment: a request's own, or (``owner`` given) a whole array of
    which the requests are views, so other views of it are found there later."""

    __slots__ = ("raw", "owner", "start", "requests", "offset")

    def __init__(self, raw: memoryview, owner: Any, start: int | None) -> None:
        self.raw, self.owner, self.start = raw, owner, start
        self.requests: list[tuple[Request, int]] = []  # each with its offset in the piece
        self.offset = 0  # in the segment


def _add_piece(pieces: list[Piece], request: Request) -> None:
    """The piece that holds the request: one already there for views of the same array, the whole
    array when the view is a good part of it (a quarter or more), or the view alone."""
    owner, start, size = request.owner, request.start, request.raw.nbytes
    if owner is not None and start is not None:
        for piece in pieces:
            if piece.owner is owner and piece.start is not None and piece.start <= start \
                    and start + size <= piece.start + piece.raw.nbytes:
                piece.requests.append((request, start - piece.start))
                return
        first, end = placed.extent(owner)
        whole = bool(owner.flags.c_contiguous or owner.flags.f_contiguous)
        if whole and end - first <= 4 * size and first <= start and start + size <= end and end > first:
            piece = Piece(segments.view_at(first, end - first), owner, first)
            piece.requests.append((request, start - first))
            pieces.append(piece)
            return
    piece = Piece(request.raw, owner, start)
    piece.requests.append((request, 0))
    pieces.append(piece)


def _usable(placement: placed.Placement, scope: Hashable, held: list[set[int] | None]) -> bool:
    """Whether the placement still holds the owner's bytes (bringing it up to date where nobody
    else can see it); False: place the request afresh."""
    segment = placement.segment
    if scope in placement.scopes and scope in segment.jobs.values():
        return True  # the same call sent these very bytes already: they are what it sees
    if not placed.owner_holds(placement):
        placed.drop(placement)
        return False
    size = placement.end - placement.start
    at = segment.base() + placement.offset
    counters["compared"] += size
    if segments.same(at, placement.start, size):
        placement.scopes.add(scope)
        return True
    if not segment.jobs and placed.is_clean(segment, held):  # changed, and nobody sees the segment: rewrite it
        segments.copy(at, placement.start, size)
        counters["copied"] += size
        placement.scopes = {scope}
        return True
    placed.drop(placement)
    return False


def _new_home(pieces: list[Piece], held: list[set[int] | None]) -> Segment:
    """A segment holding these pieces: a pooled one of a fitting size that nobody else uses (a copy
    into pages already there), or a fresh one (written with pwrite, the cheapest first write)."""
    size = 0
    for piece in pieces:
        piece.offset = size
        size = aligned(size + piece.raw.nbytes)
    copied = sum(piece.raw.nbytes for piece in pieces)
    for segment in sorted(_idle, key=lambda s: s.size):
        if size <= segment.size <= 2 * size + segments.PAGE and placed.is_clean(segment, held):
            _idle.remove(segment)
            for placement in list(segment.placements):
                placed.drop(placement)
            base = segment.base()
            for piece in pieces:
                source = piece.start if piece.start is not None else segments.address(piece.raw)
                if source is None:
                    segment.view[piece.offset : piece.offset + piece.raw.nbytes] = piece.raw  # type: ignore[index]
                else:
                    segments.copy(base + piece.offset, source, piece.raw.nbytes)
            counters["copied"] += copied
            counters["reused"] += 1
            return segment
    _trim(need=size)
    segment = Segment(segments.new_segment(size), size)
    _live[segment] = None
    try:
        for piece in pieces:
            segments.write(segment.fd, piece.raw, piece.offset)
    except BaseException:
        _close(segment)
        raise
    counters["copied"] += copied
    counters["fresh"] += 1
    return segment


def _use(segment: Segment, offset: int, request: Request, job: Any, scope: Hashable, fds: list[int],
         fd_index: dict[int, int]) -> None:
    if segment.fd not in fd_index:
        fd_index[segment.fd] = len(fds)
        fds.append(segment.fd)
    _live.pop(segment, None)
    _live[segment] = None  # the most recently used
    request.spec["fd"] = fd_index[segment.fd]
    request.spec["offset"] = offset
    if job not in segment.jobs:
        if not segment.jobs and segment in _idle:
            _idle.remove(segment)
        segment.jobs[job] = scope
        segment.clean = False
        _pinned.setdefault(job, []).append(segment)


def release(job: Any) -> None:
    """The kernel is done with ``job``: the segments only it pinned go to the pool."""
    with placed.lock:
        now = time.monotonic()
        holding: list[Segment] = []  # arrays a later call may send again: compared there
        for segment in _pinned.pop(job, ()):
            segment.jobs.pop(job, None)
            if not segment.jobs and segment.fd >= 0:
                segment.idle_since = now
                segment.clean = False
                _idle.append(segment)
                if segment.placements:
                    holding.append(segment)
        _map_later(holding)
        _trim()


def release_all() -> None:
    """The runner is gone (or going): no job pins anything any more."""
    with placed.lock:
        for job in list(_pinned):
            release(job)


def clear() -> None:
    """Give back every pooled segment now (shutdown)."""
    with placed.lock:
        while _idle:
            _close(_idle.pop(0))


def pooled_bytes() -> int:
    with placed.lock:
        return sum(s.size for s in _idle)


def _trim(need: int = 0) -> None:
    """Give back pooled segments past their time, beyond the byte bound, or all of them when memory
    runs short; arm a timer to come back while some remain."""
    global _timer, _timer_due
    now = time.monotonic()
    while _idle and now - _idle[0].idle_since > POOL_SECONDS:
        _close(_idle.pop(0))
    total = sum(s.size for s in _idle)
    if _idle:
        available = segments.mem_available()
        cap = POOL_MAX_BYTES if available is None else min(POOL_MAX_BYTES, max(0, available + total - need) // 4)
        while _idle and total > cap:
            oldest = _idle.pop(0)
            total -= oldest.size
            _close(oldest)
    if _idle:
        due = _idle[0].idle_since + POOL_SECONDS  # when the oldest one's time is up
        if _timer is None or due < _timer_due:
            if _timer is not None:
                _timer.cancel()
            _timer, _timer_due = threading.Timer(max(0.0, due - now) + 0.05, _on_timer), due
            _timer.daemon = True
            _timer.start()


def _on_timer() -> None:
    global _timer
    with placed.lock:
        _timer = None
        _trim()


def _limit_descriptors(keep: set[int]) -> None:
    """Hold at most ``max_segments()`` descriptors: past that, let the least recently used segments
    go (pooled ones first). One still in flight lives on in the processes it was sent to; we just
    can no longer send it again. ``keep``: descriptors about to be sent."""
    cap = max_segments()
    for candidates in (list(_idle), list(_live)):
        for segment in candidates:
            if len(_live) <= cap:
                return
            if segment.fd not in keep:
                if segment in _idle:
                    _idle.remove(segment)
                _close(segment)


def max_segments() -> int:
    """How many segment descriptors the kernel keeps: an eighth of its open-file limit, at most 256."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(256, soft // 8)) if soft != resource.RLIM_INFINITY else 256


def _close(segment: Segment) -> None:
    _live.pop(segment, None)
    for placement in list(segment.placements):
        placed.drop(placement)
    with segment.busy:  # not while it is being mapped
        segment.view = None  # our mapping goes when the last view of it does
        if segment.fd >= 0:
            try:
                os.close(segment.fd)
            except OSError:
                pass
            segment.fd = -1


