"""A notebook cell turned into something a worker can run: name analysis, capture, the runner.

No IPython here: ``magics.py`` hands over the cell already transformed to plain Python and the
notebook's namespace as a mapping. What happens, in order:

1. ``analyse`` parses the cell and finds the names it reads from outside (in the order they are
   first used) and the names it assigns at top level. It follows evaluation order, so ``x = x + 1``
   reads ``x`` but ``y = 2; print(y)`` does not read ``y``; class bodies and comprehensions run
   at once and follow that order too. Names read inside function and lambda bodies, which run
   later, count unless the cell binds them anywhere.
2. ``capture`` takes those names from the notebook namespace (modules by name only) and refuses a
   name that exists nowhere, before anything runs.
3. A ``CellRunner`` holds the cell and the captured values; it is the function given to the engine,
   which pickles it once per call. If that fails, ``unpicklable_capture`` names the variable.

In the worker the runner executes the cell like a notebook cell (module-level semantics) in a fresh
namespace per run: the captured names, then the parameters. Nothing it assigns leaks anywhere.
A cell with top-level ``await`` (``async for``, ``async with``) makes an async runner: each run is
a coroutine on the worker's event loop, many runs in flight at once (see worker/aio.py).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import inspect
import linecache
import sys
import types
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from ..payload import pickling as ser


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


#: Compiler flags for a cell: top-level ``await`` is allowed, as in a notebook.
CELL_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


def awaits(source: str, filename: str = "<cell>") -> bool:
    """Whether the cell uses ``await``, ``async for`` or ``async with`` at top level."""
    return bool(compile(source, filename, "exec", flags=CELL_FLAGS).co_flags & inspect.CO_COROUTINE)


def cell_filename(source: str) -> str:
    """A stable pseudo file name for tracebacks, distinct per cell text."""
    return f"<parallel-cell-{hashlib.sha1(source.encode()).hexdigest()[:8]}>"


def analyse(source: str) -> CellCode:
    """Find the names ``source`` reads from outside and the names it assigns at top level."""
    filename = cell_filename(source)
    try:
        tree = ast.parse(source, filename)
        # The parser takes what only the compiler refuses (``return`` or ``nonlocal`` at top
        # level): better said now than by every worker.
        compile(tree, filename, "exec", flags=CELL_FLAGS)
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        raise CellError(f"the cell has a syntax error{where}: {exc.msg}") from None
    walker = _FirstUse()
    walker.walk(tree.body)
    reads = [name for name, kind in walker.first.items() if kind == "load"]
    # A function body runs when it is called, which is usually after the cell assigned what it
    # reads; so only names the cell never binds must come from the notebook.
    for name in walker.deferred:
        if name not in walker.bound and name not in reads:
            reads.append(name)
    return CellCode(source, filename, reads, list(walker.stores), walker.star_import)


_Kind = Literal["module", "function", "class", "comprehension"]


@dataclass(eq=False)
class _Scope:
    """A namespace of the cell, as the compiler sees it (a lambda is a function)."""

    kind: _Kind
    parent: _Scope | None
    #: bound anywhere in it, which makes a name local to a function or comprehension wherever it is read
    local: set[str] = field(default_factory=set)
    globals: set[str] = field(default_factory=set)
    nonlocals: set[str] = field(default_factory=set)
    #: what a class body has bound so far: it runs in order, reading the globals until it binds a name
    seen: set[str] = field(default_factory=set)


def _parameters(args: ast.arguments) -> list[ast.arg]:
    rest = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *rest]


class _FirstUse(ast.NodeVisitor):
    """Walks the cell in evaluation order, each part in the scope it runs in, and records whether
    each top-level name is first read or first bound.

    Scopes come from the syntax tree, not ``symtable``: its comprehensions differ between versions
    (3.12 inlines them). Two passes, as in the compiler, since a name bound anywhere in a function
    is local to all of it: the first collects what each scope binds, the second resolves reads.
    Function and lambda bodies run later, so their reads of globals go to ``deferred``; the rest,
    generator expressions too (they are mostly consumed at once: ``sum(x * k for x in xs)``), runs
    as the cell runs and follows first use.
    """

    def __init__(self) -> None:
        self.module = _Scope("module", None)
        self.scope = self.module
        self.scopes: dict[ast.AST, _Scope] = {}
        self.resolving = False  # second pass
        self.now = True  # the code walked runs as the cell runs
        self.first: dict[str, Literal["load", "store"]] = {}
        self.stores: dict[str, None] = {}  # an ordered set
        self.deferred: list[str] = []
        self.bound: set[str] = set()  # bound at top level anywhere, also by a function's ``global``
        self.star_import = False

    def walk(self, body: list[ast.stmt]) -> None:
        self._visit_all(body)
        self.resolving = True
        self._visit_all(body)

    @contextmanager
    def _inside(self, node: ast.AST, kind: _Kind, now: bool) -> Iterator[None]:
        scope = self.scopes.setdefault(node, _Scope(kind, self.scope))
        outer = self.scope, self.now
        self.scope, self.now = scope, now
        yield  # an error ends the whole walk, so no need to restore on the way out
        self.scope, self.now = outer

    def _load(self, name: str) -> None:
        if not self.resolving:
            return
        scope = self.scope
        if scope.kind == "class":
            if name in scope.seen:
                return
            if name in scope.local:  # read before the class body binds it: the global one
                scope = self.module
        while scope.parent is not None and name not in scope.globals:
            if scope.kind != "class" and (name in scope.local or name in scope.nonlocals):
                return  # a local, or a closure over an enclosing function's local
            scope = scope.parent  # skipping class bodies: their names are invisible from inside
        if self.now:
            self.first.setdefault(name, "load")
        else:
            self.deferred.append(name)

    def _store(self, name: str, walrus: bool = False) -> None:
        scope = self.scope
        while walrus and scope.kind == "comprehension" and scope.parent is not None:
            scope = scope.parent  # ``:=`` in a comprehension binds in the code around it
        if name in scope.globals:
            scope = self.module
        if not self.resolving:
            scope.local.add(name)
        elif scope is self.module:
            self.bound.add(name)
            if self.now:
                self.first.setdefault(name, "store")
                self.stores.setdefault(name)
        elif scope.kind == "class":
            scope.seen.add(name)

    def _visit_all(self, nodes: Iterable[ast.AST | None]) -> None:
        for node in nodes:
            if node is not None:
                self.visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        # ``del x`` needs x to exist; it also makes x local to a function, like any binding.
        if isinstance(node.ctx, ast.Load) or (self.resolving and isinstance(node.ctx, ast.Del)):
            self._load(node.id)
        else:
            self._store(node.id)

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        (self.scope.globals if isinstance(node, ast.Global) else self.scope.nonlocals).update(node.names)

    visit_Nonlocal = visit_Global

    def visit_Assign(self, node: ast.Assign) -> None:
        self._visit_all([node.value, *node.targets])

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        target = node.target  # ``x += 1`` reads x before the value, then binds it
        read = ast.Name(target.id, ast.Load()) if isinstance(target, ast.Name) else target
        self._visit_all([read, node.value, target])

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._visit_all([node.value])
        # A bare ``x: int`` binds nothing, yet makes x local to a function or class body.
        if node.value is not None or not isinstance(node.target, ast.Name) or not self.resolving:
            self.visit(node.target)
        if self.scope.kind != "function":  # annotations of a function's locals are never evaluated
            self.visit(node.annotation)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._store(node.target.id, walrus=True)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self._visit_all([node.iter, node.target, *node.body, *node.orelse])

    visit_AsyncFor = visit_For

    @contextmanager
    def _generic(self, node: ast.AST) -> Iterator[None]:
        """Python 3.12+ type parameters (``def f[T]``, ``class C[T]``) are a scope around the rest."""
        params: list[ast.AST] = getattr(node, "type_params", None) or []
        if not params:
            yield
            return
        with self._inside(params[0], "function", self.now):
            for param in params:
                self._store(getattr(param, "name"))
                for lazy in (getattr(param, "bound", None), getattr(param, "default_value", None)):
                    if lazy is not None:
                        with self._inside(lazy, "function", now=False):
                            self.visit(lazy)
            yield

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._visit_all([*node.decorator_list, *node.args.defaults, *node.args.kw_defaults])
        with self._generic(node):
            self._visit_all([*(a.annotation for a in _parameters(node.args)), node.returns])
            with self._inside(node, "function", now=False):
                for arg in _parameters(node.args):
                    self._store(arg.arg)
                self._visit_all(node.body)
        self._store(node.name)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_all([*node.args.defaults, *node.args.kw_defaults])
        with self._inside(node, "function", now=False):
            for arg in _parameters(node.args):
                self._store(arg.arg)
            self.visit(node.body)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._visit_all(node.decorator_list)
        with self._generic(node):
            self._visit_all([*node.bases, *(k.value for k in node.keywords)])
            with self._inside(node, "class", self.now):
                self._visit_all(node.body)
        self._store(node.name)

    def visit_TypeAlias(self, node: Any) -> None:  # ``type A = ...``, Python 3.12+; its value is lazy
        self._store(node.name.id)
        with self._generic(node), self._inside(node.value, "function", now=False):
            self.visit(node.value)

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        first, *rest = node.generators
        self.visit(first.iter)  # the only part evaluated in the enclosing scope
        with self._inside(node, "comprehension", self.now):
            self._visit_all([first.target, *first.ifs])
            for generator in rest:
                self._visit_all([generator.iter, generator.target, *generator.ifs])
            if isinstance(node, ast.DictComp):
                self._visit_all([node.key, node.value])
            else:
                self.visit(node.elt)

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name == "*":
                self.star_import = True
            else:
                self._store(alias.asname or alias.name.split(".")[0])  # ``import a.b`` binds a

    visit_ImportFrom = visit_Import

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._visit_all([node.type])
        if node.name:
            self._store(node.name)
        self._visit_all(node.body)

    def _capture(self, node: ast.MatchAs | ast.MatchStar | ast.MatchMapping) -> None:
        self.generic_visit(node)  # a sub-pattern, or a mapping's keys and patterns
        name = node.rest if isinstance(node, ast.MatchMapping) else node.name
        if name:
            self._store(name)

    visit_MatchAs = visit_MatchStar = visit_MatchMapping = _capture


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
