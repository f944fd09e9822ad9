"""Shared-memory segments at the system level: anonymous memfd files, mappings that keep no file
descriptor, copies and comparisons at memory speed, and which of our processes still use a segment.

A mapping made here holds no descriptor: Python 3.13's ``mmap(..., trackfd=False)``, and on older
Pythons a libc ``mmap`` through ctypes whose buffer object unmaps when its last view is gone. So a
caller can keep any number of result arrays without using up its descriptors; what bounds them is
the number of mappings a process may have (``vm.max_map_count``, 65,530 by default).

When a system limit stops us, the error (``SharedMemoryLimit``) says which limit it was.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import sys
import time
from typing import Any

#: Segments are named so /proc shows them as ``/memfd:nbparallel-...``; the prefix finds them there.
NAME_PREFIX = "nbparallel"
PAGE = mmap.PAGESIZE
#: Anonymous shared-memory files exist here (Linux); elsewhere everything travels in band.
AVAILABLE = hasattr(os, "memfd_create")

_libc: Any = None


def libc() -> Any:
    """libc's mmap, munmap and memcmp, typed once (ctypes releases the GIL during each call)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.memcmp.restype = ctypes.c_int
        lib.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


class SharedMemoryLimit(OSError):
    """A system limit stopped nbparallel from making or mapping a shared-memory segment; the message
    names the limit (open files, memory mappings, memory) and what it was at."""


def limit_error(exc: OSError, doing: str) -> OSError:
    """``exc`` as a ``SharedMemoryLimit`` naming the limit it hit, or ``exc`` itself if it is not a limit."""
    code = exc.errno
    if code in (errno.EMFILE, errno.ENFILE):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        which = ("the system-wide limit on open files (fs.file-max)" if code == errno.ENFILE else
                 f"this process's limit on open files (RLIMIT_NOFILE, `ulimit -n`: {soft}, at most {hard})")
        message = (f"{doing}: {which} is reached ({_count('/proc/self/fd')} open here). Keep fewer "
                   "objects that hold files open, or raise the limit (resource.setrlimit).")
    elif code == errno.ENOMEM and _mappings() >= _max_map_count() - 16:
        message = (f"{doing}: this process has {_mappings():,} memory mappings, the most vm.max_map_count "
                   f"({_max_map_count():,}) allows; every kept result array of 1 MiB or more is one. Keep "
                   "fewer, or raise vm.max_map_count (sysctl).")
    elif code in (errno.ENOMEM, errno.ENOSPC):
        available = mem_available()
        shown = f"{available / 2**30:.1f} GiB" if available is not None else "unknown"
        message = f"{doing}: out of memory for shared memory (MemAvailable {shown})."
    else:
        return exc
    error = SharedMemoryLimit(code, message)
    error.__cause__ = exc
    return error


def _count(folder: str) -> int:
    try:
        return len(os.listdir(folder))
    except OSError:
        return -1


def _mappings() -> int:
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as value:
            return int(value.read())
    except (OSError, ValueError):
        return 65530


