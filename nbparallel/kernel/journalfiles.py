"""A journal's files as this process holds them: the writer's lock, connections kept open between
calls, and writers still committing a closed journal's last rows (journal.py uses these).

- The lock is an ``flock`` on ``<journal>-lock``, which records who holds it (pid and host, for the
  message a second writer gets); it goes with the process that held it, whatever kills it.
- Closing SQLite's last connection checkpoints the WAL into the file with an fsync: tens of
  milliseconds that a sweep run again should not pay. So a writer's connection is kept, with the
  file's identity (a deleted or replaced journal is not written through a stale one), and closed at
  the interpreter's exit, after the writers still committing have finished.
"""

from __future__ import annotations

import atexit
import os
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no flock; two writers are then the user's to avoid
    fcntl = None  # type: ignore[assignment]

_lock = threading.Lock()
_idle: dict[Path, tuple[sqlite3.Connection, tuple[int, int]]] = {}
_pending: dict[Path, threading.Thread] = {}


class LockHeld(Exception):
    """Another writer holds the journal; ``holder`` says who ("process 12 on host", "this process")."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock(where: Path) -> Any:
    """Take the writer's lock of the journal at ``where`` (an open file; None where flock is missing)."""
    if fcntl is None:
        return None
    file = open(where.with_name(where.name + "-lock"), "a+b")
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.seek(0)
        holder = file.read().decode(errors="replace").split()
        file.close()
        raise LockHeld("this process" if holder and holder[0] == str(os.getpid()) else (
            f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process")) from None
    # Who holds it, for the message above; written in place (a truncate costs milliseconds here).
    os.pwrite(file.fileno(), f"{os.getpid()} {socket.gethostname()}".ljust(80).encode()[:80] + b"\n", 0)
    return file


def unlock(held: Any) -> None:
    if held is not None:
        held.close()  # closing the descriptor releases the flock


def _file_id(where: Path) -> tuple[int, int]:
    found = os.stat(where)
    return found.st_dev, found.st_ino


def take_idle(where: Path) -> sqlite3.Connection | None:
    """The connection this process left open on the journal, if the file is still the same one."""
    with _lock:
        idle = _idle.pop(where, None)
    if idle is None:
        return None
    try:
        if _file_id(where) == idle[1]:
            return idle[0]
    except OSError:  # the journal was deleted (or moved) since: start a new one
        pass
    idle[0].close()
    return None


def keep_idle(where: Path, db: sqlite3.Connection) -> None:
    """Keep ``db`` open for the next call on this journal (closed at exit)."""
    try:
        identity = _file_id(where)
    except OSError:
        db.close()
        return
    with _lock:
        previous = _idle.pop(where, None)
        _idle[where] = (db, identity)
    if previous is not None:
        previous[0].close()


def add_pending(where: Path, writer: threading.Thread) -> None:
    """``writer`` commits the last rows of the journal at ``where``, which was just closed."""
    with _lock:
        _pending[where] = writer


def wait_pending(where: Path) -> None:
    """Wait for the writer still committing the journal at ``where``, if any."""
    with _lock:
        writer = _pending.pop(where, None)
    if writer is not None:
        writer.join()


@atexit.register
def _at_exit() -> None:
    """Let the journals closed last commit their rows, then close every connection."""
    with _lock:
        pending = list(_pending.values())
        _pending.clear()
    for writer in pending:
        writer.join(timeout=10)
    with _lock:
        idle = list(_idle.values())
        _idle.clear()
    for db, _ in idle:
        try:
            db.close()
        except sqlite3.Error:
            pass
