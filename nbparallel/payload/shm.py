"""Large buffers out of band, in shared memory: numpy arrays and the objects built on them.

Pickle protocol 5 hands us each large contiguous buffer (a numpy array's data, a pandas column)
through ``buffer_callback``. Instead of copying it into the pickle stream and through the sockets,
we put it in an anonymous shared-memory file (Linux ``memfd_create``) and pass the file descriptor
with the frame (SCM_RIGHTS). The receiver maps it: the array it unpickles *is* that memory.

No segment has a name, so nothing can be left in /dev/shm: a segment lives exactly as long as some
process holds its descriptor or a mapping of it, and the sidecar (which holds the descriptors
between the kernel and the workers, never mapping them) closes its copies when the job ends.

``shared_array`` allocates an array in such a segment to begin with: passing it, or a slice of it,
copies nothing at all, and workers map it writable, so they can fill their part in place.
Where ``memfd_create`` does not exist (macOS) everything travels in band, as before.
"""

from __future__ import annotations

import mmap
import os
import pickle
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import cloudpickle

from ..wire.frames import MAX_FDS, close_fds

OUT_OF_BAND_MIN = 1 << 20  # smaller buffers are cheaper inline than as a segment of their own
# A pickle stream this large (big bytes or strings, many small objects) goes into a segment of its
# own too: the sidecar then holds a descriptor, never the megabytes, and stays small.
STREAM_OUT_OF_BAND_MIN = 4 << 20
AVAILABLE = hasattr(os, "memfd_create")


@dataclass
class Packed:
    """A pickled value: the stream, the descriptors of its out-of-band buffers, and where each
    buffer sits in them (``specs``: fd index, offset, size, writable)."""

    data: bytes
    fds: list[int]
    specs: list[dict[str, Any]]
    owned: list[int]  # descriptors made for this value alone: close them once sent

    def close(self) -> None:
        close_fds(self.owned)
        self.owned = []


# Segments made by shared_array and share, by the address range of their mapping.
_segments: dict[int, tuple[int, int, bool, mmap.mmap]] = {}  # start -> (end, fd, writable, mapping)
_segments_lock = threading.Lock()


def _address(view: memoryview) -> int:
    import ctypes  # only for a read-only buffer's address, rarely

    if view.readonly:
        import numpy  # optional: only here when the buffer came from numpy

        return int(numpy.frombuffer(view, dtype=numpy.uint8).__array_interface__["data"][0])
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _find_segment(view: memoryview) -> tuple[int, int, bool] | None:
    """(fd, offset) if ``view`` lies inside a shared_array segment."""
    if not _segments:
        return None
    start = _address(view)
    with _segments_lock:
        for seg_start, (seg_end, fd, writable, _) in _segments.items():
            if seg_start <= start and start + view.nbytes <= seg_end:
                return fd, start - seg_start, writable
    return None


def _new_segment(size: int, name: str) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(size, 1))
        return fd, mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.close(fd)
        raise


def segment_with(raw: memoryview) -> int:
    """A new segment holding a copy of ``raw``. Written with pwrite: the kernel fills fresh pages
    faster than page faults through a mapping would."""
    fd = os.memfd_create("nbparallel-buffer", os.MFD_CLOEXEC)
    try:
        view, at = raw.cast("B"), 0
        while at < view.nbytes:
            at += os.pwrite(fd, view[at:], at)
        return fd
    except BaseException:
        os.close(fd)
        raise


def dumps(value: Any) -> Packed:
    """Pickle ``value``, moving large buffers into shared memory."""
    fds: list[int] = []
    owned: list[int] = []
    specs: list[dict[str, Any]] = []
    fd_index: dict[int, int] = {}

    def place(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: let pickle copy it inline
            return True
        if raw.nbytes < OUT_OF_BAND_MIN or len(fds) >= MAX_FDS:
            return True
        found = _find_segment(raw)
        if found is not None:
            fd, offset, writable = found
        else:
            fd = segment_with(raw)  # the one copy: into memory every worker can map
            owned.append(fd)
            offset, writable = 0, False
        if fd not in fd_index:
            fd_index[fd] = len(fds)
            fds.append(fd)
        spec = {"fd": fd_index[fd], "offset": offset, "size": raw.nbytes, "writable": writable}
        if found is not None:
            spec["keep"] = True  # a long-lived segment: receivers may keep the mapping for next time
        specs.append(spec)
        return False

    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=place if AVAILABLE else None)
        if AVAILABLE and len(data) >= STREAM_OUT_OF_BAND_MIN and len(fds) < MAX_FDS:
            fd = segment_with(memoryview(data))
            owned.append(fd)
            specs.append({"fd": len(fds), "offset": 0, "size": len(data), "writable": False, "stream": True})
            fds.append(fd)
            data = b""
    except BaseException:
        close_fds(owned)
        raise
    return Packed(data, fds, specs, owned)


