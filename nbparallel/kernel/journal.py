"""The journal of a durable sweep: an SQLite file that outlives the kernel.

One file per sweep (``runs/sweep.db``), in WAL mode with ``synchronous=NORMAL``: a committed
transaction survives the death of the process that wrote it (SIGKILL included), and the file stays
consistent whatever moment that happens at; only an OS crash or a power cut can take back the latest
commits. A writer thread commits at most ``COMMIT_INTERVAL`` apart, so a killed kernel loses at
most about the last second of results. The caller's thread only queues each batch (with the bytes a
worker sent its values in, when small: stored as they are, not pickled again); the writer thread
takes what was queued every ``PICKUP_INTERVAL``, makes a new journal's tables, pickles the items and
writes the rows, so that a call whose results pour in is not slowed by it.

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
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cloudpickle

from ..wire.frames import Buffer
from . import journalfiles as files
from .identity import FunctionId
from .journalrows import Row, identify, pack_indices, pickle_failure
from .journalspec import (Checkpoint as Checkpoint, CheckpointBusy as CheckpointBusy,  # imported from here too
                          CheckpointError as CheckpointError, CheckpointMismatch as CheckpointMismatch,
                          as_checkpoint as as_checkpoint, mismatch)

FORMAT = "2"  # 2: a row's values may be a worker's (offsets, values, problems) tuple; format 1 is read too
COMMIT_INTERVAL = 1.0  # seconds between commits at most: what a killed kernel can lose
PICKUP_INTERVAL = 0.25  # seconds: how often the writer thread takes the rows queued meanwhile
OUT_OF_BAND = 256 * 2**10  # bytes: a value's buffer this big goes to a file of its own

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


class Journal:
    """An open journal. ``Journal.open(path)`` takes the writer's lock; ``write=False`` only reads."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock: Any) -> None:
        self.path = path
        self.blobs = path.with_name(path.name + "-blobs")
        self.db = connection
        self.lock = lock
        # Rows, or what makes one (record(now=False)); an Event asks for a commit; None ends it. The
        # writer picks them up every PICKUP_INTERVAL; ``wake`` brings it at once (values to pickle,
        # an Event, the end): waking it for each batch would contend with the caller's thread.
        self.pending: deque[tuple[Any, ...] | Callable[[], tuple[Any, ...]] | threading.Event | None] = deque()
        self.wake = threading.Event()
        self.writer: threading.Thread | None = None
        self.failure: BaseException | None = None  # what stopped the writer thread
        self.call = 0
        # A journal made by this open is set up, and a call new to it written, by the writer thread
        # before its first row; the caller's thread reads the journal only before it queues one.
        self.fresh = False  # the file is made by this open (or, read only: holds no table yet)
        self.ready = True  # set up (tables made): its connection can serve the next call
        self.new_call: tuple[Any, ...] | None = None  # the calls row to write, its source a callable
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
        fresh = write and not where.exists()  # (after the lock: no other writer can make it meanwhile)
        try:
            db = files.take_idle(where) if write else None
            if db is None:
                db = sqlite3.connect(where, timeout=30, isolation_level=None, check_same_thread=False)
                try:
                    if not fresh and not _prepare(db, where, write):
                        fresh = True  # read only, and no table yet: nothing in it
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
        journal.fresh = fresh
        journal.ready = not (fresh and write)
        if write and not fresh:
            journal.remove_orphans()
        if write:  # now, while the CPUs are free: a thread started mid-call can wait a while for one
            journal._start()
        return journal

    # -- the call -----------------------------------------------------------------------------

    def begin(self, fid: FunctionId, on_change: str, source: Callable[[], str | None] = lambda: None) -> int:
        """Check ``fid`` against the function that wrote the journal (see ``Checkpoint``); return
        the call's id, under which this run's outcomes are written (``source()``: its text, kept
        for people when the function is new to the journal)."""
        latest = None if self.fresh else self.db.execute(
            "SELECT id, digest, name FROM calls ORDER BY id DESC LIMIT 1").fetchone()
        if latest is not None and latest[1] != fid.digest:
            count, last = self.db.execute("SELECT SUM(count), MAX(finished) FROM outcomes WHERE failed = 0").fetchone()
            if count and on_change == "error":
                raise mismatch(self.shown, latest[2], latest[1], fid, count, last)
            if on_change == "restart":
                self.clear()
                latest = None
        if latest is not None and latest[1] == fid.digest:
            self.call = int(latest[0])
            return self.call
        # The writer thread writes it (the lock is ours: nobody else can take this id meanwhile).
        self.call = int(latest[0]) + 1 if latest is not None else 1  # (latest: the highest id)
        self.new_call = (self.call, fid.digest, fid.name, (lambda: fid.source) if fid.source else source,
                         int(fid.exact), time.time(), os.getpid())
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
        if self.fresh:
            return []
        order = "DESC" if newest_first else "ASC"
        return [Row(raw, self.read_blob) for raw in self.db.execute(
            "SELECT id, call, failed, first, count, indices, items, digests, value, buffers, message, finished "
            f"FROM outcomes ORDER BY id {order}")]

    def calls(self) -> list[tuple[Any, ...]]:
        if self.fresh:
            return []
        return self.db.execute("SELECT id, digest, name, source, exact, started, pid, host, python FROM calls "
                               "ORDER BY id").fetchall()

    def read_blob(self, name: str, size: int) -> bytearray:
        data = bytearray(size)
        with open(self.blobs / name, "rb") as file:
            if file.readinto(data) != size:
                raise CheckpointError(f"the large value {name} beside the journal is cut short")
        return data

    # -- writing (the caller's thread queues; the writer thread writes) ------------------------

    def record(self, indices: Sequence[int], items: list[Any], values: list[Any], *, now: bool = True,
               pickled: Buffer | None = None) -> None:
        """Queue the values of ``items`` at ``indices`` (a range or ascending list). ``now=False``
        pickles them on the writer thread, while the caller waits for results: only for values
        nobody can change before ``close`` (a ``map``'s, not an ``imap``'s, which the consumer has;
        the list is copied). ``pickled``: a worker's ``(offsets, values, problems)`` stream holding
        these very values, stored as it is when too small to hold a value kept out of band."""
        if not indices:
            return
        if pickled is not None and memoryview(pickled).nbytes < OUT_OF_BAND:
            values = []  # not pickled again: the row holds the worker's bytes
        else:
            pickled = None
            values = values if now else list(values)  # (the engine owns the list)
        if not now:  # values to pickle: the writer starts on them at once, while the call goes on
            self.put(functools.partial(self._values_row, indices, items, values, time.time(), pickled),
                     wake=pickled is None)
            return
        try:
            row = self._values_row(indices, items, values, time.time(), pickled)
        except Exception as exc:  # a value plain storage refuses: those items run again next time
            self._skipped(exc)
            return
        self.put(row)

    def _values_row(self, indices: Sequence[int], items: list[Any], values: list[Any], finished: float,
                    pickled: Buffer | None = None) -> tuple[Any, ...]:
        first, count, packed = pack_indices(indices)
        stored, digests = identify(items)
        if pickled is not None:
            return (self.call, 0, first, count, packed, stored, digests, pickled, None, None, finished)
        large: list[pickle.PickleBuffer] = []

        def out_of_band(buffer: pickle.PickleBuffer) -> bool:
            if buffer.raw().nbytes < OUT_OF_BAND:
                return True  # small: inside the row
            large.append(buffer)
            return False

        value = cloudpickle.dumps(values, protocol=5, buffer_callback=out_of_band)
        buffers = json.dumps([self.write_blob(buffer) for buffer in large]) if large else None
        return (self.call, 0, first, count, packed, stored, digests, value, buffers, None, finished)

    def record_failure(self, index: int, item: Any, error: BaseException) -> None:
        completed = getattr(error, "completed", None)
        try:
            if completed:  # what else had finished belongs to that call, not to this item's failure
                setattr(error, "completed", {})
            value = pickle_failure(error)  # None: cannot be pickled; its message is kept
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

    def put(self, row: tuple[Any, ...] | Callable[[], tuple[Any, ...]], *, wake: bool = False) -> None:
        """Queue ``row`` for the writer thread; ``wake``: have it start at once (values to pickle)."""
        if self.failure is not None:
            raise CheckpointError(f"the checkpoint {self.path} could not be written: "
                                  f"{type(self.failure).__name__}: {self.failure}") from self.failure
        self._start()
        self.pending.append(row)
        if wake:
            self.wake.set()

    def _start(self) -> None:
        if self.writer is None:
            self.writer = threading.Thread(target=self._write, name="nbparallel-journal", daemon=True)
            self.writer.start()

    def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        if self.writer is not None and self.writer.is_alive():
            done = threading.Event()
            self.pending.append(done)
            self.wake.set()
            while not done.wait(0.1) and self.writer.is_alive():
                pass

    def _write(self) -> None:
        # A row is picked up at most PICKUP_INTERVAL after it was queued, and committed at most
        # COMMIT_INTERVAL after it was queued.
        deadline: float | None = None  # when the open transaction must be committed
        try:
            while True:
                wait = PICKUP_INTERVAL if deadline is None else min(PICKUP_INTERVAL, deadline - time.monotonic())
                self.wake.wait(max(0.0, wait))
                self.wake.clear()
                if self.pending:  # (the caller's thread reads the journal until it queues its first row)
                    self._set_up()
                while self.pending:
                    row = self.pending.popleft()
                    if callable(row):
                        try:
                            row = row()
                        except Exception as exc:  # a value storage refuses: those items run again next time
                            self._skipped(exc)
                            continue
                    if isinstance(row, tuple):
                        if deadline is None:
                            self.db.execute("BEGIN")
                            deadline = time.monotonic() + COMMIT_INTERVAL - PICKUP_INTERVAL
                        self.db.execute(_INSERT, row)
                        continue
                    if deadline is not None:
                        self.db.execute("COMMIT")
                        deadline = None
                    if row is None:
                        return
                    row.set()
                if deadline is not None and time.monotonic() >= deadline:
                    self.db.execute("COMMIT")
                    deadline = None
        except BaseException as exc:  # a full disk, say: the next record() raises it
            self.failure = exc
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        finally:
            if self.closing:
                self._finish()

    def _set_up(self) -> None:
        """Make the journal's tables if this open made the file; write the call if new to it."""
        if not self.ready:
            _prepare(self.db, self.path, True)
            self.remove_orphans()  # a -blobs folder left by a journal deleted since
            self.ready = True
        if self.new_call is not None:
            call, digest, name, source, exact, started, pid = self.new_call
            self.new_call = None
            self.db.execute("INSERT INTO calls (id, digest, name, source, exact, started, pid, host, python) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (call, digest, name, source(), exact, started, pid,
                                                                   socket.gethostname(), sys.version.split()[0]))

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
        self.pending.append(None)
        self.wake.set()
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
        if self.lock is not None and self.failure is None and self.ready:
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


def _prepare(db: sqlite3.Connection, where: Path, write: bool) -> bool:
    """Check the journal, and to write it, set it up; False when it has no table (yet)."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "outcomes" not in tables:
        raise CheckpointError(f"{where} is an SQLite database but not an nbparallel journal; give another path")
    if not write:
        return bool(tables)
    # Setting up syncs nothing: a journal whose creation an OS crash undoes is simply made again.
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA journal_mode = WAL")
    if not tables:
        db.executescript(f"BEGIN; {_SCHEMA} INSERT INTO meta (key, value) VALUES ('format', '{FORMAT}'); COMMIT;")
    db.execute("PRAGMA synchronous = NORMAL")  # with WAL: a process crash loses nothing committed
    found = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
    if found is not None and found[0] == "1":  # its rows read as they are; an older version refuses ours
        db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (FORMAT,))
        found = (FORMAT,)
    if found is None or found[0] != FORMAT:
        raise CheckpointError(f"{where} was written by another version of nbparallel (journal format "
                              f"{found[0] if found else '?'}, this one reads {FORMAT})")
    return True
