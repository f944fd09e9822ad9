"""A notebook cell turned into something a worker can run: name analysis, capture, the runner.

No IPython here: ``magics.py`` hands over the cell already transformed to plain Python and the
notebook's namespace as a mapping. What happens, in order:

1. ``analyse`` parses the cell and finds the names it reads from outside (in the order they are
   first used) and the names it assigns at top level. It follows evaluation order, so ``x = x + 1``
   reads ``x`` but ``y = 2; print(y)`` does not read ``y``. Names read inside functions, lambdas,
   classes and comprehensions count unless the cell itself assigns them.
2. ``capture`` takes those names from the notebook namespace (modules by name only) and refuses a
   name that exists nowhere, before anything runs.
3. A ``CellRunner`` holds the cell and the captured values; it is the function given to the engine,
   which pickles it once per call. If that fails, ``unpicklable_capture`` names the variable.

In the worker the runner executes the cell like a notebook cell (module-level semantics) in a fresh
namespace per run: the captured names, then the parameters. Nothing it assigns leaks anywhere.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import linecache
import symtable
import sys
import types
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import serialization as ser


class CellError(Exception):
    """The cell cannot be run in a worker; the message says which name or line, and why."""


@dataclass
class CellCode:
    """What ``analyse`` found in a cell."""

    source: str
    filename: str
    #: names read from outside the cell, in the order they are first used
    reads: list[str]
    #: names the cell binds at top level, in order (what ``--bg`` copies back)
    assigns: list[str]
    #: the cell does ``from module import *``: we cannot know every name it binds
    star_import: bool = False


def cell_filename(source: str) -> str:
    """A stable pseudo file name for tracebacks, distinct per cell text."""
    return f"<parallel-cell-{hashlib.sha1(source.encode()).hexdigest()[:8]}>"


def analyse(source: str) -> CellCode:
    """Find the names ``source`` reads from outside and the names it assigns at top level."""
    filename = cell_filename(source)
    try:
        tree = ast.parse(source, filename)
        table = symtable.symtable(source, filename, "exec")
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        raise CellError(f"the cell has a syntax error{where}: {exc.msg}") from None
    walker = _FirstUse()
    for statement in tree.body:
        walker.visit(statement)
    reads = [name for name, kind in walker.first.items() if kind == "load"]
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    deferred: list[str] = []
    for child in table.get_children():
        _global_reads(child, deferred)
    # A function body runs when it is called, which is usually after the cell assigned what it
    # reads; so only names the cell never binds must come from the notebook.
    for name in deferred:
        if name not in bound and name not in reads:
            reads.append(name)
    assigns = [name for name, _ in walker.stores.items()]
    return CellCode(source, filename, reads, assigns, walker.star_import)


def _global_reads(scope: symtable.SymbolTable, found: list[str]) -> None:
    for symbol in scope.get_symbols():
        name = symbol.get_name()
        if symbol.is_global() and symbol.is_referenced() and name not in found:
            found.append(name)
    for child in scope.get_children():
        _global_reads(child, found)


class _FirstUse(ast.NodeVisitor):
    """Walks top-level code in evaluation order and records whether each name is first read or
    first bound. Nested scopes are skipped (``symtable`` covers them); only the parts of a
    ``def``/``lambda``/``class``/comprehension that run at once are visited."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.stores: dict[str, None] = {}  # an ordered set
        self.star_import = False

    def _load(self, name: str) -> None:
        self.first.setdefault(name, "load")

    def _store(self, name: str) -> None:
        self.first.setdefault(name, "store")
        self.stores.setdefault(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Store):
            self._store(node.id)
        else:  # Load, and Del (``del x`` needs x to exist)
            self._load(node.id)

    def _visit_all(self, nodes: Iterable[ast.AST | None]) -> None:
        for node in nodes:
            if node is not None:
                self.visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        self._visit_all(node.targets)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
        self.visit(node.value)
        self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._visit_all([node.value, node.annotation])
        if node.value is not None:
            self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self._visit_all([node.iter, node.target, *node.body, *node.orelse])

    visit_AsyncFor = visit_For

    def _arguments(self, args: ast.arguments) -> None:
        self._visit_all([*args.defaults, *args.kw_defaults])

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._visit_all(node.decorator_list)
        self._arguments(node.args)
        every = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs, node.args.vararg, node.args.kwarg]
        self._visit_all([a.annotation for a in every if a is not None])
        self._visit_all([node.returns])
        self._store(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._arguments(node.args)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_all([*node.decorator_list, *node.bases, *(k.value for k in node.keywords)])
        self._store(node.name)

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        self.visit(node.generators[0].iter)  # the only part evaluated in the enclosing scope

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._store(alias.asname or alias.name.split(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.star_import = True
            else:
                self._store(alias.asname or alias.name)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._visit_all([node.type])
        if node.name:
            self._store(node.name)
        self._visit_all(node.body)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self._visit_all([node.pattern])
        if node.name:
            self._store(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._store(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self._visit_all([*node.keys, *node.patterns])
        if node.rest:
            self._store(node.rest)


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
                last = compile(ast.Expression(final.value), self.filename, "eval")
            body = compile(tree, self.filename, "exec")
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
        body, last = self.compiled()
        namespace = self.namespace(item)
        exec(body, namespace)
        value = eval(last, namespace) if last is not None else None
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
