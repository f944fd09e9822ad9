"""Large buffers out of band, in shared memory: numpy arrays and the objects built on them.

Pickle protocol 5 hands us each large contiguous buffer (a numpy array's data, a pandas column)
through ``buffer_callback``. Instead of copying it into the pickle stream and through the sockets,
we put it in an anonymous shared-memory file (Linux ``memfd_create``) and pass the file descriptor
with the frame (SCM_RIGHTS). The receiver maps it: the array it unpickles *is* that memory, and the
mapping keeps no descriptor (segments.py), so kept results cost no open files.

In the kernel a buffer is placed when its frame is sent (``Packed.place``, by the runner): once per
buffer, in a segment reused from a pool where it can be (placement.py). Workers put their results
in fresh segments of their own.

An array that lives in a segment made by ``shared_array`` or ``share`` (shared.py), and every view
of it, travels as a reference to that segment: no copy. Read-only ones (``share``, or an array
marked read-only) are mapped read-only by the receiver, so a write raises instead of going to a
private copy.

No segment has a name, so nothing can be left in /dev/shm: a segment lives exactly as long as some
process holds its descriptor or a mapping of it, and the sidecar (which holds the descriptors
between the kernel and the workers, never mapping them) closes its copies when the job ends.
Where ``memfd_create`` does not exist (macOS) everything travels in band.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import placed, placement, segments, shared
from .segments import AVAILABLE, SharedMemoryLimit
from .shared import Registered
from ..wire.frames import MAX_FDS, close_fds

__all__ = ["Packed", "SharedMemoryLimit", "dumps", "loads", "segment_with"]

OUT_OF_BAND_MIN = 1 << 20  # smaller buffers are cheaper inline than as a segment of their own
# A pickle stream this large (big bytes or strings, many small objects) goes into a segment of its
# own too: the sidecar then holds a descriptor, never the megabytes, and stays small.
STREAM_OUT_OF_BAND_MIN = 4 << 20


class Packed:
    """A pickled value: the stream, the descriptors of its out-of-band buffers, and where each
    buffer sits in them (``specs``: fd index, offset, size, writable).

    Buffers of a value pickled with ``deferred=True`` are placed when ``place`` is called (the
    runner does, as it sends the frame); reading ``fds`` first places them in a fresh segment."""

    def __init__(self, data: bytes, specs: list[dict[str, Any]], fds: list[int], owned: list[int],
                 requests: list[placement.Request], fd_index: dict[int, int]) -> None:
        self.data, self.specs, self._fds = data, specs, fds
        self.owned = owned  # descriptors made for this value alone: closed once sent
        self.requests = requests
        self.fd_index = fd_index
        #: The jobs of its group are one call (a joblib Parallel call's batches): a buffer placed for
        #: one of them is what the others see, as joblib's own memmapping does within a call.
        self.group_is_one_call = False

    @property
    def fds(self) -> list[int]:
        if self.requests:
            self.place()
        return self._fds

    def place(self, scope: Any = None, job: Any = None) -> None:
        """Put the pending buffers in shared memory. With a ``scope`` (the call) and a ``job``,
        through the kernel's placements (placement.py); without, in one fresh segment of their own."""
        requests, self.requests = self.requests, []
        if not requests:
            return
        if scope is not None:
            placement.place(requests, scope, job, self._fds, self.fd_index, MAX_FDS)
            return
        size = 0
        for request in requests:
            size = placement.aligned(size + request.raw.nbytes)
        fd = segments.new_segment(size)
        self.owned.append(fd)
        at = 0
        for request in requests:
            segments.write(fd, request.raw, at)
            request.spec["fd"], request.spec["offset"] = len(self._fds), at
            at = placement.aligned(at + request.raw.nbytes)
        self._fds.append(fd)

    def close(self) -> None:
        close_fds(self.owned)
        self.owned = []
        self.requests = []


def _rebuild_view(buffer: Any, dtype: Any, shape: tuple[int, ...], strides: tuple[int, ...], offset: int) -> Any:
    """In the receiver: a view of a shared segment, laid out as the sender's array was."""
    import numpy  # only arrays from a shared segment come here, so numpy is there

    return numpy.ndarray(shape, dtype, buffer=buffer, offset=offset, strides=strides)


