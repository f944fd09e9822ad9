"""The slot: 32 bytes a worker shares with the sidecar, saying which item it is running.

The sidecar makes the memory (an anonymous memfd, or an unlinked file in its private directory),
maps it and passes the descriptor to the worker, which maps it too. The worker writes before each
item (or each run of items going through ``map()`` at once); the sidecar reads when the worker's
socket closes (which item killed it?), to enforce a per-item timeout, and for ``status``. See
docs/protocol.md, "The slot".
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import NamedTuple

#: chunk id, offset, run width (int64 each), started (float64): native order, both ends on one machine.
LAYOUT = struct.Struct("qqqd")
SIZE = LAYOUT.size
# Where each field sits in the typed views below (their element index).
CHUNK, OFFSET, WIDTH, STARTED = 0, 1, 2, 3


class SlotState(NamedTuple):
    """What the slot said when it was read."""

    chunk: int  # the chunk the worker runs (-1: none)
    offset: int  # the offset of the item it is on within that chunk, or of the first of a run
    width: int  # how many items that run has (1: the item at ``offset`` alone)
    started: float  # time.monotonic() when that item started (a clock both processes share); 0: untimed


class Slot:
    """One worker's slot: ``write`` in the worker, ``read`` in the sidecar."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        # Item assignment through typed views is the cheapest write: the worker's per-item loop
        # writes ``ints[OFFSET]`` (and ``times[STARTED]``) through them directly.
        self.ints = memoryview(memory).cast("q")
        self.times = memoryview(memory).cast("d")

    @classmethod
    def create(cls, fd: int) -> Slot:
        """The sidecar's side: size the file ``fd``, map it, start empty (no chunk, width 1)."""
        os.ftruncate(fd, SIZE)
        slot = cls(mmap.mmap(fd, SIZE))
        LAYOUT.pack_into(slot.memory, 0, -1, -1, 1, 0.0)
        return slot

    @classmethod
    def attach(cls, fd: int) -> Slot:
        """The worker's side: map the slot the sidecar passed as ``fd`` (the caller may close ``fd``)."""
        return cls(mmap.mmap(fd, SIZE))

    def read(self) -> SlotState:
        chunk, offset, width, started = LAYOUT.unpack_from(self.memory)
        return SlotState(int(chunk), int(offset), int(width), float(started))

    def write(self, *, chunk: int | None = None, offset: int | None = None, width: int | None = None,
              started: float | None = None) -> None:
        """Set the fields given, in this order: ``started`` before ``offset``, so a reader that sees
        a new item never sees the previous item's start time with it."""
        if started is not None:
            self.times[STARTED] = started
        if chunk is not None:
            self.ints[CHUNK] = chunk
        if offset is not None:
            self.ints[OFFSET] = offset
        if width is not None:
            self.ints[WIDTH] = width

    def close(self) -> None:
        self.ints.release()
        self.times.release()
        self.memory.close()
