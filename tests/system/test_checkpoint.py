"""Durable sweeps: ``checkpoint=`` on map and imap, ``nbparallel.checkpoint.load``, ``%%parallel --checkpoint``.

Each test's function logs every item it computes (one line per run, appended from the workers), so
a test can say exactly which items a resumed call ran again. Kills are real: a kernel and a plain
script are killed with SIGKILL mid-sweep, and the next run must return the full, correct result
having computed only what the journal did not hold.
"""

from __future__ import annotations

import _thread
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nbparallel
from nbparallel.checkpoint import Checkpoint, CheckpointBusy, CheckpointMismatch, load
from nbparallel.kernel.identity import digest, function_id

from _notebooks import Kernel, wait_gone

ROOT = Path(__file__).resolve().parents[2]


def logging_square(log: str, delay: float = 0.0, fail_flag: str = "") -> Callable[[int], int]:
    """``x * x``, appending ``x`` to ``log`` first; raises for 7 while ``fail_flag`` exists."""

    def square(x: int) -> int:
        with open(log, "a") as file:
            file.write(f"{x}\n")
        if fail_flag and x == 7 and os.path.exists(fail_flag):
            raise ValueError("seven is unlucky today")
        time.sleep(delay)
        return x * x

    return square


def computed(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.fixture
def journal(tmp_path: Path) -> str:
    return str(tmp_path / "runs" / "sweep.db")


# -- resuming -------------------------------------------------------------------------------------


def test_a_rerun_computes_nothing_and_new_items_only(tmp_path: Path, journal: str) -> None:
    log = tmp_path / "log"
    square = logging_square(str(log))
    assert nbparallel.map(square, range(50), checkpoint=journal) == [x * x for x in range(50)]
    assert sorted(computed(log)) == list(range(50))
    assert nbparallel.map(square, range(50), checkpoint=journal) == [x * x for x in range(50)]
    assert len(computed(log)) == 50  # nothing ran again
    assert nbparallel.map(square, range(60), checkpoint=journal) == [x * x for x in range(60)]
    assert sorted(computed(log)[50:]) == list(range(50, 60))
    assert nbparallel.map(square, range(60), checkpoint=journal, ordered=False, errors="return") \
        and len(computed(log)) == 60


def test_resume_after_an_interrupt(tmp_path: Path, journal: str) -> None:
    log = tmp_path / "log"
    square = logging_square(str(log), delay=0.05)
    nbparallel.map(abs, [1])  # the pool is up: the interrupt lands in the sweep, not in starting it
    timer = threading.Timer(1.0, _thread.interrupt_main)  # the stop button, as a KeyboardInterrupt here
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            nbparallel.map(square, range(200), workers=2, checkpoint=journal)
    finally:
        timer.cancel()
    assert isinstance(caught.value, nbparallel.Interrupted)
    completed = caught.value.completed
    assert completed and all(v == i * i for i, v in completed.items())
    held = load(journal).values
    assert completed.items() <= held.items()  # everything that arrived was written, late ones too
    before = computed(log)
    assert nbparallel.map(square, range(200), checkpoint=journal) == [x * x for x in range(200)]
    again = computed(log)[len(before):]
    assert sorted(again) == sorted(set(range(200)) - set(held))  # only what the journal lacked


def test_resume_after_an_exception_reruns_the_failure(tmp_path: Path, journal: str) -> None:
    log, flag = tmp_path / "log", tmp_path / "fail"
    flag.touch()
    square = logging_square(str(log), fail_flag=str(flag))
    with pytest.raises(ValueError, match="unlucky") as caught:
        nbparallel.map(square, range(40), checkpoint=journal)
    assert _named(caught.value, 7)
    contents = load(journal)
    assert isinstance(contents.failures[7], ValueError) and 7 not in contents.values
    assert _named(contents.failures[7], 7)  # restored with its __cause__: the remote traceback, the item
    assert all(contents.values[i] == i * i for i in contents.values)
    # errors="return" keeps a failure in its place; rerun_failed=False restores it instead of running it.
    kept = nbparallel.map(square, range(40), errors="return", checkpoint=Checkpoint(journal, rerun_failed=False))
    assert isinstance(kept[7], ValueError) and kept[8] == 64
    assert _named(kept[7], 7) and "seven is unlucky" in nbparallel.details(kept[7]).remote_traceback  # type: ignore[union-attr]
    flag.unlink()
    first = len(computed(log))
    assert nbparallel.map(square, range(40), checkpoint=journal) == [x * x for x in range(40)]
    assert 7 in computed(log)[first:]
    assert load(journal).failures == {}


def _named(error: BaseException, index: int) -> bool:
    """A task's exception that says it was item ``index`` (of the caller's items)."""
    found = nbparallel.details(error)
    notes = " ".join(getattr(error, "__notes__", [])) if sys.version_info >= (3, 11) else str(error.__cause__)
    return found is not None and found.index == index and f"raised by item {index} in" in notes


def crash_on_seven(x: int) -> int:
    if x == 7:
        os._exit(3)
    return x


def test_errors_from_the_rest_carry_the_callers_index_and_the_restored_results(tmp_path: Path, journal: str) -> None:
    log, flag = tmp_path / "log", tmp_path / "fail"
    square = logging_square(str(log), fail_flag=str(flag))
    nbparallel.map(square, range(5), checkpoint=journal)
    flag.touch()
    with pytest.raises(ValueError) as caught:  # 5..19 run: 7 is their item 2, and is the caller's item 7
        nbparallel.map(square, range(20), checkpoint=journal)
    assert _named(caught.value, 7)
    found = nbparallel.details(caught.value)
    assert found is not None and {0, 1, 2, 3, 4} <= found.completed.keys()
    assert all(v == i * i for i, v in found.completed.items())
    crashes = tmp_path / "crash.db"
    nbparallel.map(crash_on_seven, range(5), checkpoint=crashes)
    out = nbparallel.map(crash_on_seven, range(10), errors="return", checkpoint=crashes)
    assert isinstance(out[7], nbparallel.WorkerCrashed) and out[7].index == 7 and "item 7 " in str(out[7]) and "(7)" not in str(out[7])
    assert out[:7] == list(range(7)) and out[8:] == [8, 9]


def test_resume_in_another_process(tmp_path: Path) -> None:
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent("""
        import sys, nbparallel
        WORDS = {"alpha", "beta", "gamma", "delta", "epsilon"}    # a set of strings: hashed in any order
        LOG = sys.argv[2]
        def score(x):
            with open(LOG, "a") as log:
                log.write(f"{x}\\n")
            return x * 3 + sum(len(w) for w in WORDS)
        out = nbparallel.map(score, range(int(sys.argv[3])), checkpoint=sys.argv[1])
        print(out == [x * 3 + 26 for x in range(int(sys.argv[3]))])
    """))
    journal, log = tmp_path / "s.db", tmp_path / "log"
    for seed, count in (("1", 30), ("2", 45)):  # another PYTHONHASHSEED: another string hashing
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, str(script), str(journal), str(log), str(count)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "True", done.stderr
    assert sorted(computed(log)) == list(range(45))  # the second process ran only 30..44
    contents = load(journal)
    assert len(contents.values) == 45 and len(contents.calls) == 1
    assert contents.calls[0].name == "score" and "def score" in (contents.calls[0].source or "")
    assert nbparallel.map(lambda x: x, [], checkpoint=tmp_path / "empty.db") == []


