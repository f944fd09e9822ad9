"""The hand-off from a checkpointed call (sweep.py) to the map or imap it makes.

The sweep sets ``RECORDER`` before calling the ordinary front door; the front door passes its
observer through ``recording``. Kept apart from sweep.py so that a plain call does not import the
journal (sqlite3 and the checkpoint machinery: ~20 ms at a cold start).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .mapping import Observer

    class Recording(Observer, Protocol):
        """What the sweep hands over (its ``Recorder``): an observer that passes on to ``inner``."""

        inner: Observer | None


RECORDER: ContextVar[Recording | None] = ContextVar("nbparallel_sweep_recorder", default=None)


def recording(observer: Observer | None) -> Observer | None:
    """The observer a map/imap call runs with: ``observer``, or inside a checkpointed call the
    ``Recorder`` that writes each batch to the journal before passing it on to ``observer``."""
    recorder = RECORDER.get()
    if recorder is None:
        return observer
    RECORDER.set(None)  # only the call the sweep makes, not one it might trigger
    recorder.inner = observer
    return recorder
