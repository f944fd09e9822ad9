"""Rich output from tasks: ``display()`` and matplotlib figures reach the caller's cell.

A worker has no IPython shell, so IPython's ``display(df)`` would only print the object's repr, and
a figure would stay in the worker's memory, never shown. ``install`` (called once by the worker at
start) changes that without importing IPython or matplotlib itself:

- when a task first imports ``IPython.core.display_functions`` (``from IPython.display import
  display`` does), its ``display``, ``update_display``, ``publish_display_data`` and
  ``clear_output`` are replaced with versions that compute the mime bundle here, with IPython's own
  formatters (a DataFrame's ``_repr_html_``, an image's ``_repr_png_``...), and send it to the kernel
  as a ``display`` frame tagged with the item being run (docs/protocol.md);
- when a task first imports matplotlib, its default backend becomes ``nbparallel.worker.figures``
  (unless ``MPLBACKEND`` names another than a notebook's inline one): ``plt.show()`` sends each open figure as a PNG, and figures
  a task leaves open are sent, tagged with the item that made them, when its chunk ends (``flush``),
  as a notebook shows them at the end of a cell.

The kernel shows each bundle in the cell that started the call, after a line naming the item.
"""

from __future__ import annotations

import base64
import importlib
import importlib.machinery
import io
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from ..wire import worker_messages as wmsg

if TYPE_CHECKING:
    from importlib.abc import Loader

#: A bundle bigger than this (as JSON) is replaced by a line saying so: it would cost the kernel and
#: the notebook file more than it can be worth.
MAX_BUNDLE_BYTES = 16 * 2**20
BACKEND = "module://nbparallel.worker.figures"

Send = Callable[[wmsg.WorkerDisplay, Sequence[bytes]], None]
Where = Callable[[], "tuple[int | None, int | None]"]  # (job, index) being run now


class _Sink:
    """Where bundles go: the worker's connection, and what it is running now."""

    def __init__(self) -> None:
        self.send: Send | None = None
        self.where: Where = lambda: (None, None)
        self.formatter: Any = None
        self.lock = threading.Lock()


_sink = _Sink()


def install(send: Send, where: Where) -> None:
    """Route the displays of this process's tasks through ``send``, tagged by ``where()``."""
    _sink.send, _sink.where = send, where
    hooks: dict[str, Callable[[ModuleType], None]] = {
        "IPython.core.display_functions": _patch_ipython, "matplotlib": _choose_backend}
    for name, hook in list(hooks.items()):
        module = sys.modules.get(name)
        if module is not None:  # imported already (a preload): change it now
            hook(module)
            del hooks[name]
    if hooks:
        sys.meta_path.insert(0, _AfterImport(hooks))


def where() -> tuple[int | None, int | None]:
    """The (job, item index) being run now."""
    return _sink.where()


def publish(data: dict[str, Any], metadata: dict[str, Any] | None = None, *, made_by: tuple[int | None, int | None]
            | None = None, display_id: str | None = None, update: bool = False) -> None:
    """Send one mime bundle to the kernel (``made_by``: the job and item to tag it with, else the
    current ones). Printed lines still buffered go first, so the cell keeps the task's order."""
    send = _sink.send
    if send is None:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a task may have closed or replaced them
            pass
    job, index = made_by if made_by is not None else _sink.where()
    payload = json.dumps({"data": _jsonable(data), "metadata": _jsonable(metadata or {})}).encode()
    if len(payload) > MAX_BUNDLE_BYTES:
        kinds = ", ".join(sorted(data))
        note = f"[nbparallel: a display of {len(payload) / 2**20:.0f} MiB ({kinds}) was left out]"
        payload = json.dumps({"data": {"text/plain": note}, "metadata": {}}).encode()
    header = wmsg.worker_display(job=job, index=index)
    if display_id:
        header["display_id"] = display_id
        if update:
            header["update"] = True
    with _sink.lock:
        send(header, [payload])


def _jsonable(value: Any) -> Any:
    """A bundle as JSON can carry it: bytes (a PNG) in base64, as Jupyter sends images."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def figure_bundle(figure: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A matplotlib figure as a notebook shows it: a PNG cropped to what is drawn, and its repr."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", facecolor=figure.get_facecolor())
    return {"image/png": buffer.getvalue(), "text/plain": repr(figure)}, {}


def show_figures(figures: Sequence[Any] | None = None) -> None:
    """Send pyplot's open figures (or ``figures``), each tagged with the item that made it, and
    close them."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    if figures is None:
        figures = [pyplot.figure(number) for number in pyplot.get_fignums()]
    for figure in figures:
        try:
            data, metadata = figure_bundle(figure)
        except Exception as exc:  # a figure that cannot be drawn must not fail the item that made it
            data, metadata = {"text/plain": f"[nbparallel: a figure could not be drawn: {type(exc).__name__}: {exc}]"}, {}
        publish(data, metadata, made_by=getattr(figure.canvas, "nbparallel_made_by", None))
        pyplot.close(figure)


