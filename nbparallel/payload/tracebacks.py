"""Remote tracebacks that read like local ones.

A worker cannot name the source of notebook code: cloudpickle 3.1.3 and later rewrite the file name
of every function pickled by value to ``"<dynamic-code>"``, and a worker (or a Dask worker on
another host) has no copy of the notebook's cells anyway. So the worker sends its frames as plain
data (``capture``) and the kernel, whose linecache holds every cell, writes them out (``render``):
a frame of notebook code as IPython shows a local one (``Cell In[3], line 4, in score``), a frame
from a file with its path, both followed by their source line. nbparallel's own frames are left out.

Which file a ``"<dynamic-code>"`` frame came from is found from the function the call sent: its
code objects are known by (function name, first line), which cloudpickle keeps.
"""

from __future__ import annotations

import linecache
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

#: What cloudpickle writes in place of the file name of code it pickles by value.
DYNAMIC_CODE = "<dynamic-code>"

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # nbparallel/

_LINKS = {
    "cause": "The above exception was the direct cause of the following exception:",
    "context": "During handling of the above exception, another exception occurred:",
}


class RemoteFrame(NamedTuple):
    """One frame as the worker saw it; plain data, so it unpickles anywhere."""

    filename: str
    lineno: int
    name: str
    #: the function's qualified name and first line: which code it was, for ``SourceIndex``
    qualname: str
    firstlineno: int
    #: the source line as the worker read it ("" if it could not): the fallback for the kernel
    line: str


class RemoteBlock(NamedTuple):
    """One exception of a chain: its frames, its ``format_exception_only`` lines, and how the
    next block follows from it ("cause", "context" or "" for the last)."""

    frames: tuple[RemoteFrame, ...]
    exception: tuple[str, ...]
    link: str


RemoteTrace = tuple[RemoteBlock, ...]


def capture(exc: BaseException) -> RemoteTrace:
    """The traceback of ``exc`` (with its chained causes, oldest first) as plain data."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "cause"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "context"
        else:
            current = None
    blocks: list[RemoteBlock] = []
    # Printed oldest first; each block says how the next one follows from it.
    for position, (error, _) in enumerate(reversed(chain)):
        follows = chain[len(chain) - 1 - position][1]
        blocks.append(RemoteBlock(tuple(_frames(error.__traceback__)), _exception_only(error), follows))
    return tuple(blocks)


def _frames(tb: types.TracebackType | None) -> Iterator[RemoteFrame]:
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        # Our own plumbing, and frames that ask to be hidden (IPython's and pytest's convention).
        hidden = code.co_filename.startswith(_PACKAGE_DIR) or frame.f_locals.get("__tracebackhide__")
        if not hidden:
            qualname = getattr(code, "co_qualname", code.co_name)
            line = linecache.getline(code.co_filename, tb.tb_lineno).strip()
            yield RemoteFrame(code.co_filename, tb.tb_lineno, code.co_name, qualname, code.co_firstlineno, line)
        tb = tb.tb_next


def _exception_only(error: BaseException) -> tuple[str, ...]:
    import traceback  # only when something failed: the worker's start stays lean

    try:
        text = "".join(traceback.format_exception_only(type(error), error))
    except Exception:  # a broken __str__ must not hide the error itself
        text = f"{type(error).__name__}: <exception str() failed>\n"
    return tuple(text.splitlines())


# --- the kernel's side -------------------------------------------------------------------------


class _CellAlias(NamedTuple):
    label: str
    line_offset: int


_aliases: dict[str, _CellAlias] = {}


def register_cell(filename: str, source: str, label: str, line_offset: int) -> None:
    """Show frames of ``filename`` (code a worker compiled from ``source``) as lines of a notebook
    cell: ``label`` (e.g. "Cell In[7]"), line numbers shifted by ``line_offset``."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    _aliases[filename] = _CellAlias(label, line_offset)


def calling_cell() -> str | None:
    """The label ("Cell In[7]") of the notebook cell whose code is running this call, if any.

    Read off the call stack, so it is exact whatever the kernel's execution counter says mid-cell.
    """
    frame = sys._getframe(1)
    while frame is not None:
        named = _cell_label(frame.f_code.co_filename)
        if named is not None:
            return named.label
        frame = frame.f_back  # type: ignore[assignment]
    return None


class SourceIndex:
    """Where the code a call sent was defined, found lazily from the call's function."""

    def __init__(self, fn: Any) -> None:
        self._fn: Any = fn
        self._files: dict[tuple[str, int], str] | None = None

    def filename(self, name: str, firstlineno: int) -> str | None:
        """The file of the function ``name`` starting at ``firstlineno``, if the call sent it."""
        if self._files is None:
            self._files = _code_files(self._fn)
            self._fn = None  # the index is all we need now
        return self._files.get((name, firstlineno))

    def render(self, trace: RemoteTrace | str) -> str:
        """``trace`` written out as the kernel would have shown it (text passes through)."""
        if isinstance(trace, str):
            return trace
        return render(trace, self.filename)


