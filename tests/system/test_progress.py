"""The progress display: its model, the throttled driver, the widget from Python, the text fallback
(in subprocesses, stderr captured, and under a pseudo-terminal) and a headless notebook run.

The real-browser checks are in test_browser.py; the JavaScript helpers in test_js.py.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _notebooks import load_runner

import nbparallel
from nbparallel.progress import driver as progress
from nbparallel.progress import tracking
from nbparallel.progress.model import MAX_ERRORS, MAX_OUTPUT_LINES, LaneBook, ProgressModel, Snapshot

ROOT = Path(__file__).resolve().parents[2]


# -- the model --------------------------------------------------------------------------------------

class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("nbparallel.progress.model.time.monotonic", fake)
    return fake


def test_counts_rate_eta_and_summary(clock: Clock) -> None:
    model = ProgressModel("map(f)", total=100, workers=2)
    clock.now += 2
    model.set_counts(18, 2)
    snap = model.snapshot()
    assert (snap.done, snap.failed, snap.total, snap.state) == (18, 2, 100, "running")
    assert snap.elapsed == pytest.approx(2.0)
    assert snap.rate == pytest.approx(10.0)  # 20 outcomes in 2 s
    assert snap.eta == pytest.approx(8.0)  # 80 left at 10/s
    assert snap.summary == "running · 20 of 100 items · 2.0 s · 2 failed"
    # The rate follows recent work, not the average since the start.
    clock.now += 1
    model.set_counts(68, 2)
    assert model.snapshot().rate == pytest.approx(50.0)
    clock.now += 1.5
    model.set_counts(97, 3)
    model.finish("done")
    snap = model.snapshot()
    assert snap.state == "done" and snap.eta is None
    assert snap.rate == pytest.approx(100 / 4.5)  # a finished call reports its overall rate
    assert snap.summary == "100 items in 4.5 s · 2 workers · 3 failed"
    clock.now += 60
    assert model.snapshot().elapsed == pytest.approx(4.5)  # the clock stops at the end


@pytest.mark.parametrize(("state", "unit", "total", "done", "expected"), [
    ("failed", "items", 60, 31, "failed after 32 of 60 items in 1.0 s · 2 workers · 1 failed"),
    ("cancelled", "items", None, 9, "cancelled after 10 items in 1.0 s · 2 workers · 1 failed"),
    ("cancelled", "tasks", 2, -1, "cancelled after 0 of 2 tasks in 1.0 s · 2 workers"),
    ("done", "tasks", 2, 1, "2 tasks in 1.0 s · 2 workers · 1 failed"),
    # One submitted task: no counts and no worker total, only how it ended.
    ("cancelled", "tasks", 1, -1, "cancelled after 1.0 s"),
    ("done", "tasks", 1, 1, "done in 1.0 s"),
    ("done", "tasks", 1, 0, "failed after 1.0 s"),
    ("running", "tasks", 1, 0, "running · 1.0 s"),
])
def test_summary_names_the_end(clock: Clock, state: str, unit: str, total: int | None, done: int,
                               expected: str) -> None:
    model = ProgressModel("x", total=total, workers=2, unit=unit)
    clock.now += 1
    model.set_counts(max(done, 0), 0 if done < 0 or (total == 1 and done == 1) else 1)
    model.finish(state)
    assert model.snapshot().summary == expected


def test_unknown_total_has_no_eta(clock: Clock) -> None:
    model = ProgressModel("imap(f)")
    clock.now += 2
    model.set_counts(10, 0)
    snap = model.snapshot()
    assert snap.total is None and snap.eta is None and snap.rate == pytest.approx(5.0)
    assert snap.summary == "running · 10 items · 2.0 s"


def test_failures_and_output_are_bounded_and_lines_are_joined() -> None:
    model = ProgressModel("map(f)")
    errors = {i: nbparallel.WorkerCrashed(index=i, item=str(i), pid=100 + i, exitcode=-9) for i in range(150)}
    model.add_errors(errors, lambda i: f"item {i}")
    snap = model.snapshot()
    assert snap.error_count == 150 and len(snap.errors) == MAX_ERRORS
    first = snap.errors[0]
    assert first["where"] == "item 0" and first["kind"] == "WorkerCrashed"
    assert first["message"].startswith("WorkerCrashed: the worker (pid 100) running item 0")
    # A worker's line may arrive in pieces; it is one line in the panel.
    model.add_output("stdout", "hel", 3)
    model.add_output("stdout", "lo\nworld\npart", 3)
    model.add_output("stderr", "oops\n", 4)
    snap = model.snapshot()
    assert [(o["index"], o["stream"], o["text"]) for o in snap.output] == [
        (3, "stdout", "hello"), (3, "stdout", "world"), (4, "stderr", "oops")]
    for n in range(MAX_OUTPUT_LINES + 50):
        model.add_output("stdout", f"line {n}\n", None)
    model.finish("done")  # flushes the unended "part"
    snap = model.snapshot()
    assert len(snap.output) == MAX_OUTPUT_LINES and snap.output_count == MAX_OUTPUT_LINES + 54
    assert snap.output[-1]["text"] == "part" and snap.output[-2]["text"] == f"line {MAX_OUTPUT_LINES + 49}"


def test_task_error_keeps_the_remote_traceback() -> None:
    def boom(x: int) -> int:
        raise ValueError(f"bad {x}")

    results = nbparallel.map(boom, [5], errors="return", progress=False)
    model = ProgressModel("map(boom)")
    model.add_errors({0: results[0]}, lambda i: f"item {i}")
    entry = model.snapshot().errors[0]
    assert entry["kind"] == "ValueError" and entry["message"] == "ValueError: bad 5"
    assert "Traceback" in entry["traceback"] and "in boom" in entry["traceback"]


def test_model_is_thread_safe() -> None:
    model = ProgressModel("map(f)")

    def hammer(n: int) -> None:
        for i in range(2000):
            model.add(done=1)
            model.add_output("stdout", f"{n}:{i}\n", i)
            model.snapshot()

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snap = model.snapshot()
    assert snap.done == 8000 and snap.output_count == 8000


def test_lanes_keep_their_place_when_a_worker_is_replaced() -> None:
    book = LaneBook()

    def classify(worker: dict[str, Any]) -> tuple[str, int | None]:
        return (str(worker["state"]), worker.get("index"))

    first = book.update([{"pid": 1, "state": "busy", "index": 4, "rss": 10, "tasks_done": 50},
                         {"pid": 2, "state": "idle", "index": None, "rss": 20, "tasks_done": 7}], classify)
    assert [(lane["pid"], lane["state"], lane["index"], lane["tasks"]) for lane in first] == [
        (1, "busy", 4, 0), (2, "idle", None, 0)]  # tasks before this call are not counted
    book.update([{"pid": 1, "state": "busy", "index": 9, "rss": 10, "tasks_done": 55},
                 {"pid": 2, "state": "busy", "index": 8, "rss": 20, "tasks_done": 10}], classify)
    book.note_crash(1, "item 9")
    gone = book.update([{"pid": 2, "state": "busy", "index": 11, "rss": 20, "tasks_done": 12}], classify)
    assert gone[0]["state"] == "crashed" and "crashed on item 9" in gone[0]["note"]
    lanes = book.update([{"pid": 2, "state": "idle", "index": None, "rss": 20, "tasks_done": 13},
                         {"pid": 3, "state": "starting", "index": None, "rss": 0, "tasks_done": 0}], classify)
    assert [lane["pid"] for lane in lanes] == [3, 2]  # the new worker took the crashed one's lane
    assert lanes[0]["restarts"] == 1 and lanes[0]["tasks"] == 5
    assert lanes[0]["note"] == "pid 1 crashed on item 9; pid 3 took its place"
    assert [lane["rss"] for lane in lanes] == [0, 20]
    # Replaced before the crash was reported: the note catches up at the next poll.
    lanes = book.update([{"pid": 3, "state": "idle", "rss": 5, "tasks_done": 1},
                         {"pid": 4, "state": "idle", "rss": 6, "tasks_done": 0}], classify)
    assert lanes[1]["note"] == "pid 2 was stopped; pid 4 took its place"
    book.note_crash(2, "item 11")
    lanes = book.update([{"pid": 3, "state": "idle", "rss": 5, "tasks_done": 1},
                         {"pid": 4, "state": "idle", "rss": 6, "tasks_done": 0}], classify)
    assert lanes[1]["note"] == "pid 2 crashed on item 11; pid 4 took its place"
    # A worker that goes and is not replaced shows as restarting, then its lane goes (the pool shrank).
    for _ in range(LaneBook.VACANT_POLLS):
        lanes = book.update([{"pid": 3, "state": "idle", "rss": 5, "tasks_done": 1}], classify)
        assert [lane["state"] for lane in lanes] == ["idle", "starting"]
    assert len(book.update([{"pid": 3, "state": "idle", "rss": 5, "tasks_done": 1}], classify)) == 1


# -- the driver: throttling, delay, and what each setting of `progress` does ---------------------------

class Recorder:
    """A renderer that remembers what it was asked to draw."""

    wants_lanes = True
    made: list[Recorder] = []

    def __init__(self, on_cancel: Any = None) -> None:
        self.on_cancel = on_cancel
        self.calls: list[tuple[str, float, Snapshot]] = []
        self.reserved: float | None = None
        Recorder.made.append(self)

    def reserve(self) -> None:
        self.reserved = time.monotonic()

    def show(self, snap: Snapshot) -> None:
        self.calls.append(("show", time.monotonic(), snap))

    def update(self, snap: Snapshot) -> None:
        self.calls.append(("update", time.monotonic(), snap))

    def finish(self, snap: Snapshot) -> None:
        self.calls.append(("finish", time.monotonic(), snap))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.calls]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[Recorder]:
    """Every display a call makes is a Recorder, as if the code ran in a kernel with widgets."""
    Recorder.made = []
    monkeypatch.setattr(progress, "choose_display", lambda force: "widget")
    monkeypatch.setattr(progress, "make_renderer", lambda kind, on_cancel=None: Recorder(on_cancel))
    return Recorder


def test_many_fast_items_are_coalesced(recorder: type[Recorder]) -> None:
    started = time.monotonic()
    results = nbparallel.map(abs, range(-20_000, 0), workers=2, progress=True)
    took = time.monotonic() - started
    assert results[:3] == [20_000, 19_999, 19_998]
    shown = recorder.made[0]
    kinds = shown.kinds()
    assert kinds[0] == "show" and kinds[-1] == "finish" and kinds.count("finish") == 1
    # At most ~10 redraws a second, however many batches arrived.
    assert kinds.count("update") <= took * 10 + 2, (kinds.count("update"), took)
    final = shown.calls[-1][2]
    assert (final.state, final.done, final.total) == ("done", 20_000, 20_000)
    assert len(final.lanes) == 2 and sum(lane["tasks"] for lane in final.lanes) == 20_000


def test_auto_shows_nothing_for_a_quick_call(recorder: type[Recorder]) -> None:
    assert nbparallel.map(abs, [-1, -2, -3]) == [1, 2, 3]
    assert recorder.made and recorder.made[0].calls == []


def test_auto_shows_a_slow_call_after_progress_after(recorder: type[Recorder],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbparallel.kernel.runner.settings, "progress_after", 0.3)
    started = time.monotonic()
    nbparallel.map(time.sleep, [0.1] * 12, workers=2)
    kinds = recorder.made[0].kinds()
    assert kinds[0] == "show" and kinds[-1] == "finish"
    assert recorder.made[0].calls[0][1] - started >= 0.3
    busy = [lane for kind, _, snap in recorder.made[0].calls for lane in snap.lanes if lane["state"] == "busy"]
    assert busy and all(isinstance(lane["index"], int) for lane in busy if lane["index"] is not None)


def test_progress_false_costs_nothing_and_bad_values_are_refused(recorder: type[Recorder]) -> None:
    assert progress.for_call(False, abs, "map") is None
    nbparallel.map(abs, [1, 2], progress=False)
    assert recorder.made == []
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        nbparallel.map(abs, [1], progress="yes")  # type: ignore[arg-type]


def test_plain_python_draws_only_into_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_shell", lambda: None)
    monkeypatch.setattr("nbparallel.progress.driver.is_terminal", lambda stream: False)
    assert progress.choose_display(force=False) is None
    assert progress.choose_display(force=True) == "text"
    monkeypatch.setattr("nbparallel.progress.driver.is_terminal", lambda stream: True)
    assert progress.choose_display(force=False) == "text"


def test_failed_call_ends_red(recorder: type[Recorder]) -> None:
    def fail_at_three(x: int) -> int:
        if x == 3:
            raise KeyError(x)
        return x

    with pytest.raises(KeyError):
        nbparallel.map(fail_at_three, range(8), workers=2, progress=True)
    final = recorder.made[0].calls[-1][2]
    assert final.state == "failed" and final.error_count >= 1
    assert any(error["message"] == "KeyError: 3" for error in final.errors)


def test_cancel_closes_an_imap_between_cells(recorder: type[Recorder]) -> None:
    iterator = nbparallel.imap(time.sleep, [0.05] * 400, workers=2, progress=True)
    assert [next(iterator) for _ in range(3)] == [None, None, None]
    shown = recorder.made[0]
    assert shown.on_cancel is not None  # imap in a kernel gets a Cancel button
    shown.on_cancel()  # what clicking it does, while nothing is consuming the iterator
    with pytest.raises(StopIteration):
        next(iterator)
    final = shown.calls[-1][2]
    assert shown.kinds()[-1] == "finish" and final.state == "cancelled" and final.done < 400
    deadline = time.monotonic() + 5
    while any(w["state"] == "busy" for w in nbparallel.status()["workers"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(w["state"] == "busy" for w in nbparallel.status()["workers"])


# -- background futures ------------------------------------------------------------------------------

@pytest.fixture
def tracked(recorder: type[Recorder], monkeypatch: pytest.MonkeyPatch) -> Iterator[type[Recorder]]:
    monkeypatch.setattr("nbparallel.progress.tracking.choose_display", lambda force: "widget")
    monkeypatch.setattr("nbparallel.progress.tracking.make_renderer", lambda kind, on_cancel=None: Recorder(on_cancel))
    yield recorder
    from nbparallel.progress import tracking

    for group in list(tracking._groups.values()):  # a failed test must not leave tasks running
        group.cancel()


def test_track_future_outside_a_kernel_does_nothing() -> None:
    from nbparallel.progress.tracking import track

    future = nbparallel.submit(abs, -3)
    assert track(future, "x") is None and future.result(timeout=30) == 3


def test_futures_of_one_cell_share_a_widget_whose_cancel_stops_them(tracked: type[Recorder]) -> None:
    futures = [nbparallel.submit(time.sleep, 20) for _ in range(3)]
    for future in futures:
        tracking.track_future(future, "submit(sleep)")
    tracking.track_future(futures[0], "again")  # tracked already: not counted twice
    assert len(tracked.made) == 1
    shown = tracked.made[0]
    assert shown.kinds()[0] == "show" and shown.calls[0][2].shown is False  # hidden for its first second
    def busy_and_shown() -> bool:
        last = shown.calls[-1][2]
        return last.shown and sum(lane["state"] == "task" for lane in last.lanes) == 2

    deadline = time.monotonic() + 10
    while not busy_and_shown() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_and_shown(), shown.calls[-1][2]  # revealed after a second; both workers on our tasks
    assert shown.calls[-1][2].total == 3
    started = time.monotonic()
    shown.on_cancel()  # the Cancel button
    assert all(future.cancelled() for future in futures)
    final = shown.calls[-1][2]
    assert shown.kinds()[-1] == "finish" and final.state == "cancelled"
    assert final.summary.startswith("cancelled after 0 of 3 tasks")
    while any(w["state"] == "busy" for w in nbparallel.status()["workers"]) and time.monotonic() < started + 5:
        time.sleep(0.05)
    assert not any(w["state"] == "busy" for w in nbparallel.status()["workers"])


def test_a_finished_group_reports_failures(tracked: type[Recorder]) -> None:
    futures = [nbparallel.submit(int, text) for text in ("1", "x", "3")]
    for future in futures:
        tracking.track_future(future, "submit(int)", progress=True)
    for future in futures:
        try:
            future.result(timeout=30)
        except ValueError:
            pass
    deadline = time.monotonic() + 5
    while tracked.made[0].kinds()[-1] != "finish" and time.monotonic() < deadline:
        time.sleep(0.02)
    final = tracked.made[0].calls[-1][2]
    assert (final.state, final.done, final.failed, final.total) == ("done", 2, 1, 3)
    assert final.errors[0]["where"] == "task 2" and final.errors[0]["kind"] == "ValueError"


# -- the widget, from Python -------------------------------------------------------------------------

def test_widget_traits_repr_and_module() -> None:
    from nbparallel.progress.view import widget_state
    from nbparallel.progress.widget import ProgressWidget, esm_source, js_dir, shared_view

    model = ProgressModel("map(f)", total=10, workers=2)
    model.set_counts(7, 3)
    model.finish("done")
    widget = ProgressWidget(**widget_state(model.snapshot()))
    assert (widget.done, widget.failed, widget.total, widget.state) == (7, 3, 10, "done")
    assert repr(widget).startswith("map(f): 10 items in ") and repr(widget).endswith("· 2 workers · 3 failed")
    bundle = widget._repr_mimebundle_()
    assert bundle is not None
    data, _ = bundle
    assert data["text/plain"] == repr(widget)
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == widget.model_id
    source = esm_source()
    assert 'from "./format.js"' not in source and "export default { render }" in source
    assert "export function formatRate" in source
    # Each widget carries only the loader; the view's code is in one shared model per kernel.
    other = ProgressWidget(**widget_state(model.snapshot()))
    assert widget._esm == other._esm and "function drawHead" not in widget._esm and len(widget._esm) < 4000
    assert widget.view_code == other.view_code == shared_view().model_id and "function drawHead" in shared_view().code
    other.close()
    assert js_dir() == ROOT / "js"  # a source checkout (editable install)
    widget.close()


def test_js_folder_is_found_in_a_wheel_layout(tmp_path: Path) -> None:
    from nbparallel.progress.widget import js_dir

    package = tmp_path / "site-packages" / "nbparallel"
    (package / "js").mkdir(parents=True)
    (package / "js" / "progress.js").write_text("")
    assert js_dir(package) == package / "js"
    with pytest.raises(FileNotFoundError, match="reinstall nbparallel"):
        js_dir(tmp_path / "elsewhere" / "nbparallel")


def test_widget_view_sends_lists_only_when_they_change(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbparallel.progress.view import Publisher, WidgetView

    published: list[bool] = []
    monkeypatch.setattr(Publisher, "publish", lambda self, widget, update: published.append(update) or True)
    monkeypatch.setattr(Publisher, "publish_data", lambda self, data, metadata=None, *, update: True)
    cancelled: list[bool] = []
    view = WidgetView(on_cancel=lambda: cancelled.append(True))
    model = ProgressModel("imap(f)", total=5, cancellable=True)
    view.show(model.snapshot())
    widget = view.widget
    assert widget is not None and published == [False] and widget.cancellable
    assert widget.key == view.key and widget.view_code  # the shared model that carries the view's code
    sent: list[list[str]] = []
    monkeypatch.setattr(widget, "send_state", lambda key=None: sent.append(sorted(key or [])))
    model.set_counts(2, 0)
    view.update(model.snapshot())
    assert sent and not {"lanes", "errors"} & set(sent[-1])
    model.add_errors({3: ValueError("x")}, lambda i: f"item {i}")
    view.update(model.snapshot())
    assert "errors" in sent[-1] and widget.errors[0]["message"] == "ValueError: x"
    widget.cancel_requested = True  # the browser's Cancel button sets this
    assert cancelled == [True]
    model.finish("cancelled")
    view.finish(model.snapshot())
    assert widget.state == "cancelled" and widget.comm is None  # closed: its display is static now


class CellRecorder:
    """A CellTarget that keeps the display messages it was asked to send."""

    in_cell = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def display(self, data: dict[str, Any], metadata: dict[str, Any], display_id: str, *,
                update: bool = False, running_cell: bool = False) -> bool:
        self.sent.append(("update" if update else "display", {"data": data, "id": display_id}))
        return True


def test_the_display_is_reserved_shown_then_static(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbparallel.progress import static
    from nbparallel.progress.view import WidgetView

    cell = CellRecorder()
    view = WidgetView(target=cell)  # type: ignore[arg-type]
    view.reserve()  # at the start of the call: an empty output, above anything the workers print
    model = ProgressModel("map(measure)", total=100, workers=2)
    view.show(model.snapshot())  # a second later: the widget takes that place
    model.set_counts(95, 5)
    model.add_errors({7: ValueError("7 is out of range"), 32: KeyError(32)}, lambda i: f"item {i}")
    model.finish("done")
    snap = model.snapshot()
    view.finish(snap)
    kinds = [kind for kind, _ in cell.sent]
    assert kinds == ["display", "update", "update"] and len({m["id"] for _, m in cell.sent}) == 1
    assert cell.sent[0][1]["data"] == {"text/plain": ""}
    assert "application/vnd.jupyter.widget-view+json" in cell.sent[1][1]["data"]
    final = cell.sent[2][1]["data"]
    assert set(final) == {"text/html", "text/plain"}  # nothing that needs a kernel or widget state
    assert final["text/plain"].splitlines() == [
        f"map(measure): {snap.summary}", "  item 7: ValueError: 7 is out of range", "  item 32: KeyError: 32"]
    page = final["text/html"]
    assert f'data-nbp-key="{view.key}"' in page and 'data-state="done"' in page and 'data-failed="5"' in page
    assert "<script" not in page and "done, with failures" in page and "2 failed" in page
    assert page.count('<details data-nbp-section="error-') == 2 and 'data-nbp-section="errors" style' in page.replace('class="nbp-errors" ', '')
    assert static.bundle(snap, view.key) == final
    # A call that ended before its display was revealed leaves the reserved output empty.
    quiet = WidgetView(target=cell)  # type: ignore[arg-type]
    quiet.reserve()
    hidden = ProgressModel("map(f)", total=3, shown=False)
    hidden.finish("done")
    quiet.finish(hidden.snapshot())
    assert [m["data"] for _, m in cell.sent[3:]] == [{"text/plain": ""}, {"text/plain": ""}]


def test_static_rendering_escapes_and_reads_without_styles() -> None:
    import html
    import re

    from nbparallel.progress import static

    model = ProgressModel("map(<lambda>)", total=6, workers=2)
    model.set_counts(0, 1)
    model.add_errors({0: ValueError("<b>bold</b> & more")}, lambda i: f"item {i}")
    model.finish("failed")
    page = static.html_text(model.snapshot(), "k")
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    assert "map(&lt;lambda&gt;)" in page
    # What a sanitizer that drops every style (GitHub) leaves: still the whole story, as text.
    plain = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r' style="[^"]*"', "", page)))
    words = " ".join(plain.split())
    assert "failed map(<lambda>) 1 / 6 17%" in words and "1 failed item 0 ValueError: <b>bold</b> & more" in words
    one = ProgressModel("long_job (background)", total=1, unit="tasks", workers=2)
    one.add(done=1)
    one.finish("done")
    snap = one.snapshot()
    assert static.counts_text(snap) == "" and 'class="nbp-counts"' not in static.html_text(snap)
    assert static.text(snap).startswith("long_job (background): done in ")


# -- the text fallback, in real processes -------------------------------------------------------------

SCRIPT = """
import time, nbparallel

