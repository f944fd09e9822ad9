"""Which /dev/shm entries this test session made: the rule behind the session's leftover check.

/dev/shm is shared by every program on the machine, and a file there does not say who made it. So
from the session's start a watcher notes each new entry the moment it appears (inotify; polling where
that is missing) and looks at once for the processes holding it: those that map it (a named
semaphore, a SharedMemory) or have it open (/proc/PID/maps and /proc/PID/fd). A holder is *ours* when
it is this process, descends from it, or carries this session's tag in its environment (children
inherit it, and keep it when their parent dies and they are re-parented). An entry is ours when a
holder of ours was seen, or when its name carries the pid of a process of ours (joblib's
``loky-PID-...``). Held only by other processes: someone else's. Nobody seen holding it (made and let
go between two looks, or a plain file): unknown.

The end-of-session check fails on leftovers that are ours, and only warns about unknown ones: a
failure always names an entry that a process of this session held, so another program on the
machine can never fail the suite, and a leak of ours (a Dask or joblib semaphore whose process was
killed) cannot hide, because such a process holds its semaphores for as long as it uses them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SHM = Path("/dev/shm")
TAG_VARIABLE = "NBPARALLEL_TEST_SESSION"
OURS, FOREIGN, UNKNOWN = "ours", "foreign", "unknown"
_PID_IN_NAME = re.compile(r"^(?:sem\.)?loky-(\d+)-")
# glibc's sem_open makes a semaphore as a temporary "sem.XXXXXX", then links it to its name and
# unlinks the temporary: a process killed between the two leaves the temporary behind.
_SEM_OPEN_TEMPORARY = re.compile(r"^sem\.[A-Za-z0-9]{6}$")


def is_sem_open_temporary(name: str) -> bool:
    """Whether ``name`` is the temporary file of a sem_open that never finished (see above)."""
    return bool(_SEM_OPEN_TEMPORARY.match(name))


def listing(folder: Path = SHM) -> set[str]:
    """The names in /dev/shm now (empty where there is no /dev/shm, e.g. macOS)."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def pid_in_name(name: str) -> int | None:
    """The creator's pid where the name carries one (joblib/loky semaphores: ``sem.loky-PID-…``)."""
    found = _PID_IN_NAME.match(name)
    return int(found.group(1)) if found else None


def verdict(holders_ours: Iterable[bool], name_pid_ours: bool | None) -> str:
    """The rule: OURS if any holder seen was ours or the name carries a pid of ours; FOREIGN if it was
    seen held only by others (or names another's pid); UNKNOWN if nobody was ever seen holding it."""
    seen = list(holders_ours)
    if any(seen) or name_pid_ours:
        return OURS
    if seen or name_pid_ours is False:
        return FOREIGN
    return UNKNOWN


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may contain spaces and parentheses, so split after the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _mapped_path(line: bytes) -> str:
    """The file of one /proc/PID/maps line ("... inode   /dev/shm/sem.mp-x [(deleted)]")."""
    path = line[line.index(b"/dev/shm/"):].rstrip(b"\n").decode(errors="replace")
    return path.removesuffix(" (deleted)")


def holders(name: str, proc: Path = Path("/proc")) -> set[int]:
    """Pids of the processes that map /dev/shm/NAME or have it open, now."""
    target = str(SHM / name)
    found: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(entry / "maps", "rb") as maps:
                if any(_mapped_path(line) == target for line in maps if b"/dev/shm/" in line):
                    found.add(pid)
                    continue
            for fd in os.listdir(entry / "fd"):
                if os.readlink(entry / "fd" / fd) == target:
                    found.add(pid)
                    break
        except OSError:  # gone, or not ours to read
            continue
    return found


@dataclass
class Attribution:
    """What was seen of one entry: for each holder, whether it was ours."""

    holders: dict[int, bool] = field(default_factory=dict)
    name_pid_ours: bool | None = None
    looks: int = 0

    @property
    def verdict(self) -> str:
        return verdict(self.holders.values(), self.name_pid_ours)


