"""The journal of a durable sweep: an SQLite file that outlives the kernel.

One file per sweep (``runs/sweep.db``), in WAL mode with ``synchronous=NORMAL``: a committed
transaction survives the death of the process that wrote it (SIGKILL included), and the file stays
consistent whatever moment that happens at; only an OS crash or a power cut can take back the latest
commits. A writer thread commits at most ``COMMIT_INTERVAL`` apart, so a killed kernel loses at
most about the last second of results, and the caller's thread only pickles.

Beside it, nothing but what SQLite keeps (``-wal``, ``-shm``) and, when needed:

- ``sweep.db-blobs/``: large buffers (numpy arrays and the like, ``OUT_OF_BAND`` bytes or more), one
  file each, so a big value is written once and is not a giant row. A file is written before the
  row that names it is committed, and checked by size when read: one lost in an OS crash makes its
  items run again, never wrong values. Files no row names (a write cut short) are removed on open.
- ``sweep.db-lock``: an ``flock`` held while a sweep writes; a second writer, in this process or
  another, is refused (``CheckpointBusy``). The lock goes with the process that held it.

Tables: ``calls`` (one per function that wrote results: its digest, name and source), ``outcomes``
(a batch of values for some indices, or one failure), ``meta`` (the format). Items are known by their
position and their value: a batch keeps its items pickled as one list (compared as bytes on resume;
cheap), or for big items a digest of each (identity.py). The newest outcome of an index wins.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

import cloudpickle

from ..errors import NbParallelError
from . import journalfiles as files
from .identity import FunctionId
from .journalrows import Row, identify, pack_indices

FORMAT = "1"
COMMIT_INTERVAL = 1.0  # seconds between commits at most: what a killed kernel can lose
OUT_OF_BAND = 256 * 2**10  # bytes: a value's buffer this big goes to a file of its own
ON_CHANGE = ("error", "restart", "keep")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY, digest TEXT NOT NULL, name TEXT NOT NULL, source TEXT, exact INTEGER NOT NULL,
    started REAL NOT NULL, pid INTEGER, host TEXT, python TEXT);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY, call INTEGER NOT NULL, failed INTEGER NOT NULL,
    first INTEGER NOT NULL, count INTEGER NOT NULL, indices BLOB,
    items BLOB, digests BLOB, value BLOB, buffers TEXT, message TEXT, finished REAL NOT NULL);
"""
_INSERT = ("INSERT INTO outcomes (call, failed, first, count, indices, items, digests, value, buffers, message, "
           "finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


class CheckpointError(NbParallelError):
    """The journal of a checkpointed call cannot be used as asked."""


class CheckpointBusy(CheckpointError):
    """Another sweep is writing this journal now (in this process or another)."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The journal holds results of a different function; ``on_change=`` says what to do."""

    def __init__(self, message: str, *, stored: str, current: str) -> None:
        super().__init__(message)
        self.stored = stored
        self.current = current


@dataclass(frozen=True)
class Checkpoint:
    """Where a sweep keeps its journal, and what to do with what it finds there.

    ``on_change``: when the function differs from the one that wrote the journal, ``"error"``
    (the default) raises ``CheckpointMismatch``; ``"restart"`` deletes the old results and starts
    over; ``"keep"`` keeps them and runs only the missing items with the new function.
    ``rerun_failed``: run the items that failed last time again (the default), or keep their failure.
    """

    path: str | os.PathLike[str]
    on_change: str = "error"
    rerun_failed: bool = True

    def __post_init__(self) -> None:
        if self.on_change not in ON_CHANGE:
            raise ValueError(f'on_change must be "error", "restart" or "keep", got {self.on_change!r}')
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise TypeError(f"a checkpoint is a file path, got {self.path!r}")


def as_checkpoint(value: Any) -> Checkpoint:
    """``checkpoint=`` as given (a path or a Checkpoint) made a Checkpoint."""
    return value if isinstance(value, Checkpoint) else Checkpoint(value)


class Journal:
    """An open journal. ``Journal.open(path)`` takes the writer's lock; ``write=False`` only reads."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock: Any) -> None:
        self.path = path
        self.blobs = path.with_name(path.name + "-blobs")
        self.db = connection
        self.lock = lock
        # Rows, or what makes one (record(now=False)); an Event asks for a commit; None ends it.
        self.queue: SimpleQueue[tuple[Any, ...] | Callable[[], tuple[Any, ...]] | threading.Event | None] = \
            SimpleQueue()
        self.writer: threading.Thread | None = None
        self.failure: BaseException | None = None  # what stopped the writer thread
        self.call = 0
        self.closing = False
        self.warned = False
        self.finishing = threading.Lock()
        self.finished = False
        self.shown = str(path)  # the path as the caller wrote it, for messages

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, write: bool = True) -> Journal:
        where = Path(path).expanduser().absolute()
        if where.is_dir():
            raise CheckpointError(f"the checkpoint {os.fspath(path)!r} is a directory; give a file path such as "
                                  "'runs/sweep.db'")
        if not write and not where.exists():
            raise FileNotFoundError(f"no checkpoint journal at {os.fspath(path)!r}")
        files.wait_pending(where)  # closed a moment ago in this process: its last rows first
        lock = None
        if write:
            where.parent.mkdir(parents=True, exist_ok=True)
            try:
                lock = files.lock(where)
            except files.LockHeld as held:
                raise CheckpointBusy(f"the checkpoint {os.fspath(path)!r} is being written by another sweep "
                                     f"({held.holder}); wait for it to finish (or stop it), or give this call "
                                     "another path") from None
        try:
            db = files.take_idle(where) if write else None
            if db is None:
                db = sqlite3.connect(where, timeout=30, isolation_level=None, check_same_thread=False)
                try:
                    _prepare(db, where, write)
                except BaseException:
                    db.close()
                    raise
        except sqlite3.DatabaseError as exc:
            files.unlock(lock)
            raise CheckpointError(f"{os.fspath(path)!r} is not a usable nbparallel journal: {exc}") from None
        except BaseException:
            files.unlock(lock)
            raise
        journal = cls(where, db, lock)
        journal.shown = os.fspath(path)
        if write:
            journal.remove_orphans()
        return journal

    # -- the call -----------------------------------------------------------------------------

    def begin(self, fid: FunctionId, on_change: str, source: Callable[[], str | None] = lambda: None) -> int:
        """Check ``fid`` against the function that wrote the journal (see ``Checkpoint``); return
        the call's id, under which this run's outcomes are written (``source()``: its text, kept
        for people when the function is new to the journal)."""
        latest = self.db.execute("SELECT id, digest, name FROM calls ORDER BY id DESC LIMIT 1").fetchone()
        if latest is not None and latest[1] != fid.digest:
            count, last = self.db.execute("SELECT SUM(count), MAX(finished) FROM outcomes WHERE failed = 0").fetchone()
            if count and on_change == "error":
                raise _mismatch(self, latest[2], latest[1], fid, count, last)
            if on_change == "restart":
                self.clear()
                latest = None
        if latest is not None and latest[1] == fid.digest:
            self.call = int(latest[0])
        else:
            self.call = int(self.db.execute(
                "INSERT INTO calls (digest, name, source, exact, started, pid, host, python) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (fid.digest, fid.name, fid.source or source(), int(fid.exact), time.time(), os.getpid(), socket.gethostname(),
                 sys.version.split()[0])).lastrowid or 0)
        return self.call

    def clear(self) -> None:
        """Forget every result (``on_change="restart"``)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM outcomes")
        self.db.execute("DELETE FROM calls")
        self.db.execute("COMMIT")
        self.remove_orphans()

    # -- reading ------------------------------------------------------------------------------

    def rows(self, newest_first: bool = True) -> list[Row]:
        order = "DESC" if newest_first else "ASC"
        return [Row(raw, self.read_blob) for raw in self.db.execute(
            "SELECT id, call, failed, first, count, indices, items, digests, value, buffers, message, finished "
            f"FROM outcomes ORDER BY id {order}")]

    def calls(self) -> list[tuple[Any, ...]]:
        return self.db.execute("SELECT id, digest, name, source, exact, started, pid, host, python FROM calls "
                               "ORDER BY id").fetchall()

    def read_blob(self, name: str, size: int) -> bytearray:
        data = bytearray(size)
        with open(self.blobs / name, "rb") as file:
            if file.readinto(data) != size:
                raise CheckpointError(f"the large value {name} beside the journal is cut short")
        return data

    # -- writing (the caller's thread pickles; the writer thread writes) -----------------------

    def record(self, indices: Sequence[int], items: list[Any], values: list[Any], *, now: bool = True) -> None:
        """Queue the values of ``items`` at ``indices`` (a range or ascending list). ``now=False``
        pickles them on the writer thread, while the caller waits for results: only for values
        nobody can change before ``close`` (a ``map``'s, not an ``imap``'s, which the consumer has)."""
        if not indices:
            return
        if not now:
            self.put(functools.partial(self._values_row, indices, items, values, time.time()))
            return
        try:
            row = self._values_row(indices, items, values, time.time())
        except Exception as exc:  # a value plain storage refuses: those items run again next time
            self._skipped(exc)
            return
        self.put(row)

    def _values_row(self, indices: Sequence[int], items: list[Any], values: list[Any], finished: float
                    ) -> tuple[Any, ...]:
        large: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < OUT_OF_BAND:
                return True  # small: inside the row
            large.append(buffer)
            return False

        value = cloudpickle.dumps(values, protocol=5, buffer_callback=out_of_band)
        buffers = json.dumps([self.write_blob(buffer) for buffer in large]) if large else None
        first, count, packed = pack_indices(indices)
        stored, digests = identify(items)
        return (self.call, 0, first, count, packed, stored, digests, value, buffers, None, finished)

    def record_failure(self, index: int, item: Any, error: BaseException) -> None:
        completed = getattr(error, "completed", None)
        try:
            if completed:  # what else had finished belongs to that call, not to this item's failure
                setattr(error, "completed", {})
            value: bytes | None = cloudpickle.dumps(error, protocol=5)
        except Exception:  # an exception that cannot be pickled: its message is kept
            value = None
        finally:
            if completed:
                setattr(error, "completed", completed)
        stored, digests = identify([item])
        self.put((self.call, 1, index, 1, None, stored, digests, value, None, str(error)[:20_000], time.time()))

    def write_blob(self, buffer: pickle.PickleBuffer) -> list[Any]:
        self.blobs.mkdir(exist_ok=True)
        name = f"{uuid.uuid4().hex}.bin"
        with buffer.raw() as raw, open(self.blobs / name, "wb") as file:
            file.write(raw)
            return [name, raw.nbytes]

    def put(self, row: tuple[Any, ...] | Callable[[], tuple[Any, ...]]) -> None:
        if self.failure is not None:
            raise CheckpointError(f"the checkpoint {self.path} could not be written: "
                                  f"{type(self.failure).__name__}: {self.failure}") from self.failure
        if self.writer is None:
            self.writer = threading.Thread(target=self._write, name="nbparallel-journal", daemon=True)
            self.writer.start()
        self.queue.put(row)

    def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        if self.writer is not None and self.writer.is_alive():
            done = threading.Event()
            self.queue.put(done)
            while not done.wait(0.1) and self.writer.is_alive():
                pass

    def _write(self) -> None:
        deadline: float | None = None  # when the open transaction must be committed
        try:
            while True:
                try:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    row = self.queue.get(timeout=wait)
                except Empty:
                    row = threading.Event()  # time to commit
                if callable(row):
                    try:
                        row = row()
                    except Exception as exc:  # a value storage refuses: those items run again next time
                        self._skipped(exc)
                        continue
                if isinstance(row, tuple):
                    if deadline is None:
                        self.db.execute("BEGIN")
                        deadline = time.monotonic() + COMMIT_INTERVAL
                    self.db.execute(_INSERT, row)
                    continue
                if deadline is not None:
                    self.db.execute("COMMIT")
                    deadline = None
                if row is None:
                    return
                row.set()
        except BaseException as exc:  # a full disk, say: the next record() raises it
            self.failure = exc
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            if self.closing:
                self._finish()

    def close(self) -> None:
        """Let go of the journal: the writer thread commits what is queued (a few ms of pickling
        the caller need not wait for), then releases the lock; opening this journal again in this
        process waits for that (journalfiles.py), as does the interpreter's exit."""
        self.closing = True
        writer = self.writer
        if writer is None:
            self._finish()
            return
        files.add_pending(self.path, writer)
        self.queue.put(None)
        if self.failure is not None:  # the writer stopped early, maybe before it saw ``closing``
            writer.join()
            self._finish()

    def _skipped(self, exc: Exception) -> None:
        if not self.warned:
            self.warned = True
            print(f"nbparallel: some results could not be written to the checkpoint {self.shown} "
                  f"({type(exc).__name__}: {exc}); those items will run again next time", file=sys.stderr)

    def _finish(self) -> None:
        """Keep a writer's connection idle for the next call (journalfiles.py), and release the lock."""
        with self.finishing:
            if self.finished:
                return
            self.finished = True
        if self.lock is not None and self.failure is None:
            files.keep_idle(self.path, self.db)
        else:
            self.db.close()
        files.unlock(self.lock)
        self.lock = None
        if self.failure is not None:
            print(f"nbparallel: the checkpoint {self.shown} could not be written: {type(self.failure).__name__}: "
                  f"{self.failure}", file=sys.stderr)

    def remove_orphans(self) -> None:
        if not self.blobs.is_dir():
            return
        named = {name for (text,) in self.db.execute("SELECT buffers FROM outcomes WHERE buffers IS NOT NULL")
                 for name, _ in json.loads(text)}
        for entry in self.blobs.iterdir():
            if entry.name not in named:
                entry.unlink(missing_ok=True)


def _prepare(db: sqlite3.Connection, where: Path, write: bool) -> None:
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "outcomes" not in tables:
        raise CheckpointError(f"{where} is an SQLite database but not an nbparallel journal; give another path")
    if not write:
        return
    # Setting up syncs nothing: a journal whose creation an OS crash undoes is simply made again.
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA journal_mode = WAL")
    if not tables:
        db.executescript(f"BEGIN; {_SCHEMA} INSERT INTO meta (key, value) VALUES ('format', '{FORMAT}'); COMMIT;")
    db.execute("PRAGMA synchronous = NORMAL")  # with WAL: a process crash loses nothing committed
    found = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if found is None or found[0] != FORMAT:
        raise CheckpointError(f"{where} was written by another version of nbparallel (journal format "
                              f"{found[0] if found else '?'}, this one reads {FORMAT})")


def _mismatch(journal: Journal, name: str, stored: str, fid: FunctionId, count: int, last: float | None) -> CheckpointMismatch:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last)) if last else "?"
    shown = journal.shown
    return CheckpointMismatch(
        f"the checkpoint {shown!r} holds {count:,} results of a different function: {name} (digest {stored[:8]}, "
        f"last result {when}); this call's {fid.name} is not the same (digest {fid.digest[:8]}): its code, a "
        "default, its closure or a global it reads changed. Choose one: pass "
        f"checkpoint=nbparallel.checkpoint.Checkpoint({shown!r}, on_change=\"restart\") to start over (the old "
        "results are deleted), on_change=\"keep\" to keep the old results and run only the missing items with this "
        "function, or give a new path (in %%parallel: --on-change restart|keep, or another --checkpoint).",
        stored=stored, current=fid.digest)
