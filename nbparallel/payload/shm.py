"""Large buffers out of band, in shared memory: numpy arrays and the objects built on them.

Pickle protocol 5 hands us each large contiguous buffer (a numpy array's data, a pandas column)
through ``buffer_callback``. Instead of copying it into the pickle stream and through the sockets,
we put it in an anonymous shared-memory file (Linux ``memfd_create``) and pass the file descriptor
with the frame (SCM_RIGHTS). The receiver maps it: the array it unpickles *is* that memory, and the
mapping keeps no descriptor (segments.py), so kept results cost no open files.

In the kernel a buffer is placed when its frame is sent (``Packed.place``, by the runner): once per
buffer, in a segment reused from a pool where it can be (placement.py). Workers put their results
in fresh segments of their own.

``shared_array`` allocates an array in a segment to begin with, and ``share`` places a value there
once. Such an array, and every view of it (contiguous or strided, any size, empty ones too),
travels as a reference to the segment: workers get a view of the same memory, writable for a
``shared_array``, so what they write is seen by everyone. Read-only (``share``, or an array marked
read-only), a write raises instead of going to a private copy.

No segment has a name, so nothing can be left in /dev/shm: a segment lives exactly as long as some
process holds its descriptor or a mapping of it, and the sidecar (which holds the descriptors
between the kernel and the workers, never mapping them) closes its copies when the job ends.
Where ``memfd_create`` does not exist (macOS) everything travels in band.
"""

from __future__ import annotations

import bisect
import io
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import placement, segments
from .segments import SharedMemoryLimit
from ..wire.frames import MAX_FDS, close_fds

__all__ = ["Packed", "SharedMemoryLimit", "Shared", "dumps", "loads", "share", "shared_array", "segment_with"]

OUT_OF_BAND_MIN = 1 << 20  # smaller buffers are cheaper inline than as a segment of their own
# A pickle stream this large (big bytes or strings, many small objects) goes into a segment of its
# own too: the sidecar then holds a descriptor, never the megabytes, and stays small.
STREAM_OUT_OF_BAND_MIN = 4 << 20
AVAILABLE = hasattr(os, "memfd_create")


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


# Segments made by shared_array and share, by the address range of our mapping of them.
class _Registered:
    __slots__ = ("fd", "start", "end", "writable", "view")

    def __init__(self, fd: int, start: int, view: memoryview, writable: bool) -> None:
        self.fd, self.start, self.end, self.view, self.writable = fd, start, start + view.nbytes, view, writable


_registered: dict[int, _Registered] = {}
_starts: list[int] = []  # sorted keys of _registered
_registered_lock = threading.Lock()


def _register(fd: int, view: memoryview, *, writable: bool) -> int:
    start = segments.address(view)
    assert start is not None
    with _registered_lock:
        _registered[start] = _Registered(fd, start, view, writable)
        bisect.insort(_starts, start)
    return start


def _forget(start: int) -> None:
    with _registered_lock:
        entry = _registered.pop(start, None)
        if entry is not None:
            del _starts[bisect.bisect_left(_starts, start)]
    if entry is not None:
        close_fds([entry.fd])


def _segment_at(start: int, end: int) -> _Registered | None:
    """The registered segment holding bytes ``start..end`` (``start == end``: an empty array there)."""
    with _registered_lock:
        at = bisect.bisect_right(_starts, start) - 1
        if at < 0:
            return None
        found = _registered[_starts[at]]
    return found if end <= found.end else None


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
        self.known: dict[int, tuple[_Registered, int, bool]] = {}  # id(PickleBuffer) -> where it lies
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
        if _registered:
            start = segments.address(raw)
            found = None if start is None else _segment_at(start, start + raw.nbytes)
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

    def reference(self, segment: _Registered, offset: int, size: int, writable: bool) -> None:
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
        start, end = placement.extent(array)
        segment = _segment_at(start, end)
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
        elif _registered and packer.ndarray is not None:
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
    fd = segments.new_segment(max(size, 1), "shared-array")
    try:
        view = segments.map_fd(fd, max(size, 1), segments.WRITE)
    except BaseException:
        os.close(fd)
        raise
    array = numpy.frombuffer(view, dtype=dtype, count=count).reshape(shape)
    start = _register(fd, view, writable=True)
    # When the array and its views are gone, forget the segment and close our descriptor.
    weakref.finalize(array.base if array.base is not None else array, _forget, start)
    return array


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
        fd = segments.new_segment(max(at, 1), "shared")
        try:
            view = segments.map_fd(fd, max(at, 1), segments.WRITE)
        except BaseException:
            os.close(fd)
            raise
        view[: len(stream)] = stream
        for (offset, size), raw in zip(layout, raws):
            view[offset : offset + size] = raw
        self._start = _register(fd, view, writable=False)
        self._view = view
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
