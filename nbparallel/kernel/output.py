"""Where output for the caller goes: one ``CellTarget`` for everything sent to the caller's cell.

Worker output, progress displays and a background cell's status and error all reach the kernel on
other threads (the client's reader thread, a progress thread) and often after the cell that started
the call has ended. ipykernel 7 routes output from a thread to the most recent cell unless told
otherwise, so in a kernel a ``CellTarget`` captures the parent header of the cell when the call
starts and publishes each iopub message with that parent explicitly. Outside a kernel it writes to
this process's stdout/stderr, and says so to the senders that have a fallback of their own.
IPython is never imported here: we only look at what the process already loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..wire.frames import Frame

Labeller = Callable[[int], str]


@dataclass(frozen=True)
class Presentation:
    """How the calls started inside ``presenting()`` name themselves: the progress display's
    description, and a label per item for printed lines, displays and failures (``%%parallel``
    names a run by its parameters, ``k=0, seed=3``, rather than ``item 2``)."""

    description: str | None = None
    label: Labeller | None = None
    unit: str = "items"  # what the display counts: "runs" for a %%parallel cell


_presentation: contextvars.ContextVar[Presentation] = contextvars.ContextVar("nbparallel_presentation",
                                                                             default=Presentation())


@contextlib.contextmanager
def presenting(description: str | None = None, label: Labeller | None = None, unit: str = "items"
               ) -> Iterator[None]:
    """Calls started in this block use ``description``, ``label`` and ``unit`` (see ``Presentation``)."""
    token = _presentation.set(Presentation(description, label, unit))
    try:
        yield
    finally:
        _presentation.reset(token)


def presentation() -> Presentation:
    """The presentation in force here (the default names items ``item N``)."""
    return _presentation.get()


def item_label(index: int, label: Labeller | None = None) -> str:
    """How an item is named to the user: ``label(index)``, else ``item 3``."""
    if label is not None:
        try:
            return label(index)
        except Exception:  # a label must never break the output it tags
            pass
    return f"item {index:,}"


class CellTarget:
    """The cell that was running when ``capture()`` was called; usable from any thread later."""

    def __init__(self, shell: Any = None, parent: dict[str, Any] | None = None,
                 label: Labeller | None = None) -> None:
        self.shell = shell  # the kernel's InteractiveShell, or None outside a kernel
        self.parent = parent  # the parent header of the cell's execute request
        self.label = label  # names the items of the call that captured this target

    @classmethod
    def capture(cls) -> CellTarget:
        """The place output belongs to now: the running cell, or the std streams."""
        shell = _kernel_shell()
        return cls(shell, _current_parent(shell) if shell is not None else None, presentation().label)

    @property
    def key(self) -> str | None:
        """The message id of the cell's execute request: what the calls of one cell share."""
        header = (self.parent or {}).get("header") or {}
        msg_id = header.get("msg_id")
        return str(msg_id) if msg_id else None

    @property
    def in_cell(self) -> bool:
        """True in a kernel, where messages reach the cell; False where only std streams exist."""
        kernel = getattr(self.shell, "kernel", None)
        return self.parent is not None and hasattr(kernel, "session") and hasattr(kernel, "iopub_socket")

    def send(self, msg_type: str, content: dict[str, Any], *, ident: bytes | None = None,
             running_cell: bool = False) -> bool:
        """Publish one iopub message to the cell; False (nothing sent) outside a kernel.

        ``running_cell``: with the parent of the cell running *now* if there is one (a display's
        final update: nbclient records only messages about the cell it is executing)."""
        if not self.in_cell:
            return False
        parent = self.parent
        if running_cell:
            parent = _current_parent(self.shell) or parent
        kernel = self.shell.kernel
        kernel.session.send(kernel.iopub_socket, msg_type, content, parent=parent,
                            ident=ident if ident is not None else msg_type.encode())
        return True

    def stream(self, name: str, text: str) -> None:
        """Lines on stdout or stderr (``name``): in the cell, else on this process's stream."""
        name = "stderr" if name == "stderr" else "stdout"
        if self.send("stream", {"name": name, "text": text}, ident=f"stream.{name}".encode()):
            return
        target = sys.stderr if name == "stderr" else sys.stdout
        try:
            target.write(text)
            target.flush()
        except Exception:  # a closed stream at interpreter exit must not kill the reader
            pass

    def display(self, data: dict[str, Any], metadata: dict[str, Any], display_id: str, *,
                update: bool = False, running_cell: bool = False) -> bool:
        """Show (``update``: replace) the display ``display_id``; False outside a kernel."""
        content = {"data": data, "metadata": metadata, "transient": {"display_id": display_id}}
        return self.send("update_display_data" if update else "display_data", content, running_cell=running_cell)

    def tag(self, text: str, index: int | None) -> str:
        """``text`` with each line prefixed by the item that printed it: ``[item 3] ...``."""
        return tag_lines(text, index, self.label)

    def show_frame(self, frame: Frame, *, tagged: bool = True) -> None:
        """A worker's ``display`` frame (a mime bundle its task displayed) as a display in the cell,
        after a line naming the item (``tagged``). Outside a kernel, its text/plain is printed."""
        header = frame.header
        try:
            shown = json.loads(bytes(frame.payload))
            data = {str(k): v for k, v in dict(shown.get("data") or {}).items()}
            metadata = dict(shown.get("metadata") or {})
        except (ValueError, TypeError, AttributeError):  # not a bundle: say so rather than lose the call
            data, metadata = {"text/plain": "[nbparallel: a display from a worker could not be read]"}, {}
        index = header.get("index")
        display_id = header.get("display_id")
        transient = {"display_id": str(display_id)} if display_id else {}
        if display_id and header.get("update"):  # replaces what the task showed under that id
            self.send("update_display_data", {"data": data, "metadata": metadata, "transient": transient})
            return
        if tagged and index is not None:
            self.stream("stdout", f"[{item_label(index, self.label)}]\n")
        if not self.send("display_data", {"data": data, "metadata": metadata, "transient": transient}):
            self.stream("stdout", str(data.get("text/plain", "")) + "\n")

    def error(self, ename: str, evalue: str, traceback: list[str]) -> bool:
        """An error output, as a cell that raised shows it; False outside a kernel."""
        return self.send("error", {"ename": ename, "evalue": evalue, "traceback": traceback})


def _kernel_shell() -> Any:
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return None
    try:
        shell = ipython.get_ipython()
    except Exception:
        return None
    if shell is None or getattr(shell, "kernel", None) is None:
        return None
    return shell


def _current_parent(shell: Any) -> dict[str, Any] | None:
    attempts: list[tuple[Any, tuple[Any, ...]]] = [
        (getattr(shell, "get_parent", None), ()),  # ipykernel 7
        (getattr(shell.kernel, "get_parent", None), ("shell",)),  # ipykernel 6
    ]
    for getter, args in attempts:
        try:
            parent = getter(*args) if getter is not None else None
        except Exception:
            continue
        if parent:
            return dict(parent)
    parent = getattr(shell, "parent_header", None)
    return dict(parent) if parent else None


def tag_lines(text: str, index: int | None, label: Labeller | None = None) -> str:
    """Prefix each line with the item that printed it: ``[item 3] ...`` (``[k=0, seed=3] ...`` with
    the label of a ``%%parallel`` run)."""
    if index is None:
        return text
    prefix = f"[{item_label(index, label) if label is not None else f'item {index}'}] "
    lines = text.splitlines(keepends=True)
    return "".join(prefix + line for line in lines)


def flush_std() -> None:
    """Flush the caller's own streams so its earlier prints come before the workers' lines."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
