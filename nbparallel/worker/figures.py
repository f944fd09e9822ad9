"""A matplotlib backend for workers: ``module://nbparallel.worker.figures``.

worker/display.py makes it the default when a task imports matplotlib. Figures draw with Agg, as
headless matplotlib does; ``plt.show()`` sends each open figure to the caller's cell as a PNG and
closes it. Each canvas remembers the item that made it, so a figure left open and sent when its
chunk ends is still tagged with the right item. Only matplotlib loads this module.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import display

# Looked up rather than imported: matplotlib is the task's dependency, not ours (and not mypy's).
_agg: Any = importlib.import_module("matplotlib.backends.backend_agg")
_bases: Any = importlib.import_module("matplotlib.backend_bases")
_figure: Any = importlib.import_module("matplotlib.figure")


class FigureCanvasNbparallel(_agg.FigureCanvasAgg):  # type: ignore[misc]
    """Agg's canvas, which remembers the (job, item) that made its figure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nbparallel_made_by = display.where()


FigureCanvas = FigureCanvasNbparallel
FigureManager = _bases.FigureManagerBase


def new_figure_manager(num: Any, *args: Any, FigureClass: Any = None, **kwargs: Any) -> Any:
    """A new figure (``plt.figure()``, ``plt.subplots()``) and its manager."""
    figure = (FigureClass or _figure.Figure)(*args, **kwargs)
    return new_figure_manager_given_figure(num, figure)


def new_figure_manager_given_figure(num: Any, figure: Any) -> Any:
    """The manager of an existing figure."""
    if hasattr(FigureCanvas, "new_manager"):  # matplotlib 3.6 and later
        return FigureCanvas.new_manager(figure, num)
    return FigureManager(FigureCanvas(figure), num)


def draw_if_interactive() -> None:
    """Nothing to redraw: figures are sent when shown, or when the chunk ends."""


def show(*args: Any, **kwargs: Any) -> None:
    """``plt.show()``: send every open figure to the caller's cell, then close them."""
    display.show_figures()