def loads(data: Any, fds: list[int], specs: list[dict[str, Any]], *, private: bool = False) -> Any:
    """Unpickle, mapping the out-of-band buffers. Closes ``fds`` (the mappings keep the memory).

    ``private``: map copy-on-write, so the receiver may change the arrays without touching anyone
    else's (used for results, which belong to the caller alone). Otherwise buffers are mapped
    read-only, except those of shared_array segments, which are shared and writable.
    """
    stream: mmap.mmap | None = None
    try:
        if not specs:
            return pickle.loads(data)
        maps: dict[tuple[int, int], mmap.mmap] = {}
        buffers: list[memoryview] = []
        for spec in specs:
            fd = fds[spec["fd"]]
            if spec.get("stream"):  # the pickle stream itself (see STREAM_OUT_OF_BAND_MIN)
                stream = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                continue
            access = mmap.ACCESS_COPY if private else (mmap.ACCESS_WRITE if spec["writable"] else mmap.ACCESS_READ)
            key = (spec["fd"], access)
            if key not in maps:
                maps[key] = _kept_map(fd, access) if spec.get("keep") and not private else mmap.mmap(fd, 0, access=access)
            view = memoryview(maps[key])[spec["offset"] : spec["offset"] + spec["size"]]
            buffers.append(view)
        if stream is None:
            return pickle.loads(data, buffers=buffers)
        with memoryview(stream) as view:  # unpickling copies out what it keeps: unmap it after
            return pickle.loads(view, buffers=buffers)
    finally:
        if stream is not None:
            stream.close()
        close_fds(fds)


_kept: dict[tuple[int, int, int], mmap.mmap] = {}  # (device, inode, access) -> mapping, oldest first
_KEPT_MAPS = 8


def _kept_map(fd: int, access: int) -> mmap.mmap:
    """The mapping of a long-lived segment (a shared_array, a shared value), made once per process:
    mapping it afresh for every chunk would fault every page in again each time."""
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino, access)
    mapping = _kept.pop(key, None)
    if mapping is None or mapping.closed or len(mapping) != info.st_size:
        mapping = mmap.mmap(fd, 0, access=access)
    _kept[key] = mapping
    while len(_kept) > _KEPT_MAPS:
        _kept.pop(next(iter(_kept)))
    return mapping


def shared_array(shape: int | tuple[int, ...], dtype: Any = float) -> Any:
    """A numpy array allocated in shared memory from the start.

    Passing it (or any slice of it) to workers copies nothing: they map the same memory, writable,
    so they can also fill their own slices in place. The memory is freed when the array, every
    view of it and every worker mapping are gone.
    """
    import numpy  # optional: shared_array needs it, the rest of nbparallel does not

    dtype = numpy.dtype(dtype)
    count = int(numpy.prod(shape))
    size = count * dtype.itemsize
    if not AVAILABLE:
        return numpy.zeros(shape, dtype)
    fd, mapping = _new_segment(size, "nbparallel-shared-array")
    array = numpy.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)
    start = _register(fd, mapping, writable=True)
    # When the array and its views are gone, forget the segment and close our descriptor.
    weakref.finalize(array.base if array.base is not None else array, _forget, start)
    return array


def _register(fd: int, mapping: mmap.mmap, *, writable: bool) -> int:
    start = _address(memoryview(mapping))
    with _segments_lock:
        _segments[start] = (start + len(mapping), fd, writable, mapping)
    return start


_ALIGN = 64  # buffers start on cache-line boundaries, as numpy likes


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
        at = _aligned(len(stream))
        for raw in raws:
            layout.append((at, raw.nbytes))
            at = _aligned(at + raw.nbytes)
        self.token = os.urandom(8).hex()
        self.nbytes = at
        if not AVAILABLE:  # no shared memory here: the handle pickles as the value itself
            self.value = value
            self._layout: tuple[int, list[tuple[int, int]]] | None = None
            return
        fd, mapping = _new_segment(at, "nbparallel-shared")
        mapping[: len(stream)] = stream
        for (offset, size), raw in zip(layout, raws):
            mapping[offset : offset + size] = raw
        self._start = _register(fd, mapping, writable=False)
        self._view = memoryview(mapping)
        self._layout = (len(stream), layout)
        self.value = _rebuild_from(self._view, self._layout)
        weakref.finalize(self, _forget, self._start)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        if self._layout is None or not isinstance(protocol, int) or protocol < 5:
            return (_identity, (self.value,))
        return (_attach, (self.token, self._layout, pickle.PickleBuffer(self._view)))

    def __repr__(self) -> str:
        return f"<nbparallel.Shared {type(self.value).__name__}, {self.nbytes / 2**20:.1f} MiB in shared memory>"


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


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


def _forget(start: int) -> None:
    with _segments_lock:
        entry = _segments.pop(start, None)
    if entry is not None:
        close_fds([entry[1]])
