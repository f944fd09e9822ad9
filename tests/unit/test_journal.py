"""The journal's rows without any process: values stored as a worker's bytes or pickled here, a
failure with its ``__cause__`` chain, a journal made by the writer thread, and a format 1 journal."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import cloudpickle

from nbparallel.errors import RemoteTraceback, attach, details
from nbparallel.kernel.identity import FunctionId
from nbparallel.kernel.journal import FORMAT, Journal
from nbparallel.kernel.journalfiles import take_idle, wait_pending
from nbparallel.kernel.sweep import plan

FID = FunctionId("0" * 32, "f", "def f(x): ...")


def _written(path: Path) -> Journal:
    wait_pending(path)  # the writer thread of the journal closed last
    return Journal.open(path, write=False)


def test_values_as_a_worker_sent_them_or_pickled_here_read_back_alike(tmp_path: Path) -> None:
    path = tmp_path / "sweep.db"
    journal = Journal.open(path)
    journal.begin(FID, "error")
    stream = cloudpickle.dumps((range(0, 3), [10, 11, 12], {}), protocol=5)  # a worker's outcomes
    journal.record(range(0, 3), [0, 1, 2], [10, 11, 12], now=False, pickled=memoryview(stream))
    journal.record([3, 5], [3, 5], [13, 15])
    journal.close()
    reader = _written(path)
    outcomes, restored, failed = plan(reader, list(range(6)), True)
    assert outcomes == [10, 11, 12, 13, None, 15] and bytes(restored) == b"\1\1\1\1\0\1" and not failed
    assert reader.calls()[0][1:4] == (FID.digest, "f", "def f(x): ...")  # written by the writer thread
    reader.close()


def test_a_failure_is_restored_with_its_cause_chain(tmp_path: Path) -> None:
    path = tmp_path / "sweep.db"
    journal = Journal.open(path)
    journal.begin(FID, "error")
    error = attach(KeyError("k"), RemoteTraceback("Traceback ...\nKeyError: 'k'", index=4, item="4"))
    journal.record_failure(4, 4, error)
    journal.close()
    reader = _written(path)
    _, _, failed = plan(reader, list(range(6)), False)
    reader.close()
    restored = failed[4]
    found = details(restored)
    assert isinstance(restored, KeyError) and found is not None and (found.index, found.item) == (4, "4")
    assert "KeyError: 'k'" in found.remote_traceback and restored.__notes__ == error.__notes__


def test_a_journal_opened_and_closed_is_made_and_a_reader_meanwhile_sees_nothing(tmp_path: Path) -> None:
    path = tmp_path / "sweep.db"
    journal = Journal.open(path)
    reader = Journal.open(path, write=False)  # the tables are not made yet: nothing in it
    assert reader.rows() == [] and reader.calls() == []
    reader.close()
    journal.close()
    wait_pending(path)
    tables = {name for (name,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert {"meta", "calls", "outcomes"} <= tables


def test_a_format_1_journal_is_read_and_becomes_format_2(tmp_path: Path) -> None:
    path = tmp_path / "sweep.db"
    journal = Journal.open(path)
    journal.begin(FID, "error")
    journal.record(range(0, 2), [0, 1], [7, 8])  # a list pickled here: what format 1 holds
    journal.close()
    wait_pending(path)
    idle = take_idle(path)  # the connection kept for the next call: as in a new process, none
    assert idle is not None
    idle.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '1' WHERE key = 'format'")
    db.close()
    again = Journal.open(path)
    assert again.begin(FID, "error") == 1
    outcomes, _, _ = plan(again, [0, 1], True)
    again.close()
    assert outcomes == [7, 8]
    wait_pending(path)
    assert sqlite3.connect(path).execute("SELECT value FROM meta").fetchone() == (FORMAT,)