def render(trace: RemoteTrace, resolve: Callable[[str, int], str | None] = lambda n, f: None) -> str:
    """The text of ``trace``; ``resolve(name, firstlineno)`` names the file of dynamic code."""
    out: list[str] = []
    for block in trace:
        if block.frames:
            out.append("Traceback (most recent call last):")
            for frame in block.frames:
                out.extend(_frame_lines(frame, resolve))
        out.extend(block.exception)
        if block.link:
            out.extend(["", _LINKS.get(block.link, ""), ""])
    return "\n".join(out) + "\n"


def _frame_lines(frame: RemoteFrame, resolve: Callable[[str, int], str | None]) -> list[str]:
    filename = frame.filename
    if filename == DYNAMIC_CODE or not os.path.isabs(filename) and filename not in linecache.cache:
        filename = resolve(frame.qualname, frame.firstlineno) or _cell_defining(frame) or filename
    lineno = frame.lineno
    label = _cell_label(filename)
    if label is not None:
        head = f"  {label.label}, line {lineno + label.line_offset}, in {frame.name}"
    else:
        head = f'  File "{filename}", line {lineno}, in {frame.name}'
    line = linecache.getline(filename, lineno).strip() or frame.line
    return [head, f"    {line}"] if line else [head]


def _cell_label(filename: str) -> _CellAlias | None:
    alias = _aliases.get(filename)
    if alias is not None:
        return alias
    shell = _ipython()
    if shell is None:
        return None
    try:
        named = shell.compile.format_code_name(filename)
    except Exception:  # an older IPython without it, or another compiler
        return None
    if not named:
        return None
    return _CellAlias(" ".join(named), 0)


def _ipython() -> Any:
    module = sys.modules.get("IPython")  # never import it: a script has no shell
    if module is None:
        return None
    try:
        return module.get_ipython()
    except Exception:
        return None


def _cell_defining(frame: RemoteFrame) -> str | None:
    """The newest notebook cell whose line ``firstlineno`` defines ``name``: for code the call did
    not send itself (a function inside an argument or an item)."""
    shell = _ipython()
    if shell is None:
        return None
    short = frame.name
    found: tuple[int, str] | None = None
    for filename, entry in list(linecache.cache.items()):
        named = _cell_label(filename)
        if named is None or len(entry) < 3:
            continue
        lines = entry[2]
        if frame.firstlineno - 1 < len(lines):
            text = lines[frame.firstlineno - 1]
            if f"def {short}" in text or (short == "<lambda>" and "lambda" in text):
                number = _execution_number(named.label)
                if found is None or number > found[0]:
                    found = (number, filename)
    return found[1] if found else None


def _execution_number(label: str) -> int:
    digits = "".join(c for c in label if c.isdigit())
    return int(digits) if digits else -1


def _code_files(root: Any) -> dict[tuple[str, int], str]:
    """(name, first line) -> file, for every code object reachable from ``root``: the function,
    what it closes over, the globals it names, wrapped functions and the methods of classes."""
    files: dict[tuple[str, int], str] = {}
    seen: set[int] = set()
    pending: list[tuple[Any, int]] = [(root, 0)]
    while pending and len(seen) < 5000:
        obj, depth = pending.pop()
        if id(obj) in seen or depth > 8:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.CodeType):
            files.setdefault((getattr(obj, "co_qualname", obj.co_name), obj.co_firstlineno), obj.co_filename)
            pending.extend((c, depth + 1) for c in obj.co_consts if isinstance(c, types.CodeType))
        elif isinstance(obj, types.FunctionType):
            pending.append((obj.__code__, depth))
            pending.extend((cell.cell_contents, depth + 1) for cell in obj.__closure__ or ()
                           if _cell_filled(cell))
            pending.extend((d, depth + 1) for d in obj.__defaults__ or ())
            if not _installed(obj.__module__):  # an installed package's globals are not ours to walk
                code_globals = obj.__globals__
                pending.extend((code_globals[n], depth + 1) for n in _names(obj.__code__) if n in code_globals)
        elif isinstance(obj, types.MethodType):
            pending.append((obj.__func__, depth))
        elif isinstance(obj, type):
            if obj.__module__ not in ("builtins",) and not _installed(obj.__module__):
                pending.extend((v, depth + 1) for v in vars(obj).values())
        elif isinstance(obj, (staticmethod, classmethod)):
            pending.append((obj.__func__, depth))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            pending.extend((v, depth + 1) for v in list(obj)[:100])
        elif isinstance(obj, Mapping):
            pending.extend((v, depth + 1) for v in list(obj.values())[:100])
        elif callable(obj) and not isinstance(obj, (types.BuiltinFunctionType, types.ModuleType)):
            # partials, wrappers like our RetryOn, callable instances: what they hold
            pending.extend((v, depth + 1) for v in _attributes(obj))
    return files


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell: the variable is not assigned yet
        return False
    return True


def _names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def _installed(module: str | None) -> bool:
    """Code of imported packages travels by reference and keeps its real file name."""
    if module is None:
        return False
    loaded = sys.modules.get(module)
    return loaded is not None and module != "__main__" and getattr(loaded, "__file__", None) is not None


def _attributes(obj: Any) -> list[Any]:
    found: list[Any] = []
    for attribute in ("func", "fn", "function", "__wrapped__", "__func__"):
        try:
            value = getattr(obj, attribute, None)
        except Exception:
            continue
        if value is not None:
            found.append(value)
    try:
        found.extend(list(vars(obj).values())[:100])
    except TypeError:  # no __dict__
        pass
    return found
