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
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .protocol import MAX_FDS

OUT_OF_BAND_MIN = 1 << 20  # smaller buffers are cheaper inline than as a segment of their own
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
        for fd in self.owned:
            try:
                os.close(fd)
            except OSError:
                pass
        self.owned = []


# Segments made by shared_array, by the address range of their mapping.
_segments: dict[int, tuple[int, int, int, mmap.mmap]] = {}  # start -> (end, fd, size, mapping)
_segments_lock = threading.Lock()


def _address(view: memoryview) -> int:
    import ctypes

    if view.readonly:
        import numpy

        return int(numpy.frombuffer(view, dtype=numpy.uint8).__array_interface__["data"][0])
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _find_segment(view: memoryview) -> tuple[int, int, bool] | None:
    """(fd, offset) if ``view`` lies inside a shared_array segment."""
    if not _segments:
        return None
    start = _address(view)
    with _segments_lock:
        for seg_start, (seg_end, fd, _, _) in _segments.items():
            if seg_start <= start and start + view.nbytes <= seg_end:
                return fd, start - seg_start, True
    return None


def _new_segment(size: int, name: str) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, max(size, 1))
        return fd, mmap.mmap(fd, max(size, 1))
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
            fd, mapping = _new_segment(raw.nbytes, "nbparallel-buffer")
            with mapping:
                mapping[:] = raw.cast("B")  # the one copy: into memory every worker can map
            owned.append(fd)
            offset, writable = 0, False
        if fd not in fd_index:
            fd_index[fd] = len(fds)
            fds.append(fd)
        specs.append({"fd": fd_index[fd], "offset": offset, "size": raw.nbytes, "writable": writable})
        return False

    try:
        data = cloudpickle.dumps(value, protocol=5, buffer_callback=place if AVAILABLE else None)
    except BaseException:
        for fd in owned:
            os.close(fd)
        raise
    return Packed(data, fds, specs, owned)


def loads(data: Any, fds: list[int], specs: list[dict[str, Any]], *, private: bool = False) -> Any:
    """Unpickle, mapping the out-of-band buffers. Closes ``fds`` (the mappings keep the memory).

    ``private``: map copy-on-write, so the receiver may change the arrays without touching anyone
    else's (used for results, which belong to the caller alone). Otherwise buffers are mapped
    read-only, except those of shared_array segments, which are shared and writable.
    """
    try:
        if not specs:
            return pickle.loads(data)
        maps: dict[tuple[int, int], mmap.mmap] = {}
        buffers: list[memoryview] = []
        for spec in specs:
            fd = fds[spec["fd"]]
            access = mmap.ACCESS_COPY if private else (mmap.ACCESS_WRITE if spec["writable"] else mmap.ACCESS_READ)
            key = (spec["fd"], access)
            if key not in maps:
                maps[key] = mmap.mmap(fd, 0, access=access)
            view = memoryview(maps[key])[spec["offset"] : spec["offset"] + spec["size"]]
            buffers.append(view)
        return pickle.loads(data, buffers=buffers)
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def shared_array(shape: int | tuple[int, ...], dtype: Any = float) -> Any:
    """A numpy array allocated in shared memory from the start.

    Passing it (or any slice of it) to workers copies nothing: they map the same memory, writable,
    so they can also fill their own slices in place. The memory is freed when the array, every
    view of it and every worker mapping are gone.
    """
    import numpy

    dtype = numpy.dtype(dtype)
    count = int(numpy.prod(shape))
    size = count * dtype.itemsize
    if not AVAILABLE:
        return numpy.zeros(shape, dtype)
    fd, mapping = _new_segment(size, "nbparallel-shared-array")
    array = numpy.frombuffer(mapping, dtype=dtype, count=count).reshape(shape)
    start = _address(memoryview(mapping))
    with _segments_lock:
        _segments[start] = (start + max(size, 1), fd, size, mapping)
    # When the array and its views are gone, forget the segment and close our descriptor.
    import weakref

    weakref.finalize(array.base if array.base is not None else array, _forget, start)
    return array


def _forget(start: int) -> None:
    with _segments_lock:
        entry = _segments.pop(start, None)
    if entry is not None:
        try:
            os.close(entry[1])
        except OSError:
            pass
