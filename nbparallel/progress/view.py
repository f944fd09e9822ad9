"""Shows a ProgressWidget in the right cell, keeps it in step with the progress model, and turns it
into a static rendering (static.py) when the call ends.

The display's life, all under one display id:

1. ``reserve``: an empty output the moment the call starts, so the display sits at the top of the
   cell's output (above every line the workers print), wherever it is drawn later;
2. ``show``: the widget replaces it once the call has run for ``progress_after`` seconds;
3. ``finish``: HTML and text of the final state replace the widget, and the widget is closed. A
   saved notebook then shows the result in any frontend, with no kernel and no widget state.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..kernel.output import CellTarget
from . import static

if TYPE_CHECKING:
    from .model import Snapshot
    from .widget import ProgressWidget

_SCALARS = ("description", "state", "done", "failed", "total", "rate", "elapsed", "eta", "workers",
            "error_count", "summary", "cancellable", "shown", "unit")

#: What a reserved display holds until the widget comes: nothing to draw.
EMPTY: dict[str, Any] = {"text/plain": ""}


def widget_state(snap: Snapshot, *, lists: bool = True) -> dict[str, Any]:
    """The traits for ``snap``; ``lists=False`` leaves out lanes and errors."""
    state = {name: getattr(snap, name) for name in _SCALARS}
    if lists:
        state.update(lanes=list(snap.lanes), errors=list(snap.errors))
    return state


class Publisher:
    """Puts a display in the cell that was running when this object was made.

    A call shows its widget from a helper thread a second after it starts. Sending the display with
    the cell's parent header saved at the start keeps it in that cell, whatever ran since. Updates
    go out with the parent of the cell running *now* (frontends find the display by its id), as
    nbclient records only messages about the cell it is executing.
    """

    def __init__(self, target: CellTarget | None = None) -> None:
        self.target = target or CellTarget.capture()
        self.display_id = uuid.uuid4().hex

    def publish(self, widget: ProgressWidget | None, update: bool) -> bool:
        """Send the widget (None: an empty output); False where no frontend takes displays."""
        if widget is None:
            return self.publish_data(EMPTY, update=update)
        bundle = widget._repr_mimebundle_()
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        return self.publish_data(data or {}, metadata or {}, update=update)

    def publish_data(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, *,
                     update: bool) -> bool:
        """Send a mime bundle as this display (``update``: replacing what it showed)."""
        if self.target.in_cell:
            return self.target.display(data, metadata or {}, self.display_id, update=update, running_cell=update)
        ipython = _ipython_display()
        if ipython is None:
            return False
        display, update_display = ipython  # outside a kernel: only IPython draws it
        if update:
            update_display(data, display_id=self.display_id, raw=True)
        else:
            display(data, display_id=self.display_id, raw=True)
        return True


def _ipython_display() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        from IPython.display import display, update_display  # only where IPython is installed
    except ImportError:
        return None
    return display, update_display


class WidgetView:
    """Renders Snapshots into one ProgressWidget (the renderer progress.py uses in a kernel)."""

    wants_lanes = True

    def __init__(self, on_cancel: Callable[[], None] | None = None, target: CellTarget | None = None) -> None:
        self.publisher = Publisher(target)  # made on the caller's thread, so it knows the cell
        self.on_cancel = on_cancel
        self.widget: ProgressWidget | None = None
        self.versions: tuple[int, ...] = ()
        self.reserved = False

    @property
    def key(self) -> str:
        return self.publisher.display_id

    def reserve(self) -> None:
        """Hold the display's place: an empty output now, at the top of what the call will print."""
        if not self.reserved and self.widget is None and self.publisher.target.in_cell:
            self.reserved = self.publisher.publish(None, update=False)

    def show(self, snap: Snapshot) -> None:
        from .widget import ProgressWidget  # anywidget is imported only now

        self.widget = ProgressWidget(key=self.key, **widget_state(snap))
        self.versions = snap.versions
        if self.on_cancel is not None:
            self.widget.observe(self._cancel_clicked, names="cancel_requested")
        self.publisher.publish(self.widget, update=self.reserved)

    def update(self, snap: Snapshot) -> None:
        widget = self.widget
        if widget is None:
            return
        # Lists are resent only when they changed: the failures may be many, with tracebacks.
        lists = snap.versions != self.versions
        self.versions = snap.versions
        with widget.hold_sync():  # one comm message for all the traits that changed
            for name, value in widget_state(snap, lists=lists).items():
                setattr(widget, name, value)

    def finish(self, snap: Snapshot) -> None:
        """Replace the widget with the static rendering of ``snap`` (or with nothing, when the call
        ended before the display was revealed), then close the widget: nothing is left that needs
        a kernel or saved widget state."""
        widget = self.widget
        if widget is not None:
            self.update(snap)  # the view's last frame, under the static one
        if widget is not None or self.reserved:
            self.publisher.publish_data(static.bundle(snap, self.key) if snap.shown else EMPTY, update=True)
        elif snap.shown:  # never reserved (no cell to reserve it in): a display of its own
            self.publisher.publish_data(static.bundle(snap, self.key), update=False)
        if widget is not None:
            widget.close()

    def _cancel_clicked(self, change: dict[str, Any]) -> None:
        if change.get("new") and self.on_cancel is not None:
            self.on_cancel()
