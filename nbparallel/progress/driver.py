"""Progress of a call: the model, the throttled driver, and the choice of what draws it.

``map``/``imap`` pass ``for_call(...)`` to ``MapRun`` as its observer. A display is chosen by where
the code runs (decided by looking at ``sys.modules``, never importing IPython):

- a Jupyter kernel: the anywidget in widget.py (a text bar on stderr if anywidget is missing);
- terminal IPython: a one-line text bar on stderr (text.py);
- plain Python: the text bar when stderr is a terminal; nothing when it is a file or a pipe.

``progress=None`` (the default) shows it only once a call has run for ``settings.progress_after``
seconds (1 s), so quick calls print nothing. ``progress=True`` shows it from the start and draws
the text bar even into a file; ``progress=False`` never shows anything and costs nothing.

Threads: counts arrive on the caller's thread (``advanced``), worker output on the client's reader
thread (``output``); the model takes a lock for both. A daemon thread per shown call redraws at most
``FRAME_INTERVAL`` apart and, for the widget, polls the sidecar for per-worker lanes. The last
redraw happens in ``finished`` on the caller's thread, before ``map`` returns, so a notebook run
headless (nbclient) saves the final state. Background futures: ``track_future`` (tracking.py).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ..kernel.output import Labeller, item_label, presentation
from ..kernel.runner import settings
from .model import LaneBook, ProgressModel, Snapshot
from .text import TextBar, is_terminal
from .view import WidgetView

if TYPE_CHECKING:
    from ..kernel.runner import Client
    from ..kernel.mapping import Batch, MapRun

# Tunables (seconds).
FRAME_INTERVAL = 0.1  # at most 10 redraws a second per display
IDLE_REFRESH = 0.5  # redraw this often when only the clock moved
LANES_INTERVAL = 0.33  # poll the sidecar's worker list ~3 times a second while a widget shows


class Renderer(Protocol):
    """Draws Snapshots: TextBar (text.py) or WidgetView (view.py)."""

    wants_lanes: bool

    def reserve(self) -> None:
        """Hold the display's place now, before anything the call prints (may do nothing)."""

    def show(self, snap: Snapshot) -> None: ...

    def update(self, snap: Snapshot) -> None: ...

    def finish(self, snap: Snapshot) -> None:
        """The final state; called even if ``show`` never was, when the call should leave one."""


def poll_workers(client: Client | None, timeout: float = 2.0) -> list[dict[str, Any]] | None:
    """The sidecar's worker list, or None if it cannot answer now."""
    if client is None or client.dead is not None or threading.current_thread() is client.reader:
        return None  # (the reader thread would wait for the very reply it has to read)
    try:
        workers = client.request({"op": "status"}, timeout=timeout).get("workers")
    except Exception:  # a dying sidecar, a timeout: the lanes just stay as they were
        return None
    return list(workers) if isinstance(workers, list) else None