class ShmWatcher:
    """Watches /dev/shm for the session and attributes each new entry (see the module's docstring)."""

    MAX_LOOKS = 20  # an entry nobody holds is looked at this many times (once per event or tick), then left

    def __init__(self, root_pid: int | None = None, tag: str | None = None, folder: Path = SHM,
                 poll: float = 0.2) -> None:
        self.root_pid = os.getpid() if root_pid is None else root_pid
        self.tag = f"{TAG_VARIABLE}={tag}".encode() if tag else None
        self.folder = folder
        self.poll = poll
        self.before = listing(folder)
        self.seen: dict[str, Attribution] = {}
        self._lock = threading.Lock()  # the watcher's thread and the final check both look
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- who is ours ---------------------------------------------------------------------------

    def is_ours(self, pid: int) -> bool:
        """This process, one of its descendants, or a process carrying the session's tag."""
        if self.tag is not None and _environ_has(pid, self.tag):
            return True
        hops = 0
        while pid > 1 and hops < 1000:
            if pid == self.root_pid:
                return True
            parent = _ppid(pid)
            if parent is None:
                return False
            pid, hops = parent, hops + 1
        return False

    # -- looking ---------------------------------------------------------------------------------

    def look(self, names: Iterable[str] | None = None) -> None:
        """Attribute the new entries that are not settled yet (all new entries when ``names`` is None)."""
        with self._lock:
            self._look(names)

    def _look(self, names: Iterable[str] | None) -> None:
        current = listing(self.folder)
        wanted = current - self.before if names is None else set(names) & current
        for name in sorted(wanted):
            record = self.seen.setdefault(name, Attribution())
            if record.verdict != UNKNOWN or record.looks >= self.MAX_LOOKS:
                continue  # settled: once a holder is seen, what it was does not change
            record.looks += 1
            for pid in holders(name):
                record.holders.setdefault(pid, self.is_ours(pid))
            named = pid_in_name(name)
            if named is not None and record.name_pid_ours is None and Path(f"/proc/{named}").exists():
                record.name_pid_ours = self.is_ours(named)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shm-leftover-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        events = _Inotify.open(self.folder)
        try:
            while not self._stop.is_set():
                if events is not None:
                    created = events.wait(self.poll)
                    self.look(created if created else None)
                else:
                    self._stop.wait(self.poll)
                    self.look()
        except Exception:  # a watcher must never take the session down; the final look still runs
            pass
        finally:
            if events is not None:
                events.close()

    # -- the end ---------------------------------------------------------------------------------

    def leftovers(self) -> dict[str, list[str]]:
        """The entries that appeared since the start and are still there, by verdict."""
        self.look()  # entries that appeared after the last event, and a last look at unsettled ones
        found: dict[str, list[str]] = {OURS: [], FOREIGN: [], UNKNOWN: []}
        for name in sorted(listing(self.folder) - self.before):
            record = self.seen.get(name, Attribution())
            found[record.verdict].append(name)
        return found


class _Inotify:
    """IN_CREATE and IN_MOVED_TO events of one folder, through libc (Linux only)."""

    IN_CREATE, IN_MOVED_TO, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0x80, 0o4000, 0o2000000

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, folder: Path) -> _Inotify | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(cls.IN_NONBLOCK | cls.IN_CLOEXEC)
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, str(folder).encode(), cls.IN_CREATE | cls.IN_MOVED_TO) < 0:
                os.close(fd)
                return None
            return cls(fd)
        except (OSError, AttributeError):  # no libc with inotify (not Linux)
            return None

    def wait(self, timeout: float) -> list[str]:
        """Names created within ``timeout`` seconds (empty: nothing happened)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        names, offset = [], 0
        while offset + 16 <= len(data):  # struct inotify_event: int wd; u32 mask, cookie, len; char name[]
            length = int.from_bytes(data[offset + 12:offset + 16], "little")
            raw = data[offset + 16:offset + 16 + length]
            names.append(raw.split(b"\0", 1)[0].decode(errors="replace"))
            offset += 16 + length
        return [name for name in names if name]

    def close(self) -> None:
        os.close(self.fd)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
