"""Which names a notebook cell reads from outside, and which it binds: the analysis of its code.

No IPython here: ``magics.py`` hands over the cell already transformed to plain Python. ``analyse``
parses the cell and finds the names it reads from outside (in the order they are first used) and
the names it assigns at top level. It follows evaluation order, so ``x = x + 1`` reads ``x`` but
``y = 2; print(y)`` does not read ``y``; class bodies and comprehensions run at once and follow that
order too. Names read inside function and lambda bodies, which run later, count unless the cell
binds them anywhere.

What is then done with the cell (its values captured, the function a worker runs) is
cellrunner.py's.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal


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
