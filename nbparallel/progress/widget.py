"""The progress widget: an anywidget class whose state is synced traitlets only.

The view is js/progress.js (helpers in js/format.js, style in js/progress.css), shipped as plain
files: no build step, no Node needed to install. Only this module imports anywidget; view.py
imports it when a widget is really about to be shown (so a quick call never pays for the import).

The view's code travels once per kernel, not once per widget: each ProgressWidget's own module is
js/loader.js (about 1 KB), which takes the view and its CSS from one shared ``ViewCode`` model and
keeps them for the page. Saved widget state then holds the code once, however many widgets were
alive when the notebook was saved (a finished call's widget is closed, its display static HTML).
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from pathlib import Path

import anywidget
import ipywidgets  # type: ignore[import-untyped]
import traitlets


def js_dir(package: Path | None = None) -> Path:
    """The folder holding progress.js: ``nbparallel/js`` in a wheel (pyproject.toml force-includes it
    there), the repository's ``js/`` in a source checkout or an editable install."""
    here = package if package is not None else Path(__file__).resolve().parent.parent  # nbparallel/
    for candidate in (here / "js", here.parent / "js"):
        if (candidate / "progress.js").is_file():
            return candidate
    raise FileNotFoundError(
        f"nbparallel's widget files (progress.js) are missing from {here / 'js'} and {here.parent / 'js'}; "
        "reinstall nbparallel."
    )


# progress.js imports its helpers from ./format.js. The frontend loads the widget as one module from
# a string, where a relative import cannot resolve, so the two files are joined here instead.
_HELPERS_IMPORT = re.compile(r'^import\s*\{[^}]*\}\s*from\s*"\./format\.js";[ \t]*$', re.MULTILINE)


@lru_cache(maxsize=1)
def esm_source() -> str:
    """format.js followed by progress.js without its import line: one self-contained ES module."""
    folder = js_dir()
    view, count = _HELPERS_IMPORT.subn("", (folder / "progress.js").read_text("utf-8"))
    if count != 1:
        raise RuntimeError("js/progress.js must import its helpers from ./format.js in one import statement")
    return (folder / "format.js").read_text("utf-8") + "\n" + view


@lru_cache(maxsize=1)
def css_source() -> str:
    """The widget's stylesheet."""
    return (js_dir() / "progress.css").read_text("utf-8")


@lru_cache(maxsize=1)
def loader_source() -> str:
    """js/loader.js: each widget's own module, which loads the shared view."""
    return (js_dir() / "loader.js").read_text("utf-8")


class ViewCode(ipywidgets.Widget):  # type: ignore[misc]
    """The view's ES module and CSS, one model per kernel, shared by every ProgressWidget."""

    code = traitlets.Unicode("").tag(sync=True)
    css = traitlets.Unicode("").tag(sync=True)


_shared: ViewCode | None = None
_shared_lock = threading.Lock()


def shared_view() -> ViewCode:
    """The kernel's ViewCode model, made on first use (again if something closed it)."""
    global _shared
    with _shared_lock:
        if _shared is None or getattr(_shared, "comm", None) is None:
            _shared = ViewCode(code=esm_source(), css=css_source())
        return _shared


class ProgressWidget(anywidget.AnyWidget):
    """Progress of one call, drawn by js/progress.js. The fields mirror ``progress.Snapshot``."""

    _esm = loader_source()

    #: The model id of the shared ViewCode (js/loader.js loads the view from it).
    view_code = traitlets.Unicode("").tag(sync=True)
    #: The display's id: the view keeps what the user opened under it, for the static rendering.
    key = traitlets.Unicode("").tag(sync=True)
    #: "items", or "tasks" for background futures (one task: no counts or rate are shown).
    unit = traitlets.Unicode("items").tag(sync=True)

    description = traitlets.Unicode("").tag(sync=True)
    #: "running", then "done", "failed" or "cancelled".
    state = traitlets.Unicode("running").tag(sync=True)
    done = traitlets.Int(0).tag(sync=True)
    failed = traitlets.Int(0).tag(sync=True)
    #: None while the length of the input is unknown.
    total = traitlets.Int(None, allow_none=True).tag(sync=True)
    #: Items per second, over the last few seconds.
    rate = traitlets.Float(0.0).tag(sync=True)
    elapsed = traitlets.Float(0.0).tag(sync=True)
    #: Seconds left; None when unknown.
    eta = traitlets.Float(None, allow_none=True).tag(sync=True)
    workers = traitlets.Int(0).tag(sync=True)
    #: One dict per worker: pid, state, index, rss, tasks, restarts, note.
    lanes = traitlets.List(traitlets.Dict()).tag(sync=True)
    #: The first failures: where, index, item, kind, message, traceback.
    errors = traitlets.List(traitlets.Dict()).tag(sync=True)
    error_count = traitlets.Int(0).tag(sync=True)
    #: One line: the live state while running, then e.g. "1,000 items in 12.3 s · 2 workers".
    summary = traitlets.Unicode("").tag(sync=True)
    cancellable = traitlets.Bool(False).tag(sync=True)
    #: Set by the Cancel button in the browser.
    cancel_requested = traitlets.Bool(False).tag(sync=True)
    #: False keeps the view empty (a background call that may finish before it is worth showing).
    shown = traitlets.Bool(True).tag(sync=True)

    def __init__(self, **state: object) -> None:
        super().__init__(view_code=shared_view().model_id, **state)

    def __repr__(self) -> str:
        # Also the text/plain that nbconvert/nbclient save, and what a terminal frontend prints.
        return f"{self.description}: {self.summary}" if self.description else str(self.summary)