def slow(x):
    time.sleep(0.06)
    if x % 10 == 3:
        raise ValueError(x)
    return x

out = nbparallel.map(slow, range(40), workers=2, errors="return", progress={progress})
print("results", len(out), sum(isinstance(r, Exception) for r in out))
"""


def _check_text_bar(stderr: str) -> None:
    assert "\r" in stderr and "Traceback" not in stderr
    assert "object at 0x" not in stderr and "<nbparallel" not in stderr
    frames = [frame.strip() for frame in stderr.split("\r") if frame.strip()]
    assert any("% |" in frame and "/40" in frame for frame in frames), frames
    assert frames[-1].startswith("map(slow): 40 items in ") and frames[-1].endswith("· 2 workers · 4 failed")
    assert stderr.endswith("\n") and stderr.count("\n") == 1  # one line, redrawn in place


@pytest.mark.timeout(60)
def test_text_bar_in_plain_python(script_env: dict[str, str]) -> None:
    # Bytes: text mode would turn the carriage returns into newlines.
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(progress=True)], env=script_env,
                          capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == "results 40 4"
    _check_text_bar(done.stderr.decode())


@pytest.mark.timeout(60)
def test_plain_python_into_a_file_stays_quiet(script_env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(progress=None)], env=script_env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "results 40 4"
    assert done.stderr == ""


@pytest.mark.timeout(60)
def test_text_bar_in_a_terminal(script_env: dict[str, str]) -> None:
    """Under a pseudo-terminal the default (None) draws the bar: that is what a user at a shell sees."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(progress=None)], env=script_env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
    finally:
        os.close(terminal)
    seen = b""
    deadline = time.monotonic() + 50
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    stdout, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and stdout.decode().strip() == "results 40 4"
    _check_text_bar(seen.decode().replace("\r\n", "\n"))  # the terminal turns "\n" into "\r\n"


