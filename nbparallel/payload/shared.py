"""Values placed in shared memory by the caller, to be sent by reference: ``shared_array`` and
``share``.

``shared_array`` allocates an array in a segment to begin with, and ``share`` places a value there
once. Such an array, and every view of it (contiguous or strided, any size, empty ones too),
travels as a reference to the segment (shm.py looks each array up here as it pickles): workers get a
view of the same memory, writable for a ``shared_array``, so what they write is seen by everyone.
Read-only (``share``, or an array marked read-only), a write raises instead of going to a private
copy. A segment is forgotten, and its descriptor closed, when its array (every view of it) or its
handle is gone.
"""

from __future__ import annotations

import bisect
import os
import pickle
import threading
import weakref
from typing import Any

import cloudpickle

from . import segments
from .placement import aligned
from .segments import AVAILABLE
from ..wire.frames import close_fds

__all__ = ["Shared", "share", "shared_array"]


class Registered:
    """A segment made by shared_array or share: its descriptor, and our mapping's address range."""

    __slots__ = ("fd", "start", "end", "writable", "view")

    def __init__(self, fd: int, start: int, view: memoryview, writable: bool) -> None:
        self.fd, self.start, self.end, self.view, self.writable = fd, start, start + view.nbytes, view, writable


#: By the start address of our mapping; shm.py looks an array up only while this is not empty.
registered: dict[int, Registered] = {}
_starts: list[int] = []  # sorted keys of registered
_registered_lock = threading.Lock()


def register(fd: int, view: memoryview, *, writable: bool) -> int:
    start = segments.address(view)
    assert start is not None
    with _registered_lock:
        registered[start] = Registered(fd, start, view, writable)
        bisect.insort(_starts, start)
    return start


def forget(start: int) -> None:
    with _registered_lock:
        entry = registered.pop(start, None)
        if entry is not None:
            del _starts[bisect.bisect_left(_starts, start)]
    if entry is not None:
        close_fds([entry.fd])


def segment_at(start: int, end: int) -> Registered | None:
    """The registered segment holding bytes ``start..end`` (``start == end``: an empty array there)."""
    with _registered_lock:
        at = bisect.bisect_right(_starts, start) - 1
        if at < 0:
            return None
        found = registered[_starts[at]]
    return found if end <= found.end else None


def shared_array(shape: int | tuple[int, ...], dtype: Any = float) -> Any:
    """A numpy array allocated in shared memory from the start.

    Passing it, or any view of it (slices, strided or transposed views, inside closures, lists,
    dicts or objects), to workers copies nothing: they map the same memory, writable, so they can
    fill their own part in place. The memory is freed when the array, every view of it and every
    worker mapping are gone.
    """
    import numpy  # optional: shared_array needs it, the rest of nbparallel does not

    dtype = numpy.dtype(dtype)
    count = int(numpy.prod(shape))
    size = count * dtype.itemsize
    if not AVAILABLE:
        return numpy.zeros(shape, dtype)
    fd, view = segments.new_mapped(size, "shared-array")
    array = numpy.frombuffer(view, dtype=dtype, count=count).reshape(shape)
    start = register(fd, view, writable=True)
    # When the array and its views are gone, forget the segment and close our descriptor.
    weakref.finalize(array.base if array.base is not None else array, forget, start)
    return array


class Shared:
    """A value placed in shared memory once, for use by any number of calls (``nbparallel.share``).

    Passing the handle (as an argument, or captured by the mapped function) sends only a reference
    to the segment; each worker unpickles the value once and keeps it, its arrays mapped read-only.
    Use ``handle.value`` wherever the value is needed, in the kernel and in the task alike. In the
    kernel it is backed by the same memory: drop the original to keep a single copy. The memory is
    freed when the handle and every worker's copy are gone.
    """

    def __init__(self, value: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []

        def collect(buffer: pickle.PickleBuffer) -> bool:
            try:
                buffer.raw()
            except BufferError:
                return True  # not contiguous: inline
            buffers.append(buffer)
            return False

        stream = cloudpickle.dumps(value, protocol=5, buffer_callback=collect)
        raws = [b.raw().cast("B") for b in buffers]
        layout: list[tuple[int, int]] = []
        at = aligned(len(stream))
        for raw in raws:
            layout.append((at, raw.nbytes))
            at = aligned(at + raw.nbytes)
        self.token = os.urandom(8).hex()
        self.nbytes = at
        if not AVAILABLE:  # no shared memory here: the handle pickles as the value itself
            self.value = value
            self._layout: tuple[int, list[tuple[int, int]]] | None = None
            return
        fd, view = segments.new_mapped(at, "shared")
        view[: len(stream)] = stream
        for (offset, size), raw in zip(layout, raws):
            view[offset : offset + size] = raw
        self._start = register(fd, view, writable=False)
        self._view = view
        self._layout = (len(stream), layout)
        self.value = _rebuild_from(self._view, self._layout)
        weakref.finalize(self, forget, self._start)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if self._layout is None or not isinstance(protocol, int) or protocol < 5:
            return (_identity, (self.value,))
        return (_attach, (self.token, self._layout, pickle.PickleBuffer(self._view)))

    def __repr__(self) -> str:
        return f"<nbparallel.Shared {type(self.value).__name__}, {self.nbytes / 2**20:.1f} MiB in shared memory>"


def _rebuild_from(view: memoryview, layout: tuple[int, list[tuple[int, int]]]) -> Any:
    stream_size, buffers = layout
    return pickle.loads(view[:stream_size], buffers=[view[o : o + n] for o, n in buffers])


def _identity(value: Any) -> Any:
    return value


_attached: dict[str, Shared] = {}  # in a worker: token -> handle, most recent last
_ATTACHED_KEPT = 16


def _attach(token: str, layout: tuple[int, list[tuple[int, int]]], buffer: Any) -> Shared:
    """In a worker: the handle, its value unpickled on first use and kept for later calls."""
    handle = _attached.pop(token, None)
    if handle is None:
        handle = Shared.__new__(Shared)
        handle.token, handle._layout = token, None
        handle.value = _rebuild_from(memoryview(buffer), layout)
        handle.nbytes = len(buffer.raw()) if isinstance(buffer, pickle.PickleBuffer) else memoryview(buffer).nbytes
    _attached[token] = handle
    while len(_attached) > _ATTACHED_KEPT:
        _attached.pop(next(iter(_attached)))
    return handle


def share(value: Any) -> Shared:
    """Place ``value`` in shared memory once and return a handle to pass to any number of calls.

    ``m = nbparallel.share(model)``, then ``nbparallel.map(lambda x: m.value.predict(x), batches)``:
    every call sends a reference, each worker unpickles the model once, and its arrays are the
    shared memory itself.
    """
    return Shared(value)