class Driver:
    """Shows one renderer after ``delay`` seconds and redraws it, throttled, until ``finish``."""

    def __init__(self, model: ProgressModel, renderer: Renderer, *, delay: float,
                 poll: Callable[[float], None] | None = None, reveal_after: float | None = None) -> None:
        self.model = model
        self.renderer = renderer
        self.delay = delay
        self.poll = poll if renderer.wants_lanes else None
        self.reveal_after = reveal_after
        self.lock = threading.Lock()  # one redraw at a time; finish's redraw is the last
        self.stop = threading.Event()
        self.stopped = False
        self.shown = False
        self.broken = False

    def start(self, show_now: bool = False) -> None:
        if self.stop.is_set():  # finished before it was started (a future that was done at once)
            return
        if self.poll is not None:
            # On the caller's thread, before any item is sent: this first sample is the baseline of
            # each worker's task count, so a lane counts only this call's tasks.
            self.poll(0.5)
        self._guard(lambda _snap: self.renderer.reserve(), self.model.snapshot())
        if show_now:  # a background call's cell ends right after this: show it from here
            with self.lock:
                self._guard(self.renderer.show, self.model.snapshot())
                self.shown = not self.broken
        threading.Thread(target=self._loop, name="nbparallel-progress", daemon=True).start()

    def _loop(self) -> None:
        if not self.shown:
            if self.stop.wait(self.delay):
                return
            if self.poll is not None:
                self.poll(2.0)  # so the first frame already has its lanes
            with self.lock:
                if self.stopped:
                    return
                self._guard(self.renderer.show, self.model.snapshot())
                self.shown = True
        drawn, last_draw, last_poll = -1, 0.0, 0.0
        while not self.stop.wait(FRAME_INTERVAL) and not self.broken:
            now = time.monotonic()
            if self.poll is not None and now - last_poll >= LANES_INTERVAL:
                self.poll(2.0)
                last_poll = time.monotonic()
            if (self.reveal_after is not None and not self.model.shown
                    and now - self.model.started >= self.reveal_after):
                self.model.reveal()
            if self.model.version == drawn and now - last_draw < IDLE_REFRESH:
                continue
            with self.lock:
                if self.stopped:
                    return
                drawn = self.model.version
                self._guard(self.renderer.update, self.model.snapshot())
                last_draw = time.monotonic()

    def finish(self, show: bool) -> None:
        """The last redraw, on the calling thread. ``show``: draw it even if it was never shown."""
        self.stop.set()
        with self.lock:
            self.stopped = True
            snap = self.model.snapshot()
            if self.shown or show:
                self._guard(self.renderer.finish, snap)
                self.shown = True

    def _guard(self, draw: Callable[[Snapshot], None], snap: Snapshot) -> None:
        if self.broken:
            return
        try:
            draw(snap)
        except Exception as exc:  # a display problem must never break the call itself
            self.broken = True
            print(f"nbparallel: the progress display stopped: {type(exc).__name__}: {exc}", file=sys.stderr)


# -- choosing a display ---------------------------------------------------------------------------

def _shell() -> Any:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        return ipython.get_ipython()
    except Exception:
        return None


def _has_anywidget() -> bool:
    import importlib.util  # rarely needed: only when a kernel first shows progress

    return importlib.util.find_spec("anywidget") is not None


def choose_display(force: bool) -> str | None:
    """``"widget"``, ``"text"`` or None (nowhere useful to draw) for code running here."""
    shell = _shell()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        return "widget" if _has_anywidget() else "text"
    if shell is not None or force:
        return "text"
    return "text" if is_terminal(sys.stderr) else None


def make_renderer(kind: str, on_cancel: Callable[[], None] | None = None) -> Renderer:
    if kind == "widget":
        return WidgetView(on_cancel)
    return TextBar()


def progress_after() -> float:
    return max(0.0, float(settings.progress_after))


def check_progress(progress: object) -> None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (automatic), got {progress!r}")


def _name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return str(name).replace(".<locals>.", ".")