@pytest.mark.timeout(90)
def test_text_bar_in_terminal_ipython(script_env: dict[str, str]) -> None:
    ipython = [sys.executable, "-m", "IPython", "--no-banner", "--quick", "--HistoryManager.hist_file=:memory:",
               "--colors=nocolor", "-c", SCRIPT.format(progress=None)]
    done = subprocess.run(ipython, env=script_env, capture_output=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert "results 40 4" in done.stdout.decode()
    _check_text_bar(done.stderr.decode())


# -- a notebook executed headless keeps the final state ------------------------------------------------

@pytest.mark.timeout(240)
def test_headless_notebook_saves_the_final_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = load_runner()
    shutil.copy(ROOT / "examples" / "progress_demo.ipynb", tmp_path)
    monkeypatch.setenv("NBPARALLEL_DEMO_SCALE", "0.2")  # the kernel inherits it: a 2 s background job
    run = runner.execute_notebook(tmp_path / "progress_demo.ipynb")
    assert run.ok, run.failure
    notebook = run.notebook
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    # Every finished call left HTML and text, and no widget view that would need a kernel or saved state.
    assert not any("application/vnd.jupyter.widget-view+json" in output.get("data", {}) for output in outputs)
    finals = [output["data"] for output in outputs if "text/html" in output.get("data", {})
              and 'class="nbp-static"' in output["data"]["text/html"]
              and not output["data"]["text/plain"].startswith("%%parallel")]  # the sweep's: if it ran past 1 s
    assert len(finals) == 3, [output.get("data", output.get("text")) for output in outputs]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 4  # the sweep's runs plotted in the workers
    heads = [final["text/plain"].splitlines()[0] for final in finals]
    assert heads[0].startswith("map(measure): 100 items in ") and heads[0].endswith("· 2 workers · 5 failed")
    assert heads[1].startswith("map(fragile): failed after ")
    assert heads[2].startswith("long_job (background): done in ")
    pages = [final["text/html"] for final in finals]
    assert 'data-state="done" data-tone="warn" data-done="95" data-failed="5" data-total="100"' in pages[0]
    assert pages[0].count('class="nbp-error"') == 5 and "ValueError: 7 is out of range" in pages[0]
    assert "in measure" in pages[0]  # the remote traceback, in a closed <details>
    assert 'data-state="failed"' in pages[1] and "KeyError: 30" in pages[1]
    assert 'data-state="done"' in pages[2] and "nbp-counts" not in pages[2]  # one task: no counts
    assert finals[0]["text/plain"].splitlines()[1] == "  item 7: ValueError: 7 is out of range"
    # The models that remain (closed widgets may stay in nbclient's record) hold the view's code once.
    state = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    serialized = json.dumps(state)
    assert serialized.count("function drawHead") <= 1, "the view's code is saved once per widget"