class _Packer:
    """What one ``dumps`` call collects: descriptors, specs, and buffers waiting to be placed."""

    def __init__(self, deferred: bool) -> None:
        self.deferred = deferred
        self.fds: list[int] = []
        self.fd_index: dict[int, int] = {}
        self.specs: list[dict[str, Any]] = []
        self.owned: list[int] = []
        self.requests: list[placement.Request] = []
        self.known: dict[int, tuple[Registered, int, bool]] = {}  # id(PickleBuffer) -> where it lies
        self.made: list[pickle.PickleBuffer] = []  # keeps those ids unique while pickling
        self.ndarray = getattr(sys.modules.get("numpy"), "ndarray", None)

    def place(self, buffer: pickle.PickleBuffer) -> bool:
        """pickle's ``buffer_callback``: False sends the buffer out of band."""
        known = self.known.pop(id(buffer), None)
        if known is not None:
            segment, offset, writable = known
            self.reference(segment, offset, buffer.raw().nbytes, writable)
            return False
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: let pickle copy it inline
            return True
        if raw.nbytes == 0:
            return True
        if shared.registered:
            start = segments.address(raw)
            found = None if start is None else shared.segment_at(start, start + raw.nbytes)
            if found is not None and start is not None:
                self.reference(found, start - found.start, raw.nbytes, found.writable and not raw.readonly)
                return False
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        spec: dict[str, Any] = {"size": raw.nbytes, "writable": False}
        if self.deferred:
            owner, start = self.owner(raw)
            self.requests.append(placement.Request(raw.cast("B"), spec, owner, start))
        else:
            if len(self.fds) >= MAX_FDS:
                return True
            fd = segment_with(raw)  # the one copy: into memory every worker can map
            self.owned.append(fd)
            spec.update(fd=len(self.fds), offset=0)
            self.fds.append(fd)
        self.specs.append(spec)
        return False

    def owner(self, raw: memoryview) -> tuple[Any, int | None]:
        """The array that owns a numpy buffer's memory (views of one base share it), and the
        buffer's address; (None, None) for anything else."""
        array = raw.obj
        if self.ndarray is None or not isinstance(array, self.ndarray):
            return None, None
        start = int(array.__array_interface__["data"][0])
        while isinstance(array.base, self.ndarray):
            array = array.base
        return array, start

    def reference(self, segment: Registered, offset: int, size: int, writable: bool) -> None:
        """A spec for bytes of a registered segment: no copy, the receiver maps the segment."""
        if segment.fd not in self.fd_index:
            if len(self.fds) >= MAX_FDS - 1:
                raise pickle.PicklingError(f"more than {MAX_FDS - 1} shared arrays in one message: send fewer at once")
            self.fd_index[segment.fd] = len(self.fds)
            self.fds.append(segment.fd)
        # keep: a long-lived segment, so receivers keep their mapping of it for the next time
        self.specs.append({"fd": self.fd_index[segment.fd], "offset": offset, "size": size, "writable": writable,
                           "keep": True})

    def shared_view(self, array: Any) -> Any:
        """How an array inside a registered segment pickles: a reference to its bytes there, and
        its layout (any strides, empty included). None: not in one."""
        if array.dtype.hasobject:
            return None
        start, end = placed.extent(array)
        segment = shared.segment_at(start, end)
        if segment is None:
            return None
        buffer = pickle.PickleBuffer(segment.view[start - segment.start : end - segment.start])
        self.made.append(buffer)
        self.known[id(buffer)] = (segment, start - segment.start, segment.writable and bool(array.flags.writeable))
        first = int(array.__array_interface__["data"][0])
        return (_rebuild_view, (buffer, array.dtype, array.shape, array.strides, first - start))


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle is untyped
    """cloudpickle, with arrays that live in a registered segment sent as references to it."""

    def __init__(self, file: io.BytesIO, packer: _Packer) -> None:
        super().__init__(file, protocol=5, buffer_callback=packer.place)
        self.packer = packer
        self.ndarray = packer.ndarray

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is self.ndarray:  # exactly ndarray: subclasses keep their own pickling
            reduced = self.packer.shared_view(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)


