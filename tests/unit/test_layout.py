"""The package layout, checked from the source: a package per process, layers that import only
downward, no import circles, no private names across modules, lazy imports only with a reason, and
the sidecar's and the worker's import budgets (DESIGN.md's invariant 2: the sidecar never unpickles)."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nbparallel"

#: Bottom up; a module may import its own layer's package and the layers below. Within layer 3
#: each package is a process of its own (or the kernel's side of them): they never import each other.
LAYERS: list[set[str]] = [
    {"errors", "crashes", "config"},
    {"wire"},
    {"payload"},
    {"sidecar", "worker", "cluster", "kernel"},
    {"progress"},
    {"results", "api", "futures", "joblib_backend", "joblib_hook", "__main__", "checkpoint"},
    {"cellmagic"},
]
SEPARATE = {"sidecar", "worker", "cluster", "kernel"}

#: What each process may import, beyond the standard library.
BUDGETS = {
    "nbparallel.sidecar.__main__": ({"psutil"}, {"errors", "config", "wire", "sidecar"}),
    # numpy only when a task sends arrays (payload/shm.py imports it then)
    "nbparallel.worker.__main__": ({"psutil", "cloudpickle", "numpy"}, {"errors", "config", "wire", "payload", "worker"}),
}


@dataclass
class Module:
    name: str  # nbparallel.wire.frames
    path: Path
    tree: ast.Module
    lines: list[str]
    #: (imported module, line, at module level, only under TYPE_CHECKING)
    imports: list[tuple[str, int, bool, bool]] = field(default_factory=list)
    #: (module, imported name, line) for ``from module import name``
    names: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def area(self) -> str:
        """The top-level package or module this belongs to: ``wire``, ``api``..."""
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if module.path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def load() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        module = Module(_module_name(path), path, ast.parse(source), source.splitlines())
        modules[module.name] = module
    known = set(modules)
    for module in modules.values():
        _collect(module, module.tree, top=True, typing_only=False, known=known)
    return modules


def _collect(module: Module, node: ast.AST, top: bool, typing_only: bool, known: set[str]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                module.imports.append((alias.name, child.lineno, top, typing_only))
        elif isinstance(child, ast.ImportFrom):
            base = _resolve(module, child)
            for alias in child.names:
                full = f"{base}.{alias.name}"
                target = full if full in known else base
                module.imports.append((target, child.lineno, top, typing_only))
                if target == base:
                    module.names.append((base, alias.name, child.lineno))
        elif isinstance(child, ast.If) and _is_type_checking(child):
            _collect(module, child, top, True, known)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            _collect(module, child, False, typing_only, known)
        else:
            _collect(module, child, top, typing_only, known)


def _layer(area: str) -> int:
    for level, areas in enumerate(LAYERS):
        if area in areas:
            return level
    raise AssertionError(f"nbparallel.{area} belongs to no layer: add it to LAYERS")


def _internal(target: str, modules: dict[str, Module]) -> Module | None:
    while target:
        if target in modules:
            return modules[target]
        target = target.rpartition(".")[0]
    return None


MODULES = load()


def test_every_module_has_a_layer() -> None:
    for module in MODULES.values():
        if module.area not in ("__init__",):
            _layer(module.area)


def test_layers_import_only_downward_and_processes_stay_apart() -> None:
    wrong: list[str] = []
    for module in MODULES.values():
        if module.area == "__init__" or module.name == "nbparallel":
            continue  # the package's lazy front: names are imported only when asked for
        for target, line, _, _ in module.imports:
            imported = _internal(target, MODULES)
            if imported is None or imported.name == "nbparallel" or imported.area == module.area:
                continue
            if _layer(imported.area) > _layer(module.area):
                wrong.append(f"{module.name}:{line} imports {imported.name} from a layer above")
            elif imported.area in SEPARATE and module.area in SEPARATE:
                wrong.append(f"{module.name}:{line} imports {imported.name}: another process's package")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles() -> None:
    graph = {name: {m.name for t, *_ in module.imports if (m := _internal(t, MODULES)) is not None
                    and m.name != name and m.name != "nbparallel"}
             for name, module in MODULES.items() if name != "nbparallel"}
    circles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_no_private_name_crosses_a_module() -> None:
    wrong: list[str] = []
    for module in MODULES.values():
        for base, name, line in module.names:
            if name.startswith("_") and not name.startswith("__") and base.startswith("nbparallel"):
                wrong.append(f"{module.name}:{line} imports {name} from {base}")
        aliases = {a.asname or a.name for node in ast.walk(module.tree) if isinstance(node, ast.ImportFrom)
                   and _resolve(module, node).startswith("nbparallel") for a in node.names}
        for node in ast.walk(module.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                wrong.append(f"{module.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_imports_inside_functions_say_why() -> None:
    """Function-level imports are for optional or heavy dependencies (and the sidecar's budget);
    each carries a comment on its line or the line above saying so."""
    wrong: list[str] = []
    for module in MODULES.values():
        for target, line, top, _ in module.imports:
            if top:
                continue
            here, above = module.lines[line - 1], module.lines[line - 2] if line > 1 else ""
            if "#" not in here and not above.strip().startswith("#"):
                wrong.append(f"{module.name}:{line} imports {target} inside a function without a comment")
    assert not wrong, "\n".join(sorted(set(wrong)))


def _closure(start: str) -> tuple[set[str], set[str]]:
    """Every nbparallel module and every outside top-level package ``start`` can import."""
    seen: set[str] = set()
    outside: set[str] = set()
    pending = [start]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for index in range(2, len(parts)):  # importing a.b.c runs a.b's __init__ first
            pending.append(".".join(parts[:index]))
        for target, _, _, typing_only in MODULES[name].imports:
            if typing_only:
                continue
            internal = _internal(target, MODULES)
            if internal is not None:
                if internal.name != "nbparallel":
                    pending.append(internal.name)
            elif target.split(".")[0] != "__future__":
                outside.add(target.split(".")[0])
    return seen, outside


@pytest.mark.parametrize("entry", sorted(BUDGETS))
def test_process_import_budgets(entry: str) -> None:
    allowed_outside, allowed_areas = BUDGETS[entry]
    inside, outside = _closure(entry)
    extra = sorted(o for o in outside - allowed_outside if o not in sys.stdlib_module_names)
    assert not extra, f"{entry} would import {extra}"
    areas = {MODULES[name].area for name in inside if name != "nbparallel"}
    assert areas <= allowed_areas, f"{entry} would import nbparallel.{sorted(areas - allowed_areas)}"
