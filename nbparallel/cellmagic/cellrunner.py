"""A notebook cell turned into something a worker can run: its values captured, the runner.

``cellcode.analyse`` has found the names the cell reads; then:

1. ``capture`` takes those names from the notebook namespace (modules by name only) and refuses a
   name that exists nowhere, before anything runs.
2. A ``CellRunner`` holds the cell and the captured values; it is the function given to the engine,
   which pickles it once per call. If that fails, ``unpicklable_capture`` names the variable.

In the worker the runner executes the cell like a notebook cell (module-level semantics) in a fresh
namespace per run: the captured names, then the parameters. Nothing it assigns leaks anywhere.
A cell with top-level ``await`` (``async for``, ``async with``) makes an async runner: each run is
a coroutine on the worker's event loop, many runs in flight at once (see worker/aio.py).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import linecache
import sys
import types
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..payload import pickling as ser
from .cellcode import CELL_FLAGS, CellCode, CellError, awaits


@dataclass(frozen=True)
class ModuleRef:
    """A module travels by name and is imported in the worker."""

    name: str


def capture(code: CellCode, namespace: Mapping[str, Any], provided: Collection[str] = ()) -> dict[str, Any]:
    """The values of the names ``code`` reads, from ``namespace``; ``provided`` are set per run.

    Python's builtins are not shipped (the worker has them) unless the notebook shadows them; those
    the host added (IPython's ``display``) are. A name found nowhere raises ``CellError``, naming
    every such name.
    """
    if "get_ipython" in code.reads and "get_ipython" not in provided:
        raise CellError(
            "the cell uses IPython magics, !shell commands or get_ipython(); a worker is plain "
            "Python without IPython. Move those lines to a cell of their own."
        )
    captured: dict[str, Any] = {}
    missing: list[str] = []
    for name in code.reads:
        if name in provided:
            continue
        if name in namespace:
            captured[name] = _travelling(namespace[name])
        elif not hasattr(builtins, name):
            missing.append(name)
        elif getattr(getattr(builtins, name), "__module__", "builtins") not in _STANDARD_BUILTINS:
            captured[name] = getattr(builtins, name)  # added by the host, e.g. IPython's display()
    if missing and not code.star_import:
        listed = ", ".join(repr(n) for n in missing)
        raise CellError(f"the cell reads {listed}, which {'is' if len(missing) == 1 else 'are'} not defined "
                        "in the notebook (nor assigned earlier in the cell)")
    return captured


_STANDARD_BUILTINS = ("builtins", "_sitebuiltins")  # what every worker's builtins come from


def _travelling(value: Any) -> Any:
    if isinstance(value, types.ModuleType) and sys.modules.get(value.__name__) is value:
        return ModuleRef(value.__name__)
    return value


@dataclass
class CellRunner:
    """Runs the cell in a worker. ``mode="value"``: called with a tuple of parameter values,
    returns the value of the cell's last expression. ``mode="names"``: called with no argument,
    returns ``(pickled {name: value} of what the cell assigned, {name: why it was left out})``."""

    source: str
    filename: str
    params: tuple[str, ...]
    captured: dict[str, Any]
    mode: Literal["value", "names"] = "value"
    assigns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._compiled: tuple[types.CodeType, types.CodeType | None] | None = None
        self.__qualname__ = "%%parallel"  # how progress displays name the call
        # Top-level ``await``: each call returns a coroutine, and the engine runs the cell's runs on
        # the workers' event loops (payload/aiocall.py's is_async reads this).
        self.nbparallel_async = awaits(self.source, self.filename)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # code objects are rebuilt where they run
        return state

    def compiled(self) -> tuple[types.CodeType, types.CodeType | None]:
        if self._compiled is None:
            tree = ast.parse(self.source, self.filename)
            last: types.CodeType | None = None
            final = tree.body[-1] if tree.body else None
            if isinstance(final, ast.Expr):  # its value is the run's result, as in a notebook cell
                tree.body.pop()
                last = compile(ast.Expression(final.value), self.filename, "eval", flags=CELL_FLAGS)
            body = compile(tree, self.filename, "exec", flags=CELL_FLAGS)
            # Tracebacks from the worker then show the cell's lines, not just line numbers.
            lines = self.source.splitlines(keepends=True)
            linecache.cache[self.filename] = (len(self.source), None, lines, self.filename)
            self._compiled = (body, last)
        return self._compiled

    def namespace(self, item: tuple[Any, ...]) -> dict[str, Any]:
        namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        for name, value in self.captured.items():
            namespace[name] = importlib.import_module(value.name) if isinstance(value, ModuleRef) else value
        namespace.update(zip(self.params, item))
        return namespace

    def __call__(self, item: tuple[Any, ...] = ()) -> Any:
        __tracebackhide__ = True  # the user's cell is the story, not this runner
        if self.nbparallel_async:
            return self.run_async(item)
        body, last = self.compiled()
        namespace = self.namespace(item)
        exec(body, namespace)
        value = eval(last, namespace) if last is not None else None
        if self.mode == "value":
            return value
        return pack_names({name: namespace[name] for name in self.assigns if name in namespace})

    async def run_async(self, item: tuple[Any, ...] = ()) -> Any:
        """One run of a cell with top-level ``await``, as IPython runs one: code compiled with the
        flag for it is a coroutine when evaluated."""
        __tracebackhide__ = True
        body, last = self.compiled()
        namespace = self.namespace(item)
        ran = eval(body, namespace)
        if body.co_flags & inspect.CO_COROUTINE:
            await ran
        value: Any = eval(last, namespace) if last is not None else None
        if last is not None and last.co_flags & inspect.CO_COROUTINE:
            value = await value
        if self.mode == "value":
            return value
        return pack_names({name: namespace[name] for name in self.assigns if name in namespace})


def pack_names(names: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """Pickle what a background cell assigned; a value that cannot travel is left out, not fatal."""
    try:
        return ser.dumps(names), {}
    except Exception:
        pass
    kept: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, value in names.items():
        error = ser.pickling_error(value)
        if error is not None:
            skipped[name] = f"{type(value).__name__} cannot be pickled ({ser.why(error)})"
        else:
            kept[name] = value
    return ser.dumps(kept), skipped


def unpicklable_capture(runner: CellRunner) -> str | None:
    """Which captured variable keeps ``runner`` from being pickled, as a message (None: none does).

    Only called after pickling failed, so the usual path pickles the captured values once.
    """
    for name, value in runner.captured.items():
        error = ser.pickling_error(value)
        if error is not None:
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            return (f"the notebook variable {name!r} ({kind}) cannot be sent to the workers: "
                    f"{ser.why(error)}. Create it inside the cell instead.")
    return None
