"""Progress for calls that run in the background: ``submit``, ``Executor.submit``, ``%%parallel --bg``.

The cell that starts them ends at once, so the widget is put in that cell right away (hidden until
the work has run for ``settings.progress_after`` seconds, unless forced). Every future tracked from
one cell joins that cell's widget, so ``[submit(f, x) for x in xs]`` shows one bar, not a hundred.
Its Cancel button cancels the futures that have not finished; ``TaskFuture.cancel`` then stops the
ones already running in a worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any

from ..config import resolve_workers
from ..crashes import WorkerCrashed
from ..kernel.output import CellTarget, presentation
from ..kernel.runner import current_client, settings
from ..kernel.tasks import stop
from .driver import Driver, check_progress, choose_display, make_renderer, poll_workers, progress_after
from .model import LaneBook, ProgressModel

_groups: dict[str | None, FutureGroup] = {}  # by the message id of the cell that tracked them
_groups_lock = threading.Lock()
_TRACKED = "_nbparallel_group"  # the group a future joined, so tracking it twice is harmless


class FutureGroup:
    """The futures one cell started, shown as one widget."""

    def __init__(self, description: str, *, force: bool) -> None:
        running = current_client()
        try:  # on a Dask cluster, its threads
            workers = (running.size if running is not None else None) or resolve_workers(settings.workers)
        except (TypeError, ValueError):
            workers = 0
        self.model = ProgressModel(description, total=0, workers=workers, unit="tasks", cancellable=True,
                                   shown=force)
        self.lanes = LaneBook(count_tasks=False)  # the pool is shared: its counts are not this group's
        self.lock = threading.Lock()
        self.futures: list[cf.Future[Any]] = []
        self.jobs: dict[int, int] = {}  # sidecar job id -> position in this group
        self.pending = 0
        self.holds = 0  # a joblib call holds its group open between batches (see hold())
        self.fixed_total = False  # the total was set up front (a joblib call that knows its length)
        self.closed = False
        self.cancel_clicked = False
        self.driver = Driver(self.model, make_renderer("widget", self.cancel), delay=0.0, poll=self._poll,
                             reveal_after=None if force else progress_after())

    def add(self, future: cf.Future[Any], weight: int = 1) -> bool:
        """Join ``future`` to the group (counting as ``weight`` tasks: a joblib batch of calls);
        False if the group has already finished."""
        with self.lock:
            if self.closed:
                return False
            position = len(self.futures)
            self.futures.append(future)
            job = getattr(getattr(future, "_task", None), "job", None)
            if isinstance(job, int):
                self.jobs[job] = position
            self.pending += 1
        self.model.add(total=0 if self.fixed_total else weight)
        future.add_done_callback(lambda f: self._settled(f, position, weight))
        return True

    def hold(self) -> None:
        """Keep the group open while no future is pending (a joblib call between two batches)."""
        with self.lock:
            self.holds += 1

    def release(self) -> None:
        """Undo one ``hold``; the group finishes once nothing holds it and nothing is pending."""
        with self.lock:
            self.holds -= 1
            if self.pending > 0 or self.holds > 0 or self.closed:
                return
            self.closed = True
        self._close()

    def _settled(self, future: cf.Future[Any], position: int, weight: int = 1) -> None:
        # Runs on the client's reader thread (a result) or on the thread that cancelled it.
        if future.cancelled():
            self.model.add(cancelled=weight)
        else:
            error = future.exception()
            if error is None:
                self.model.add(done=weight)
            else:
                self.model.add_errors({position: error}, lambda i: f"task {i + 1}")
                self.model.add(failed=weight)
                if isinstance(error, WorkerCrashed):
                    self.lanes.note_crash(error.pid, f"task {position + 1}")
        with self.lock:
            self.pending -= 1
            if self.pending > 0 or self.holds > 0 or self.closed:
                return
            self.closed = True
        self._close()

    def _close(self) -> None:
        with _groups_lock:
            for key, group in list(_groups.items()):
                if group is self:
                    del _groups[key]
        model = self.model
        if self.driver.shown:
            self._poll()  # final task counts (skipped on the reader thread, which cannot wait for it)
        if model.cancelled or self.cancel_clicked:
            state = "cancelled"
        elif model.failed and not model.done:
            state = "failed"
        else:
            state = "done"
        reveal = self.driver.reveal_after
        if not model.shown and reveal is not None and time.monotonic() - model.started >= reveal:
            model.reveal()  # ran long enough to be shown, whether or not the display thread got to it
        model.finish(state)
        self.driver.finish(show=model.shown)

    def cancel(self) -> None:
        """The Cancel button: stop every future of the group that has not finished."""
        self.cancel_clicked = True
        self.model.request_cancel()
        with self.lock:
            futures = list(self.futures)
        for future in futures:
            stop(future)  # running ones too, unlike cancel()

    def _poll(self, timeout: float = 2.0) -> None:
        workers = poll_workers(current_client(), timeout)
        if workers is None:
            return
        jobs = dict(self.jobs)

        def classify(worker: dict[str, Any]) -> tuple[str, int | None]:
            if worker.get("state") == "busy":
                position = jobs.get(worker.get("job"))  # type: ignore[arg-type]
                if position is None:
                    return "other", None
                return ("task", position) if worker.get("index") is not None else ("loading", None)
            return str(worker.get("state") or "idle"), None

        self.model.set_lanes(self.lanes.update(workers, classify))


def track(future: cf.Future[Any], description: str | None = None, *,
          progress: bool | None = None) -> FutureGroup | None:
    """See ``progress.track_future``."""
    check_progress(progress)
    tracked = getattr(future, _TRACKED, None)
    if isinstance(tracked, FutureGroup):
        # Tracked already (submit does it); a caller that knows better may still name it.
        if description and tracked.model.total == 1:
            tracked.model.description = description
        return None
    if progress is False or choose_display(force=progress is True) != "widget":
        return None
    description = presentation().description or description  # e.g. a %%parallel --bg cell names itself
    key = CellTarget.capture().key  # the cell tracking it: its futures share one widget
    while True:
        with _groups_lock:
            group = _groups.get(key)
            fresh = group is None or group.closed
            if fresh:
                group = FutureGroup(description or "background task", force=progress is True)
                _groups[key] = group
        assert group is not None
        if not fresh and description and group.model.description != description:
            group.model.description = "background tasks"  # several kinds of call share this widget
        if group.add(future):
            if fresh:  # shown now, while the cell that started the work still runs (its first frame counts it)
                group.driver.start(show_now=True)
            try:
                setattr(future, _TRACKED, group)
            except AttributeError:  # a future class with __slots__: tracking it twice adds it twice
                pass
            return group


def track_future(future: Any, description: str | None = None, *, progress: bool | None = None) -> None:
    """Show a call running in the background (``submit``, ``%%parallel --bg``) with a Cancel button.

    Futures tracked from one cell share one widget. Outside a kernel this does nothing: a text bar
    would be drawn under the user's prompt. Tracking a future twice is harmless.
    """
    track(future, description, progress=progress)
