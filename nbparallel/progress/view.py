"""Shows a ProgressWidget in the right cell and keeps it in step with the progress model."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..kernel.output import CellTarget

if TYPE_CHECKING:
    from .model import Snapshot
    from .widget import ProgressWidget

_SCALARS = ("description", "state", "done", "failed", "total", "rate", "elapsed", "eta", "workers",
            "error_count", "output_count", "summary", "cancellable", "shown")


def widget_state(snap: Snapshot, *, lists: bool = True) -> dict[str, Any]:
    """The traits for ``snap``; ``lists=False`` leaves out lanes, errors and output."""
    state = {name: getattr(snap, name) for name in _SCALARS}
    if lists:
        state.update(lanes=list(snap.lanes), errors=list(snap.errors), output=list(snap.output))
    return state


class Publisher:
    """Puts a display in the cell that was running when this object was made.

    A call shows its widget from a helper thread a second after it starts. Sending the display with
    the cell's parent header saved at the start keeps it in that cell, whatever ran since. The final
    update goes out with the parent of the cell running *now* (it finds the display by its id), as
    nbclient records only messages about the cell it is executing.
    """

    def __init__(self, target: CellTarget | None = None) -> None:
        self.target = target or CellTarget.capture()
        self.display_id = uuid.uuid4().hex

    def publish(self, widget: ProgressWidget | None, update: bool) -> None:
        """Send the widget (None: an empty output, for a display that was never revealed)."""
        if not self.target.in_cell:
            from IPython.display import display, update_display  # outside a kernel: only IPython draws it

            shown: Any = widget if widget is not None else {"text/plain": ""}
            raw = widget is None
            if update:
                update_display(shown, display_id=self.display_id, raw=raw)  # type: ignore[no-untyped-call]
            else:
                display(shown, display_id=self.display_id, raw=raw)  # type: ignore[no-untyped-call]
            return
        bundle = widget._repr_mimebundle_() if widget is not None else ({"text/plain": ""}, {})
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
        self.target.display(data or {}, metadata or {}, self.display_id, update=update, running_cell=update)


class WidgetView:
    """Renders Snapshots into one ProgressWidget (the renderer progress.py uses in a kernel)."""

    wants_lanes = True

    def __init__(self, on_cancel: Callable[[], None] | None = None, target: CellTarget | None = None) -> None:
        self.publisher = Publisher(target)  # made on the caller's thread, so it knows the cell
        self.on_cancel = on_cancel
        self.widget: ProgressWidget | None = None
        self.versions: tuple[int, ...] = ()

    def show(self, snap: Snapshot) -> None:
        from .widget import ProgressWidget  # anywidget is imported only now

        self.widget = ProgressWidget(**widget_state(snap))
        self.versions = snap.versions
        if self.on_cancel is not None:
            self.widget.observe(self._cancel_clicked, names="cancel_requested")
        self.publisher.publish(self.widget, update=False)

    def update(self, snap: Snapshot) -> None:
        widget = self.widget
        if widget is None:
            return
        # Lists are resent only when they changed: output may be hundreds of lines.
        lists = snap.versions != self.versions
        self.versions = snap.versions
        with widget.hold_sync():  # one comm message for all the traits that changed
            for name, value in widget_state(snap, lists=lists).items():
                setattr(widget, name, value)

    def finish(self, snap: Snapshot) -> None:
        self.update(snap)
        if self.widget is not None:
            # Replace the display's text/plain (saved by nbconvert/nbclient) with the final summary,
            # or with nothing when the call ended before the display was ever revealed.
            self.publisher.publish(self.widget if snap.shown else None, update=True)

    def _cancel_clicked(self, change: dict[str, Any]) -> None:
        if change.get("new") and self.on_cancel is not None:
            self.on_cancel()
