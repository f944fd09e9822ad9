"""Stable identities for a durable sweep: the function of a call, and each item's value.

A journal (journal.py) must recognise the same call after a kernel restart, a cell run again or in
another process, and must notice when the function changed. Neither ``id()`` nor ``hash()`` will do
(``hash`` of a ``str`` changes with every interpreter), and a pickle of a function names the cell's
file and line numbers, which change when a cell is run again. So the function is hashed from what
decides what it computes:

- its code: bytecode, constants, names, argument layout (not the file name or line numbers), nested
  code objects the same way;
- its defaults, its closure's values and the globals its code reads, each by value; functions and
  classes defined in the notebook or in the user's own files by value, recursively; those of
  installed packages (the standard library, site-packages) and modules by name, as pickle does;
- sets sorted by the digests of their elements, so string hashing (random per process) cannot
  reorder them; no pickle memo, so sharing between objects cannot change the bytes.

It walks with the pure-Python pickler, whose ``reducer_override`` sees every object (the C pickler
skips built-in types such as sets). Should the walk fail on some exotic object, the digest falls back
to cloudpickle's output (deterministic since cloudpickle 3.1.3), and ``FunctionId.exact`` says so.

Items are compared cheaply (journal.py pickles a batch of them at once and compares bytes); the
per-item digest here is for big items and for the slow path when a batch differs.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import sys
import sysconfig
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

DIGEST_SIZE = 16  # bytes: 128 bits, no accidental collision among any number of items we will see

# Attributes of a class that say nothing about what it computes (or are rebuilt by Python).
_CLASS_NOISE = frozenset({"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "_abc_impl",
                          "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__slotnames__"})
_DESCRIPTORS = (types.MemberDescriptorType, types.GetSetDescriptorType)


@dataclass(frozen=True)
class FunctionId:
    """Who made a journal's values: ``digest`` (hex) identifies the function; ``name`` and
    ``source`` are for people; ``exact`` is False when the digest came from the cloudpickle fallback."""

    digest: str
    name: str
    source: str | None
    exact: bool = True


def _canonical(*parts: Any) -> None:
    """The stand-in that every canonical form is reduced to (never called: nothing is unpickled)."""


def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    return tuple(root + os.sep for root in roots)


_INSTALLED = _installed_roots()


def _by_name(obj: Any) -> bool:
    """True for a function or class that can stand for itself by name: it is what its module and
    qualified name say, and that module is installed (the standard library, site-packages) or is
    nbparallel. Code in the user's own files is walked by value, as an edit there changes results."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module_name or not qualname or module_name == "__main__" or "<locals>" in qualname:
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    if found is not obj:
        return False
    where = getattr(module, "__file__", None)
    return (where is None or module_name.split(".")[0] == "nbparallel"
            or os.path.realpath(where).startswith(_INSTALLED))


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _Hasher:
    """A file object that hashes what is written to it."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()  # faster than blake2b where the CPU has SHA instructions

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)


# The pure-Python pickler: its reducer_override sees sets too. (Typed loosely: typeshed omits it.)
_PurePickler: Any = getattr(pickle, "_Pickler")


class _CanonicalPickler(_PurePickler):  # type: ignore[misc]
    def __init__(self, sink: _Hasher) -> None:
        super().__init__(sink, protocol=5, buffer_callback=self._buffer)
        self.fast = True  # no memo: the same bytes whatever objects happen to be shared
        self.sink = sink
        self.active: set[int] = set()  # functions and classes being written (recursion)
        self.by_value: set[int] = set()  # the mapped function itself: always by value

    def _buffer(self, buffer: pickle.PickleBuffer) -> bool:
        with buffer.raw() as raw:
            self.sink.write(b"B%d:" % raw.nbytes)
            self.sink.hash.update(raw)
        return False  # out of band: hashed above, never copied into the stream

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is set or kind is frozenset:
            return _canonical, (kind.__name__, tuple(sorted(digest(element) for element in obj)))
        if kind is types.FunctionType:
            return self._function(obj)
        if kind is types.CodeType:
            return self._code(obj)
        if kind is types.ModuleType:
            return _canonical, ("module", obj.__name__)
        if isinstance(obj, type):
            return self._class(obj)
        if kind is staticmethod or kind is classmethod:
            return _canonical, (kind.__name__, obj.__func__)
        if kind is property:
            return _canonical, ("property", obj.fget, obj.fset, obj.fdel)
        return NotImplemented

    def _function(self, fn: types.FunctionType) -> Any:
        if _by_name(fn) and id(fn) not in self.by_value:
            return NotImplemented  # by name, as pickle writes it
        if id(fn) in self.active:
            return _canonical, ("recursion", fn.__qualname__)
        self.active.add(id(fn))
        code = fn.__code__
        closure = tuple(_cell_value(cell) for cell in fn.__closure__ or ())
        read = sorted(name for name in _code_names(code) if name in fn.__globals__)
        globals_read = tuple((name, fn.__globals__[name]) for name in read)
        return _canonical, ("function", fn.__name__, code, fn.__defaults__, fn.__kwdefaults__, closure,
                            globals_read, sorted(fn.__dict__.items()))

    def _code(self, code: types.CodeType) -> Any:
        # Not co_filename, co_firstlineno or the line table: they change when a cell is run again.
        return _canonical, ("code", code.co_name, code.co_argcount, code.co_posonlyargcount,
                            code.co_kwonlyargcount, code.co_flags, code.co_code, code.co_consts, code.co_names,
                            code.co_varnames, code.co_freevars, code.co_cellvars,
                            getattr(code, "co_exceptiontable", b""))

    def _class(self, cls: type) -> Any:
        if _by_name(cls) or cls.__module__ == "builtins":
            return NotImplemented
        if id(cls) in self.active:
            return _canonical, ("recursion", cls.__qualname__)
        self.active.add(id(cls))
        members = sorted((k, v) for k, v in vars(cls).items()
                         if k not in _CLASS_NOISE and not isinstance(v, _DESCRIPTORS))
        return _canonical, ("class", cls.__name__, cls.__bases__, members)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        # The call that expands a function or class ends its recursion guard: a sibling reference
        # after it is no recursion (and may be written out in full again).
        expanding = (type(obj) is types.FunctionType or isinstance(obj, type)) and id(obj) not in self.active
        super().save(obj, save_persistent_id)
        if expanding:
            self.active.discard(id(obj))


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: the closure variable is not assigned yet
        return _canonical


def digest(value: Any, *, by_value: Any = None) -> bytes:
    """A stable digest of ``value``: equal for equal values in any process (see the module's
    docstring). ``by_value``: a function walked by value even if it could be named.

    Raises what pickling raises for values that cannot be walked (callers fall back)."""
    sink = _Hasher()
    pickler = _CanonicalPickler(sink)
    if by_value is not None:
        pickler.by_value.add(id(by_value))
    pickler.dump(value)
    return sink.hash.digest()[:DIGEST_SIZE]


def item_digest(value: Any) -> bytes:
    """``digest``, or for a value it cannot walk, a digest of its cloudpickle bytes."""
    try:
        return digest(value)
    except Exception:  # e.g. a recursive structure: the fast walk has no memo to stop it
        return hashlib.sha256(cloudpickle.dumps(value, protocol=5)).digest()[:DIGEST_SIZE]


def function_id(fn: Callable[..., Any], form: str = "") -> FunctionId:
    """The identity of ``fn`` (see the module's docstring); ``form`` tells calls of the same
    function apart that pass their items differently (``"map:one"``, ``"map:star"``)."""
    name = _name(fn)
    try:
        value, exact = digest(fn, by_value=fn), True
    except Exception:  # something the canonical walk does not know: cloudpickle's bytes
        value, exact = hashlib.sha256(cloudpickle.dumps(fn, protocol=5)).digest(), False
    combined = hashlib.sha256(form.encode() + b"\0" + value).hexdigest()[: 2 * DIGEST_SIZE]
    return FunctionId(combined, name, None, exact)  # the source is read only when a journal needs it


def _name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
    return str(name).replace(".<locals>.", ".")


def source(fn: Callable[..., Any]) -> str | None:
    """The function's source text when Python can find it (a notebook cell's, a file's); else None."""
    target = getattr(fn, "__wrapped__", fn)
    text = getattr(target, "source", None)  # a %%parallel cell keeps its text
    if isinstance(text, str):
        return text
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return None
