"""The text fallback: one progress line on stderr, redrawn in place with a carriage return.

Used in plain Python and terminal IPython (and in a kernel without anywidget). It never prints an
object's repr and never moves the cursor with escape codes, so a log file that captures stderr gets
readable lines. The number formats match js/format.js, so the widget and the bar read alike.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TYPE_CHECKING, TextIO

from .format import format_count, format_duration, format_eta, format_rate, percent_label

if TYPE_CHECKING:
    from .model import Snapshot

#: When stderr is not a terminal (a log file, a pipe), redraw at most this often (seconds):
#: every redraw there is another line's worth of bytes, not an in-place update.
PIPE_INTERVAL = 1.0


# Stand-ins when the stream cannot encode the nicer characters (an ASCII-only locale).
_ASCII = str.maketrans({"█": "#", "·": "|", "–": "-", "…": "..."})


def is_terminal(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed, or not a real file
        return False


def _encodes(stream: TextIO, text: str) -> bool:
    encoding = getattr(stream, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


class TextBar:
    """Draws a Snapshot as one line: ``map(f):  42% |████     | 423/1,000 · 3 failed · 85.2/s · 5.0 s · ETA 7 s``."""

    wants_lanes = False  # no room for per-worker lanes on one line

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream)
        self.ascii = self.stream is None or not _encodes(self.stream, "█·–")
        self.drawn = 0  # length of the line on screen, to blank what a shorter line leaves
        self.bar_width: int | None = None
        self.last = 0.0

    def reserve(self) -> None:
        """A line is drawn where the cursor is when it is first shown: nothing to hold."""

    def show(self, snap: Snapshot) -> None:
        self._write("\r" + self._pad(self.line(snap)))

    def update(self, snap: Snapshot) -> None:
        if not self.tty and time.monotonic() - self.last < PIPE_INTERVAL:
            return
        self.show(snap)

    def finish(self, snap: Snapshot) -> None:
        self._write("\r" + self._pad(f"{snap.description}: {snap.summary}") + "\n")
        self.drawn = 0

    def line(self, snap: Snapshot) -> str:
        """The live line for ``snap``, fitted to the terminal's width."""
        finished = snap.done + snap.failed
        tail = []
        if snap.failed:
            tail.append(f"{format_count(snap.failed)} failed")
        tail.append(format_rate(snap.rate))
        clock = format_duration(snap.elapsed)
        if snap.eta is not None:
            clock += f" · ETA {format_eta(snap.eta)}"
        tail.append(clock)
        if snap.cancel_requested:
            tail.append("cancelling")
        rest = " · ".join(tail)
        if snap.total is None:
            return f"{snap.description}: {format_count(finished)} items · {rest}"
        total = max(snap.total, 1)
        fraction = min(1.0, finished / total) if snap.total else 1.0
        counts = f"{format_count(finished)}/{format_count(snap.total)}"
        head = f"{snap.description}: {percent_label(snap.done, snap.failed, snap.total):>4} |"
        after = f"| {counts} · {rest}"
        columns = shutil.get_terminal_size((80, 24)).columns
        fits = max(10, min(25, columns - len(head) - len(after) - 1))
        # The bar only ever shrinks (when the tail grows), so it does not jump back and forth.
        width = self.bar_width = fits if self.bar_width is None else min(self.bar_width, fits)
        filled = int(fraction * width)
        return head + "█" * filled + " " * (width - filled) + after

    def _pad(self, text: str) -> str:
        padded = text + " " * max(0, self.drawn - len(text))
        self.drawn = len(text)
        return padded

    def _write(self, text: str) -> None:
        if self.stream is None:
            return
        if self.ascii:
            text = text.translate(_ASCII)
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stream at exit must not break the call
            pass
        self.last = time.monotonic()