_available: tuple[float, int | None] = (-1.0, None)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none); read at most every 0.2 s."""
    global _available
    now = time.monotonic()
    if now - _available[0] < 0.2:
        return _available[1]
    _available = (now, _read_mem_available())
    return _available[1]


def _read_mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def new_segment(size: int, name: str = "buffer") -> int:
    """A fresh anonymous segment of ``size`` bytes (its pages allocated as they are written)."""
    try:
        fd = os.memfd_create(f"{NAME_PREFIX}-{name}", os.MFD_CLOEXEC)
    except OSError as exc:
        raise limit_error(exc, "could not make a shared-memory segment") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise limit_error(exc, "could not size a shared-memory segment") from None
    return fd


def new_mapped(size: int, name: str) -> tuple[int, memoryview]:
    """A new segment of ``size`` bytes (at least 1) and a writable mapping of it; the descriptor is
    closed again if the mapping fails (a limit on mappings or memory)."""
    fd = new_segment(max(size, 1), name)
    try:
        return fd, map_fd(fd, max(size, 1), WRITE)
    except BaseException:
        os.close(fd)
        raise


def write(fd: int, raw: memoryview, at: int) -> None:
    """Write ``raw`` into the segment at offset ``at``. pwrite fills fresh pages faster than page
    faults through a mapping would: this is the floor for a first placement."""
    view, done = raw.cast("B") if raw.format != "B" or raw.ndim != 1 else raw, 0
    try:
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], at + done)
    except OSError as exc:
        raise limit_error(exc, "could not write into a shared-memory segment") from None


# -- mappings that hold no descriptor -----------------------------------------------------------

READ, WRITE, COPY = mmap.ACCESS_READ, mmap.ACCESS_WRITE, mmap.ACCESS_COPY
_PROT = {READ: mmap.PROT_READ, WRITE: mmap.PROT_READ | mmap.PROT_WRITE, COPY: mmap.PROT_READ | mmap.PROT_WRITE}
_FLAGS = {READ: mmap.MAP_SHARED, WRITE: mmap.MAP_SHARED, COPY: mmap.MAP_PRIVATE}
_TRACKFD = sys.version_info >= (3, 13)


def map_fd(fd: int, size: int, access: int, *, populate: bool = False) -> memoryview:
    """Map ``size`` bytes of segment ``fd``; the mapping keeps no descriptor, so ``fd`` may be closed
    at once. A flat byte view comes back (read-only for READ); the memory is unmapped when the last
    view of it, or of anything made from it (arrays), is gone. ``populate``: fault every page in
    now (cheaper than one fault per page later, for memory about to be read or written whole)."""
    if size == 0:
        return memoryview(b"") if access == READ else memoryview(bytearray())
    try:
        if _TRACKFD and not populate:
            mapping: Any = mmap.mmap(fd, size, access=access, trackfd=False)  # type: ignore[call-arg,unused-ignore]
        else:
            mapping = _ctypes_map(fd, size, access, populate)
    except OSError as exc:
        raise limit_error(exc, "could not map a shared-memory segment") from None
    view = memoryview(mapping).cast("B")
    return view.toreadonly() if access == READ else view


def _ctypes_map(fd: int, size: int, access: int, populate: bool) -> Any:
    lib = libc()
    flags = _FLAGS[access] | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    address = lib.mmap(None, size, _PROT[access], flags, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    # The ctypes array is the buffer's owner: memoryviews and numpy arrays made from it keep it
    # alive, and when it goes, so does the mapping.
    owner = (ctypes.c_ubyte * size).from_address(address)
    _finalize(owner, lib.munmap, address, size)
    return owner


def _finalize(owner: Any, unmap: Any, address: int, size: int) -> None:
    import weakref  # only where mappings are made through ctypes (before Python 3.13)

    weakref.finalize(owner, unmap, address, size)


def address(view: memoryview) -> int | None:
    """The address of a buffer's first byte, where it can be found (None: read-only and not numpy)."""
    if view.nbytes == 0:
        return None
    if not view.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    numpy = sys.modules.get("numpy")  # a read-only buffer we see is numpy's, or nothing we can place
    if numpy is None:
        return None
    return int(numpy.frombuffer(view, dtype=numpy.uint8).__array_interface__["data"][0])


def view_at(start: int, size: int) -> memoryview:
    """A read-only view of ``size`` bytes of this process's memory at ``start`` (the caller keeps
    whatever owns that memory alive while the view is used)."""
    return memoryview((ctypes.c_ubyte * size).from_address(start)).cast("B").toreadonly()


def copy(destination: int, source: int, size: int) -> None:
    """memmove between two addresses, without the GIL."""
    ctypes.memmove(destination, source, size)


def same(first: int, second: int, size: int) -> bool:
    """Whether ``size`` bytes at two addresses are equal (memcmp, without the GIL)."""
    return bool(libc().memcmp(first, second, size) == 0)


# -- who else uses a segment ---------------------------------------------------------------------


def descendants() -> list[int]:
    """This process's children, their children, and so on (the sidecar, its workers, what they
    started). Raises OSError when /proc cannot be read (a process that just exited is skipped)."""
    found: list[int] = []
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as children:
                    kids = [int(k) for k in children.read().split()]
            except FileNotFoundError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def held_by_descendants() -> set[int] | None:
    """Inodes of our segments that a descendant maps or holds open; None if that cannot be known
    (then treat every segment as held). Descriptors in flight in a socket are not seen: the caller
    knows those by the jobs that were sent them."""
    marker = f"/memfd:{NAME_PREFIX}"
    held: set[int] = set()
    try:
        for pid in descendants():
            try:
                with open(f"/proc/{pid}/maps") as maps:
                    for line in maps:
                        if marker in line:
                            held.add(int(line.split()[4]))
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:  # it has just exited: it holds nothing any more
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(marker):
                        held.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
                except FileNotFoundError:  # closed meanwhile
                    continue
    except (OSError, ValueError, IndexError):  # no /proc, no permission, no descriptor left to read it
        return None
    return held