# -- what is the same call --------------------------------------------------------------------------


def _cell(source: str, filename: str, namespace: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run ``source`` as a notebook cell would (its own file name, its own line numbers)."""
    namespace = namespace if namespace is not None else {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_the_function_digest_ignores_where_the_cell_ran_and_sees_what_it_computes() -> None:
    source = "import math\nLIMIT = 3\ndef f(x, k=2):\n    return math.floor(x) * k + LIMIT\n"
    a = _cell(source, "<ipython-input-1>")
    b = _cell("\n\n\n" + source, "/tmp/ipykernel_1/2.py")  # run again, elsewhere, lines moved down
    assert function_id(a["f"]).digest == function_id(b["f"]).digest
    c = _cell(source.replace("LIMIT = 3", "LIMIT = 4"), "<ipython-input-3>")  # a global it reads
    d = _cell(source.replace("k=2", "k=5"), "<ipython-input-4>")  # a default
    e = _cell(source.replace("* k", "* k * 1"), "<ipython-input-5>")  # its code
    digests = {function_id(fn).digest for fn in (a["f"], c["f"], d["f"], e["f"])}
    assert len(digests) == 4

    def make(offset: int) -> Callable[[int], int]:
        return lambda x: x + offset

    assert function_id(make(1)).digest == function_id(make(1)).digest != function_id(make(2)).digest
    assert function_id(a["f"], "map:one").digest != function_id(a["f"], "map:star").digest
    assert digest({"b", "a", "c"}) == digest({"c", "b", "a"}) and digest((1, 2)) != digest((2, 1))


def test_a_changed_function_is_an_error_that_offers_the_choices(tmp_path: Path, journal: str) -> None:
    old = _cell("def f(x):\n    return x + 1\n", "<cell-1>")["f"]
    new = _cell("def f(x):\n    return x + 100\n", "<cell-2>")["f"]
    assert nbparallel.map(old, range(10), checkpoint=journal) == list(range(1, 11))
    with pytest.raises(CheckpointMismatch) as caught:
        nbparallel.map(new, range(15), checkpoint=journal)
    message = str(caught.value)
    assert "different function" in message and "10 results" in message
    for choice in ('on_change="restart"', 'on_change="keep"', "new path"):
        assert choice in message
    assert isinstance(caught.value, ValueError)
    # keep: the old results stay, only the new items run with the new function
    kept = nbparallel.map(new, range(15), checkpoint=Checkpoint(journal, on_change="keep"))
    assert kept == list(range(1, 11)) + list(range(110, 115))
    contents = load(journal)
    assert {contents.function(0).digest, contents.function(14).digest} == {function_id(old, "map:one").digest,
                                                                              function_id(new, "map:one").digest}
    # the new function is now the journal's: no error, nothing runs
    assert nbparallel.map(new, range(15), checkpoint=journal) == kept
    # restart: everything again with the function given
    assert nbparallel.map(old, range(15), checkpoint=Checkpoint(journal, on_change="restart")) == list(range(1, 16))
    assert len(load(journal).calls) == 1


def test_changed_items_run_again_the_others_are_restored(tmp_path: Path, journal: str) -> None:
    log = tmp_path / "log"
    square = logging_square(str(log))
    items = list(range(30))
    nbparallel.map(square, items, checkpoint=journal)
    items[3], items[20] = 103, 120  # two items changed in place
    assert nbparallel.map(square, items, checkpoint=journal) == [x * x for x in items]
    assert sorted(computed(log)[30:]) == [103, 120]
    shorter = items[:10]
    assert nbparallel.map(square, shorter, checkpoint=journal) == [x * x for x in shorter]
    assert len(computed(log)) == 32
    grid = [{"alpha": a, "tags": {"x", "y"}} for a in range(5)]  # dicts and sets of strings as items
    nbparallel.map(lambda item: item["alpha"], grid, checkpoint=tmp_path / "grid.db")
    assert nbparallel.map(lambda item: item["alpha"], grid, checkpoint=tmp_path / "grid.db") == list(range(5))


def test_imap_restores_in_place_and_reads_lazily(tmp_path: Path, journal: str) -> None:
    log = tmp_path / "log"
    square = logging_square(str(log))
    assert list(nbparallel.imap(square, (x for x in range(20)), checkpoint=journal)) == [x * x for x in range(20)]
    assert list(nbparallel.imap(square, (x for x in range(30)), checkpoint=journal)) == [x * x for x in range(30)]
    assert sorted(computed(log)) == list(range(30))
    out = list(nbparallel.imap(square, iter(range(40)), ordered=False, checkpoint=journal))
    assert sorted(out) == [x * x for x in range(40)] and sorted(computed(log)[30:]) == list(range(30, 40))
    assert list(nbparallel.imap(pow, range(5), [2] * 5, checkpoint=tmp_path / "star.db")) == [0, 1, 4, 9, 16]
    assert nbparallel.map(pow, range(6), [2] * 6, checkpoint=tmp_path / "star.db") == [0, 1, 4, 9, 16, 25]


# -- reading, writing, sharing ----------------------------------------------------------------------


def test_load_reads_values_failures_times_and_functions(tmp_path: Path, journal: str) -> None:
    flag = tmp_path / "fail"
    flag.touch()
    square = logging_square(str(tmp_path / "log"), fail_flag=str(flag))
    started = time.time()
    nbparallel.map(square, range(10), errors="return", checkpoint=journal)
    contents = load(journal)
    assert len(contents) == 10 and set(contents.values) == set(range(10)) - {7}
    assert contents.values[9] == 81 and isinstance(contents.failures[7], ValueError)
    assert "unlucky" in str(contents.failures[7])  # the task's own exception, as stored
    assert all(started - 1 <= when.timestamp() <= time.time() + 1 for when in contents.finished.values())
    assert contents.function(3).name == "logging_square.square" and contents.entries[3].item == 3
    assert "9 values, 1 failures, by logging_square.square" in repr(contents)
    records = contents.records()
    assert records[7]["ok"] is False and (records[2]["index"], records[2]["value"], records[2]["item"]) == (2, 4, 2)
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.db")
    assert nbparallel.checkpoint.load(journal).values == contents.values  # reachable as an attribute


def test_two_writers_are_refused_and_a_reader_is_welcome(tmp_path: Path, journal: str) -> None:
    square = logging_square(str(tmp_path / "log"), delay=0.01)
    running = nbparallel.imap(square, range(100), checkpoint=journal)
    try:
        assert next(running) == 0
        with pytest.raises(CheckpointBusy, match="this process"):
            nbparallel.map(square, range(5), checkpoint=journal)
        other = subprocess.run(
            [sys.executable, "-c", "import sys, nbparallel\n"
             "try:\n    nbparallel.map(abs, [1], checkpoint=sys.argv[1])\n"
             "except nbparallel.checkpoint.CheckpointBusy as e:\n    print('busy:', e)\n", journal],
            capture_output=True, text=True, timeout=60)
        assert f"busy: the checkpoint {journal!r} is being written by another sweep (process {os.getpid()}" \
            in other.stdout, other.stdout + other.stderr
        assert isinstance(load(journal).values, dict)  # reading while it is written
    finally:
        running.close()  # type: ignore[attr-defined]
    assert nbparallel.map(square, range(100), checkpoint=journal) == [x * x for x in range(100)]


def big_row(i: int) -> np.ndarray:
    return np.full(300_000, float(i))  # 2.4 MB each


def test_large_values_are_stored_beside_the_journal(tmp_path: Path, journal: str) -> None:
    out = nbparallel.map(big_row, range(6), checkpoint=journal)
    assert len(load(journal)) == 6  # (the last rows are written just after map returns; load waits for them)
    blobs = list(Path(journal + "-blobs").iterdir())
    assert len(blobs) == 6 and all(b.stat().st_size == 2_400_000 for b in blobs)
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT MAX(LENGTH(value)) FROM outcomes").fetchone()[0] < 10_000  # no giant rows
    again = nbparallel.map(big_row, range(6), checkpoint=journal)
    assert all(np.array_equal(a, b) for a, b in zip(out, again)) and again[5][0] == 5.0
    again[0][0] = -1.0  # restored arrays are the caller's to change
    assert np.array_equal(load(journal).values[4], big_row(4))
    blobs[0].write_bytes(b"cut short")  # a value lost (an OS crash): its item runs again, never a wrong value
    assert all(np.array_equal(a, big_row(i)) for i, a in enumerate(nbparallel.map(big_row, range(6), checkpoint=journal)))


def test_submit_once_and_the_progress_bar_says_restored(tmp_path: Path, journal: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    first = nbparallel.checkpoint.submit(tmp_path / "one.db", pow, 2, 10)
    assert first.result(timeout=30) == 1024 and first.restored is False  # type: ignore[attr-defined]
    for _ in range(100):  # its done callback writes the journal, then lets go of it
        try:
            again = nbparallel.checkpoint.submit(tmp_path / "one.db", pow, 2, 10)
            break
        except CheckpointBusy:
            time.sleep(0.05)
    assert again.done() and again.result() == 1024 and again.restored is True  # type: ignore[attr-defined]
    square = logging_square(str(tmp_path / "log"))
    nbparallel.map(square, range(30), checkpoint=journal)
    capsys.readouterr()
    nbparallel.map(square, range(40), checkpoint=journal, progress=True)
    assert "map(logging_square.square) · 30 restored: 10 items in" in capsys.readouterr().err


# -- kills ------------------------------------------------------------------------------------------


@pytest.fixture
def kernels() -> Iterator[list[Kernel]]:
    started: list[Kernel] = []
    try:
        yield started
    finally:
        leftovers = [left for kernel in started for left in kernel.close()]
    assert not leftovers, f"processes outlived the kernels: {leftovers}"


SWEEP_CELL = """
import time, nbparallel
def slow_square(x):
    with open(LOG, "a") as f:
        f.write(f"{x}\\n")
    time.sleep(0.05)
    with open(LOG + ".end", "a") as f:
        f.write(f"{x} {time.time()}\\n")
    return x * x
"""


@pytest.mark.timeout(240)
def test_sigkill_of_the_kernel_mid_sweep_then_a_new_kernel_resumes(tmp_path: Path, kernels: list[Kernel]) -> None:
    journal, log = tmp_path / "sweep.db", tmp_path / "log"
    first = Kernel()
    kernels.append(first)
    first.run(f"LOG = {str(log)!r}\n" + SWEEP_CELL)
    first.submit(f"nbparallel.map(slow_square, range(300), checkpoint={str(journal)!r})")
    deadline = time.monotonic() + 60
    while len(computed(log)) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    below = first.note_descendants()
    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.time()
    assert not wait_gone(below, timeout=5)
    held = load(journal)
    ran = computed(log)
    assert 0 < len(held.values) < 300 and all(v == i * i for i, v in held.values.items())
    # At most about the last second is lost: an item that finished 2 s before the kill is there.
    ended = {int(x): float(t) for x, t in (line.split() for line in Path(str(log) + ".end").read_text().splitlines())}
    settled = {x for x, t in ended.items() if t < killed_at - 2.0}
    assert settled and settled <= set(held.values), sorted(settled - set(held.values))

    second = Kernel()
    kernels.append(second)
    second.run(f"LOG = {str(log)!r}\n" + SWEEP_CELL)
    done = second.run(f"out = nbparallel.map(slow_square, range(300), checkpoint={str(journal)!r})\n"
                      "out == [x * x for x in range(300)]", timeout=120)
    assert done.result() is True
    again = computed(log)[len(ran):]
    assert sorted(again) == sorted(set(range(300)) - set(held.values))  # only the missing items ran

    # The magic: --checkpoint on a --map cell, and on a --bg cell (restored, not run again).
    second.run("%load_ext nbparallel")
    cell = (f"%%parallel --map x=range(8) --checkpoint {tmp_path / 'cell.db'} --out cells\n"
            "x * 10\n")
    second.run(cell)
    assert second.value("[r.value for r in cells]") == [x * 10 for x in range(8)]
    second.run(cell.replace("range(8)", "range(10)"))
    assert second.value("[r.value for r in cells]") == [x * 10 for x in range(10)]
    changed = second.wait(second.submit(cell.replace("x * 10", "x * 11")))
    assert changed.ename == "CheckpointMismatch" and "--on-change" in str(changed.reply.get("evalue"))
    second.run(cell.replace("x * 10", "x * 11").replace("--out", "--on-change restart --out"))
    assert second.value("[r.value for r in cells]") == [x * 11 for x in range(8)]
    bg = f"%%parallel --bg --checkpoint {tmp_path / 'bg.db'}\nanswer = 6 * 7\n"
    second.run(bg + "")
    second.run("%nbparallel wait")
    second.run("answer = None")
    again_bg = second.run(bg)
    assert "restored from" in again_bg.stdout
    second.run("%nbparallel wait")
    assert second.value("answer") == 42


KILLED_SCRIPT = """
import sys, time, nbparallel
LOG = sys.argv[3]
def work(x):
    time.sleep(0.003)
    with open(LOG, "a") as log:
        log.write(f"{x} {time.time()}\\n")
    return (x * 7919) % 1009
out = nbparallel.map(work, range(int(sys.argv[2])), checkpoint=sys.argv[1], workers=2)
print("complete", out == [(x * 7919) % 1009 for x in range(int(sys.argv[2]))])
"""


def _lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.timeout(180)
def test_twenty_random_kills_then_a_complete_run_matches_a_serial_one(tmp_path: Path) -> None:
    script, journal, log = tmp_path / "killed.py", tmp_path / "k.db", tmp_path / "log"
    script.write_text(KILLED_SCRIPT)
    items = 6000
    rng = np.random.default_rng(17)
    started = time.monotonic()
    counts = []
    for kill in range(20):
        before = len(_lines(log))
        proc = subprocess.Popen([sys.executable, str(script), str(journal), str(items), str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        if kill % 5 == 0:  # now and then while it starts (opening the journal, starting the pool)
            time.sleep(float(rng.uniform(0.05, 0.8)))
        else:  # mostly at a random moment of the sweep itself
            deadline = time.monotonic() + 30
            while len(_lines(log)) == before and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(float(rng.uniform(0.1, 2.0)))
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
        proc.communicate(timeout=30)
        with sqlite3.connect(journal) as db:  # never corrupt, whatever moment the kill came at
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        held = load(journal).values if journal.exists() else {}
        counts.append(len(held))
        # At most about the last second is lost: what this run finished 2 s before the kill is there.
        ended = [line.split() for line in _lines(log)[before:]]
        settled = {int(x) for x, t in ended if float(t) < killed_at - 2.0}
        assert settled <= held.keys(), sorted(settled - held.keys())
    done = subprocess.run([sys.executable, str(script), str(journal), str(items), str(log)], capture_output=True,
                          text=True, timeout=60)
    assert "complete True" in done.stdout, done.stderr
    assert counts == sorted(counts) and len(set(counts)) >= 8, counts  # committed stays; kills landed mid-sweep
    assert counts[-1] < items
    contents = load(journal)
    assert [contents.values[i] for i in range(items)] == [(x * 7919) % 1009 for x in range(items)]
    assert time.monotonic() - started < 90