class RunProgress:
    """The Observer of one map/imap call (see ``mapping.Observer``)."""

    def __init__(self, kind: str, description: str, *, force: bool, cancellable: bool,
                 label: Labeller | None = None, unit: str = "items") -> None:
        self.kind = kind
        self.force = force
        self.label = label  # names an item in failures and lanes (``%%parallel``: its parameters)
        self.model = ProgressModel(description, cancellable=cancellable, unit=unit)
        self.lanes = LaneBook()
        self.driver: Driver | None = None
        self.run: MapRun | None = None
        self.iterator: Iterator[Any] | None = None  # imap's generator, closed by Cancel
        self.cancel_pending = False

    def started(self, run: MapRun) -> None:
        self.run = run
        self.model.workers = run.workers
        self.model.set_counts(0, 0, run.total)
        self.model.restart_clock()
        on_cancel = self.cancel if self.model.cancellable else None
        try:
            renderer = make_renderer(self.kind, on_cancel)
            driver = Driver(self.model, renderer, delay=0.0 if self.force else progress_after(), poll=self._poll)
            driver.start()
        except Exception as exc:  # no display is better than a failed call
            print(f"nbparallel: no progress display: {type(exc).__name__}: {exc}", file=sys.stderr)
            return
        self.driver = driver

    def advanced(self, run: MapRun, batch: Batch) -> None:
        if batch.errors:
            self.model.add_errors(batch.errors, lambda index: item_label(index, self.label))
            for index, error in batch.errors.items():
                pid = getattr(error, "pid", None)
                if isinstance(pid, int):  # its worker died (a crash, the memory limit)
                    self.lanes.note_crash(pid, item_label(index, self.label))
        self.model.set_counts(run.done, run.failed, run.next_index if run.exhausted else run.total)
        if run.asynchronous or run.flow.rate:  # items in flight (coroutines) and the rate limit
            self.model.note_flow(sum(run.running.values()) if run.asynchronous else None, rate_text(run.flow.rate))
        if self.cancel_pending:  # Cancel was clicked while another thread was consuming the imap
            self.cancel_pending = False
            raise KeyboardInterrupt("cancelled from the progress widget")

    def output(self, run: MapRun, stream: str, text: str, index: int | None) -> None:
        self.model.add_output(stream, text, index)

    def note_restored(self, count: int) -> None:
        """A checkpointed call (kernel/sweep.py): ``count`` items came from its journal, not from a run."""
        self.model.note_restored(count)

    def finished(self, run: MapRun, state: str) -> None:
        self.model.set_counts(run.done, run.failed, run.next_index if run.exhausted else run.total)
        if self.driver is not None and self.driver.shown and self.driver.poll is not None:
            self._poll(timeout=0.5)  # final task counts per worker; quick, the sidecar is idle now
        self.model.finish(state)
        if self.driver is not None:
            elapsed = time.monotonic() - self.model.started
            self.driver.finish(show=self.force or elapsed >= self.driver.delay)

    def cancel(self) -> None:
        """The widget's Cancel: close the imap generator if nobody is inside it right now (the kernel
        is idle between cells), else make the consuming thread stop at its next result."""
        if self.model.state != "running":
            return
        self.model.request_cancel()
        if self.iterator is not None and hasattr(self.iterator, "close"):
            try:
                self.iterator.close()
                return
            except ValueError:  # "generator already executing": running in another thread
                pass
        self.cancel_pending = True

    def _poll(self, timeout: float = 2.0) -> None:
        run = self.run
        workers = poll_workers(run.client if run is not None else None, timeout)
        if workers is None or run is None:
            return
        job = run.job

        def classify(worker: dict[str, Any]) -> tuple[str, int | None]:
            if worker.get("state") == "busy":
                if worker.get("job") != job:
                    return "other", None
                index = worker.get("index")
                # Given a chunk but on no item yet: importing, unpickling the function or the items.
                return ("busy", index) if index is not None else ("loading", None)
            return str(worker.get("state") or "idle"), None

        lanes = self.lanes.update(workers, classify)
        if self.label is not None:
            for lane in lanes:
                if lane["state"] == "busy" and lane["index"] is not None:
                    lane["label"] = item_label(lane["index"], self.label)
        self.model.set_lanes(lanes)


def rate_text(rate: float | None) -> str:
    """A rate limit in words: ``"50/s"``, ``"30/min"``, ``"10/h"``; empty for none."""
    if not rate:
        return ""
    for per, unit in ((1.0, "s"), (60.0, "min"), (3600.0, "h")):
        if rate * per >= 1 or unit == "h":
            return f"{rate * per:.3g}/{unit}"
    return ""


def for_call(progress: bool | None, fn: Callable[..., Any], verb: str, *,
             cancellable: bool = False) -> RunProgress | None:
    """The observer for one map/imap call, or None when nothing is to be shown.

    ``progress``: None shows it after ``settings.progress_after`` seconds where there is somewhere to
    draw it; True always (from the start); False never.
    """
    check_progress(progress)
    if progress is False:
        return None
    kind = choose_display(force=progress is True)
    if kind is None:
        return None
    shown = presentation()  # a caller such as %%parallel may name the call and its items itself
    return RunProgress(kind, shown.description or f"{verb}({_name(fn)})", force=progress is True,
                       cancellable=cancellable and kind == "widget", label=shown.label, unit=shown.unit)


def attach(observer: RunProgress | None, iterator: Iterator[Any]) -> Iterator[Any]:
    """Let the widget's Cancel close ``iterator`` (imap's generator); returns ``iterator``."""
    if observer is not None:
        observer.iterator = iterator
    return iterator