def flush() -> None:
    """End of a chunk: figures its tasks left open are shown (and closed), as at the end of a cell."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and pyplot.get_fignums() and _uses_our_backend():
        show_figures()


def _uses_our_backend() -> bool:
    matplotlib = sys.modules.get("matplotlib")
    return matplotlib is not None and str(matplotlib.get_backend()) == BACKEND


# -- IPython's display functions, as a worker has them ------------------------------------------------

def _format(obj: Any, include: Any = None, exclude: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    figure_module = sys.modules.get("matplotlib.figure")
    if figure_module is not None and isinstance(obj, figure_module.Figure):
        return figure_bundle(obj)
    if _sink.formatter is None:
        # The task imported IPython already (this runs from its display()); no shell is made.
        formatters = importlib.import_module("IPython.core.formatters")
        _sink.formatter = formatters.DisplayFormatter()
    data, metadata = _sink.formatter.format(obj, include=include, exclude=exclude)
    return dict(data), dict(metadata)


def display(*objs: Any, include: Any = None, exclude: Any = None, metadata: dict[str, Any] | None = None,
            transient: dict[str, Any] | None = None, display_id: Any = None, raw: bool = False,
            clear: bool = False, **kwargs: Any) -> Any:
    """IPython's ``display`` in a worker: each object's mime bundle goes to the caller's cell."""
    if display_id is True:
        display_id = os.urandom(16).hex()
    if transient and transient.get("display_id"):
        display_id = transient["display_id"]
    update = bool(kwargs.get("update"))
    for obj in objs:
        if raw:
            data, md = dict(obj), dict(metadata or {})
        else:
            data, md = _format(obj, include, exclude)
            md.update(metadata or {})
        if data:
            publish(data, md, display_id=display_id, update=update)
    if display_id and not update:
        functions = sys.modules.get("IPython.core.display_functions")
        handle = getattr(functions, "DisplayHandle", None)
        return handle(display_id) if handle is not None else None
    return None


def update_display(obj: Any, *, display_id: str, **kwargs: Any) -> None:
    """IPython's ``update_display``: replaces what ``display(..., display_id=...)`` showed."""
    kwargs["update"] = True
    display(obj, display_id=display_id, **kwargs)


def publish_display_data(data: dict[str, Any], metadata: dict[str, Any] | None = None, source: Any = None, *,
                         transient: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """IPython's ``publish_display_data``: a raw bundle."""
    display_id = (transient or {}).get("display_id")
    publish(dict(data), dict(metadata or {}), display_id=display_id, update=bool(kwargs.get("update")))


def clear_output(wait: bool = False) -> None:
    """IPython's ``clear_output``: a task cannot clear the caller's cell; nothing happens."""


def _patch_ipython(module: ModuleType) -> None:
    for name, replacement in (("display", display), ("update_display", update_display),
                              ("publish_display_data", publish_display_data), ("clear_output", clear_output)):
        setattr(module, name, replacement)


def _choose_backend(module: ModuleType) -> None:
    # A kernel sets MPLBACKEND to its inline backend, and workers inherit it; that one needs an
    # IPython shell to show anything. Another backend named there was chosen on purpose: it stays.
    chosen = os.environ.get("MPLBACKEND", "").lower()
    if not chosen or "inline" in chosen or "ipympl" in chosen or chosen == "widget":
        try:
            module.rcParams["backend"] = BACKEND
        except Exception:  # an old matplotlib that refuses it: figures then stay in the worker
            pass


class _AfterImport:
    """Runs a hook on a module right after its first import (before the importer sees it).

    A meta path finder and loader by their methods, not importlib.abc's classes: importing
    importlib.abc costs every worker's start ~10 ms (importlib.resources, tempfile, pathlib)."""

    def __init__(self, hooks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.hooks = hooks

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
                  ) -> importlib.machinery.ModuleSpec | None:
        hook = self.hooks.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        del self.hooks[fullname]
        if not self.hooks and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec.loader = cast("Loader", _HookedLoader(loader, hook))  # a Loader by its methods
        return spec


class _HookedLoader:
    """The module's own loader, then the hook."""

    def __init__(self, loader: Any, hook: Callable[[ModuleType], None]) -> None:
        self.loader = loader
        self.hook = hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        try:
            self.hook(module)
        except Exception:  # never break the task's import
            pass

    def __getattr__(self, name: str) -> Any:  # get_source, is_package...: the real loader's
        return getattr(self.loader, name)
