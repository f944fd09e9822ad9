"""What the kernel placed where: its segments, and the owners' bytes each holds (kernel side).

A placement remembers that bytes of an owner's memory (a numpy array's, found by ``id``) were
copied to an offset in a segment, for as long as the owner lives, so the same buffer sent again is
found (``lookup``) rather than copied. placement.py decides what to place and keeps the segments
pooled; this is only the record, and ``lock``, which guards it and the pool alike.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Hashable
from typing import Any

from . import segments

#: Held while the record or placement.py's pool changes (a finalizer of an owner takes it too).
lock = threading.RLock()
_placed: dict[int, list[Placement]] = {}  # id(owner) -> its placements
_owners: dict[int, weakref.ref[Any]] = {}  # id(owner) -> the owner, while it lives


class Segment:
    """A segment made here: its descriptor, its mapping in this process (made when first needed),
    the jobs it was sent with and not yet released (job -> scope), and the placements it holds."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.inode = os.fstat(fd).st_ino
        self.view: memoryview | None = None
        self.jobs: dict[Any, Hashable] = {}
        self.idle_since = 0.0
        self.clean = False  # nobody else maps it or holds it since it was released
        self.placements: list[Placement] = []
        self.busy = threading.Lock()  # held while it is mapped or closed (here or in the background)

    def base(self) -> int:
        """The address of our mapping of it (shared, writable; every page faulted in at once)."""
        with self.busy:  # a mapping under way in the background is waited for
            if self.view is None:
                self.view = segments.map_fd(self.fd, self.size, segments.WRITE, populate=True)
            address = segments.address(self.view)
        assert address is not None
        return address


class Placement:
    """Bytes ``start..end`` of ``owner``'s memory (``key``: its id), copied to ``offset`` in ``segment``."""

    __slots__ = ("owner", "key", "start", "end", "segment", "offset", "scopes")

    def __init__(self, owner: weakref.ref[Any], key: int, start: int, end: int, segment: Segment, offset: int,
                 scope: Hashable) -> None:
        self.owner, self.key, self.start, self.end = owner, key, start, end
        self.segment, self.offset = segment, offset
        self.scopes = {scope}  # the calls that saw these bytes as they are (placed or compared)


def lookup(owner: Any, start: int | None, size: int) -> Placement | None:
    """A live placement of ``owner`` that holds all of its bytes ``start..start+size``."""
    if owner is None or start is None:
        return None
    end = start + size
    for placement in _placed.get(id(owner), ()):
        if placement.start <= start and end <= placement.end and placement.owner() is owner:
            return placement
    return None


def owner_holds(placement: Placement) -> bool:
    """The owner still has those bytes (a numpy array's memory can move: ``ndarray.resize``)."""
    owner = placement.owner()
    if owner is None:
        return False
    start, end = extent(owner)
    return start <= placement.start and placement.end <= end


def extent(array: Any) -> tuple[int, int]:
    """The addresses of the first and past the last byte a numpy array spans (any strides)."""
    start = end = int(array.__array_interface__["data"][0])
    if array.size:
        for count, stride in zip(array.shape, array.strides):
            if stride < 0:
                start += (count - 1) * stride
            else:
                end += (count - 1) * stride
        end += array.itemsize
    return start, end


def is_clean(segment: Segment, held: list[set[int] | None]) -> bool:
    """Nobody else maps the segment or holds its descriptor (``held``: the scan of other processes,
    made once when first needed)."""
    if segment.clean:
        return True
    if not held:
        held.append(segments.held_by_descendants())
    if held[0] is not None and segment.inode not in held[0]:
        segment.clean = True
    return segment.clean


def record(owner: Any, start: int, size: int, segment: Segment, offset: int, scope: Hashable) -> None:
    """Remember that ``owner``'s bytes ``start..start+size`` went to ``offset`` in ``segment``,
    while the owner lives."""
    key = id(owner)
    reference = _owners.get(key)
    if reference is None:
        try:
            reference = weakref.ref(owner)
            weakref.finalize(owner, _forget_owner, key)
        except TypeError:  # an owner without weak references cannot be found again
            return
        _owners[key], _placed[key] = reference, []
    placement = Placement(reference, key, start, start + size, segment, offset, scope)
    _placed[key].append(placement)
    segment.placements.append(placement)


def drop(placement: Placement) -> None:
    """Forget a placement: its bytes in the segment no longer stand for the owner's."""
    if placement in placement.segment.placements:
        placement.segment.placements.remove(placement)
    owned = _placed.get(placement.key)
    if owned and placement in owned:
        owned.remove(placement)


def _forget_owner(key: int) -> None:
    with lock:
        _owners.pop(key, None)
        for placement in _placed.pop(key, ()):
            if placement in placement.segment.placements:
                placement.segment.placements.remove(placement)