def dumps(value: Any, *, deferred: bool = False) -> Packed:
    """Pickle ``value``, moving large buffers into shared memory. ``deferred``: leave the large
    buffers to ``Packed.place`` (the kernel's runner places them as it sends the frame)."""
    packer = _Packer(deferred)
    try:
        if not AVAILABLE:
            data = cloudpickle.dumps(value, protocol=5)
        elif shared.registered and packer.ndarray is not None:
            with io.BytesIO() as file:
                _Pickler(file, packer).dump(value)
                data = file.getvalue()
        else:
            data = cloudpickle.dumps(value, protocol=5, buffer_callback=packer.place)
        if AVAILABLE and len(data) >= STREAM_OUT_OF_BAND_MIN:
            spec: dict[str, Any] = {"size": len(data), "writable": False, "stream": True}
            if deferred:
                packer.requests.append(placement.Request(memoryview(data), spec))
                packer.specs.append(spec)
                data = b""
            elif len(packer.fds) < MAX_FDS:
                fd = segment_with(memoryview(data))
                packer.owned.append(fd)
                spec.update(fd=len(packer.fds), offset=0)
                packer.fds.append(fd)
                packer.specs.append(spec)
                data = b""
    except BaseException:
        close_fds(packer.owned)
        raise
    return Packed(data, packer.specs, packer.fds, packer.owned, packer.requests, packer.fd_index)


def segment_with(raw: memoryview) -> int:
    """A new segment holding a copy of ``raw`` (its descriptor, for the caller to close)."""
    view = raw.cast("B") if raw.ndim != 1 or raw.format != "B" else raw
    fd = segments.new_segment(view.nbytes)
    try:
        segments.write(fd, view, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pickle_loads(data: Any, buffers: list[memoryview]) -> Any:
    return pickle.loads(data, buffers=buffers)


def loads(data: Any, fds: list[int], specs: list[dict[str, Any]], *, private: bool = False,
          load: Callable[[Any, list[memoryview]], Any] = _pickle_loads) -> Any:
    """Unpickle, mapping the out-of-band buffers. Closes ``fds`` (the mappings keep the memory and
    hold no descriptor). ``load(stream, buffers)`` unpickles (salvage.py passes its own).

    ``private``: map copy-on-write, so the receiver may change the arrays without touching anyone
    else's (used for results, which belong to the caller alone). Otherwise buffers are mapped
    read-only, except those of shared_array segments, which are shared and writable.
    """
    stream: memoryview | None = None
    try:
        if not specs:
            return load(data, [])
        maps: dict[tuple[int, int], memoryview] = {}
        buffers: list[memoryview] = []
        for spec in specs:
            fd = fds[spec["fd"]]
            offset, size = spec["offset"], spec["size"]
            if spec.get("stream"):  # the pickle stream itself (see STREAM_OUT_OF_BAND_MIN)
                stream = segments.map_fd(fd, os.fstat(fd).st_size, segments.READ)[offset : offset + size]
                continue
            access = segments.COPY if private else (segments.WRITE if spec["writable"] else segments.READ)
            key = (spec["fd"], access)
            if key not in maps:
                keep = spec.get("keep") and not private
                maps[key] = _kept_map(fd, access) if keep else segments.map_fd(fd, os.fstat(fd).st_size, access)
            buffers.append(maps[key][offset : offset + size])
        return load(data if stream is None else stream, buffers)
    finally:
        if stream is not None:
            try:
                stream.release()  # unpickling copied out what it keeps: the mapping goes with this view
            except BufferError:  # something still reads it: the mapping goes when that does
                pass
        close_fds(fds)


_kept: dict[tuple[int, int, int], memoryview] = {}  # (device, inode, access) -> mapping, oldest first
_KEPT_MAPS = 8


def _kept_map(fd: int, access: int) -> memoryview:
    """The mapping of a long-lived segment (a shared_array, a shared value), made once per process:
    mapping it afresh for every chunk would fault every page in again each time."""
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino, access)
    view = _kept.pop(key, None)
    if view is None or view.nbytes != info.st_size:
        view = segments.map_fd(fd, info.st_size, access)
    _kept[key] = view
    while len(_kept) > _KEPT_MAPS:
        _kept.pop(next(iter(_kept)))
    return view
