"""Unpickling a list of outcomes or items when one of them cannot be unpickled here.

A chunk's items, and its outcomes, travel as one pickle stream: fast, but one value that fails to
load (a class this process cannot import, a ``__setstate__`` that raises, a ``__reduce__`` callable
that calls ``sys.exit``) would fail the whole stream, and so every item in it. When the fast load
fails, the stream is loaded again here, op by op (the standard library's pure-Python unpickler, with
our own loop): an op that fails leaves a ``Broken`` placeholder and a mark, the marks follow the data
through the stack and the memo (a value built from a broken one is broken too, however deep, and so
is a container a broken value was put into), and at the end each element of the top-level lists and
dicts says whether it is whole. Only the broken ones fail; the others are exactly what the fast load
would have returned. Slow (a few microseconds per op), and only ever on that failure path.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from collections.abc import Callable, Iterable
from typing import Any

from . import pickling as ser
from . import shm
from ..errors import SerializationError, Unreadable
from ..wire.frames import Frame

# Ops that change an object below them on the stack and leave it there, and ops that only drop.
_MUTATING = {"BUILD", "SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS"}
_DISCARDING = {"POP", "POP_MARK"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_INFO = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}
_MARK = pickletools.markobject


class Broken:
    """Stands in for an object that could not be rebuilt (``error`` says why)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Salvaged:
    """What ``load`` got: ``value`` (with ``Broken`` placeholders where something failed) and, for
    each list and dict in it that was filled while loading, which of its elements are broken."""

    def __init__(self, value: Any, appended: dict[int, list[BaseException | None]],
                 keyed: dict[int, list[tuple[Any, BaseException | None]]]) -> None:
        self.value = value
        self._appended = appended
        self._keyed = keyed

    def elements(self, container: list[Any]) -> list[BaseException | None]:
        """For each element of ``container`` (a list in ``value``): None if whole, else why not."""
        marks = self._appended.get(id(container), [])
        return [marks[k] if k < len(marks) else None for k in range(len(container))]

    def entries(self, container: dict[Any, Any]) -> dict[Any, BaseException]:
        """The keys of ``container`` (a dict in ``value``) whose entries are broken, and why."""
        broken: dict[Any, BaseException] = {}
        for key, mark in self._keyed.get(id(container), []):
            if mark is not None:
                try:
                    broken[key] = mark
                except TypeError:  # an unhashable placeholder key
                    continue
        return broken


class _Salvager(pickle._Unpickler):  # the pure-Python unpickler: its ops can be watched one by one
    memo: dict[int, Any]
    metastack: list[list[Any]]
    stack: list[Any]

    def __init__(self, data: Any, buffers: Iterable[Any] | None) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self.flags: list[BaseException | None] = []  # per stack slot: why it is broken, or None
        self.flagstack: list[list[BaseException | None]] = []
        self.memo_flags: dict[int, BaseException | None] = {}
        self.appended: dict[int, list[BaseException | None]] = {}
        self.keyed: dict[int, list[tuple[Any, BaseException | None]]] = {}
        self.index = -1  # the memo index the last get or put used
        self.ops: dict[int, Callable[[Any], None]] = dict(pickle._Unpickler.dispatch)
        for name in ("load_get", "load_binget", "load_long_binget", "load_put", "load_binput",
                     "load_long_binput", "load_memoize"):
            base = getattr(pickle._Unpickler, name)
            self.ops[_opcode_of(base)] = _recording(base)

    def salvage(self) -> Salvaged:
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        while True:
            key = self.read(1)
            if not key:
                raise EOFError("the pickle stream ended early")
            op = key[0]
            info = _INFO[op]
            frame, depth, size, tail = self.stack, len(self.metastack), len(self.stack), self.stack[-3:]
            try:
                self.ops[op](self)
            except pickle._Stop as stop:  # type: ignore[attr-defined]
                return Salvaged(stop.value, self.appended, self.keyed)
            except BaseException as exc:  # KeyboardInterrupt too: here it is the code's (see unpack_outcomes)
                self.restore(frame, depth, size, tail)
                self.failed(info, exc)
            else:
                self.follow(info, depth, size)

    def restore(self, frame: list[Any], depth: int, size: int, tail: list[Any]) -> None:
        """The stack as it was before an op that failed halfway."""
        if len(self.metastack) < depth:  # it had popped the mark
            self.metastack.append(self.stack)
        del self.metastack[depth:]
        frame[max(0, size - 3):] = tail
        self.stack = frame
        self.append = frame.append

    def pop_flags(self) -> list[BaseException | None]:
        popped, self.flags = self.flags, self.flagstack.pop()
        return popped

    def failed(self, info: pickletools.OpcodeInfo, exc: BaseException) -> None:
        """Do what the op would have done to the stack, with a broken result."""
        before = list(info.stack_before)
        if _MARK in before:
            popped = self.pop_flags()
            self.stack = self.metastack.pop()
            self.append = self.stack.append
            below = before.index(_MARK)
        else:
            popped, below = [], len(before)
        inputs = popped + (self.flags[-below:] if below else [])
        exc = next((flag for flag in inputs if flag is not None), exc)  # the first cause, if it came in broken
        if info.name in _MUTATING:  # the target stays, broken
            drop = below - 1
            if drop:
                del self.stack[-drop:], self.flags[-drop:]
            self.taint_target(exc)
            return
        if below:
            del self.stack[-below:], self.flags[-below:]
        for _ in info.stack_after:
            self.stack.append(Broken(exc))
            self.flags.append(exc)
        if info.name in _PUTS:
            self.memo_flags[self.index] = exc

    def taint_target(self, mark: BaseException | None) -> None:
        """The object an op changed in place is broken if what went into it was."""
        target = self.stack[-1]
        if mark is not None and self.flags[-1] is None:
            self.flags[-1] = mark
            for key, value in self.memo.items():  # a container in the memo: later references to it too
                if value is target:
                    self.memo_flags[key] = mark

    def follow(self, info: pickletools.OpcodeInfo, depth: int, size: int) -> None:
        """Carry the broken marks through an op that worked."""
        name = info.name
        if len(self.metastack) > depth:  # MARK
            self.flagstack.append(self.flags)
            self.flags = []
            return
        if len(self.metastack) < depth:  # it popped the mark: its inputs are that frame's
            popped = self.pop_flags()
            first = next((f for f in popped if f is not None), None)
            if name in _DISCARDING:
                return
            if name in _MUTATING:
                target = self.stack[-1]
                if name == "APPENDS":
                    self.appended.setdefault(id(target), []).extend(popped)
                elif name == "SETITEMS":
                    items = self.keyed.setdefault(id(target), [])
                    keys = _popped_keys(target, len(popped) // 2)
                    for k, key in enumerate(keys):
                        items.append((key, popped[2 * k] or popped[2 * k + 1]))
                self.taint_target(first)
                return
            self.flags.append(first)
            del self.flags[len(self.stack):]
            return
        now = len(self.stack)
        if name in _DISCARDING:
            del self.flags[now:]
            return
        if now == size + 1:  # a push
            if name in _GETS:
                self.flags.append(self.memo_flags.get(self.index))
            elif name == "DUP":
                self.flags.append(self.flags[-1])
            else:
                self.flags.append(None)
            return
        inputs = self.flags[now - 1:size]
        first = next((f for f in inputs if f is not None), None)
        del self.flags[now:]
        if name in _MUTATING:
            target = self.stack[-1]
            if name == "APPEND":
                self.appended.setdefault(id(target), []).append(inputs[-1] if len(inputs) > 1 else None)
            elif name == "SETITEM" and len(inputs) == 3:
                key = _last_key(target)
                self.keyed.setdefault(id(target), []).append((key, inputs[1] or inputs[2]))
            self.taint_target(first)
            return
        if now:
            self.flags[now - 1] = first
        if name in _PUTS:
            self.memo_flags[self.index] = self.flags[-1] if self.flags else None


def _opcode_of(function: Any) -> int:
    for op, fn in pickle._Unpickler.dispatch.items():
        if fn is function:
            return int(op)
    raise LookupError(function)


def _recording(base: Any) -> Any:
    """A get or put op that also notes the memo index it used (read back from the memo's change)."""
    def op(self: _Salvager) -> None:
        before = len(self.memo)
        marker = self.read  # the index is read by the op itself: wrap the reads to see it
        seen: list[bytes] = []

        def read(n: int) -> bytes:
            data: bytes = marker(n)
            seen.append(data)
            return data

        def readline() -> bytes:
            data: bytes = line_reader()
            seen.append(data)
            return data

        line_reader = self.readline
        self.read, self.readline = read, readline
        try:
            base(self)
        finally:
            self.read, self.readline = marker, line_reader
        self.index = _index_from(base.__name__, seen, before)
    return op


def _index_from(name: str, seen: list[bytes], memo_size: int) -> int:
    if name == "load_memoize":
        return memo_size
    raw = seen[0] if seen else b""
    if name in ("load_get", "load_put"):
        return int(raw[:-1])
    return int.from_bytes(raw, "little")


def _popped_keys(target: Any, count: int) -> list[Any]:
    """The last ``count`` keys set in ``target`` (a dict keeps insertion order)."""
    try:
        keys = list(target.keys())
    except Exception:
        return [None] * count
    return keys[-count:] if count else []


def _last_key(target: Any) -> Any:
    keys = _popped_keys(target, 1)
    return keys[0] if keys else None


def salvage(data: Any, buffers: Iterable[Any] | None = None) -> Salvaged:
    """Load the pickle ``data`` (out-of-band ``buffers`` as ``pickle.loads`` takes them), putting a
    ``Broken`` wherever something could not be rebuilt. Raises only if the stream itself is corrupt."""
    return _Salvager(data, buffers).salvage()



def unpack(payload: Any, fds: list[int], specs: list[dict[str, Any]], *, private: bool = False) -> Salvaged:
    """``salvage`` for a frame's value (``shm.loads``'s arguments; takes ownership of ``fds``)."""
    return shm.loads(payload, fds, specs, private=private, load=salvage)  # type: ignore[no-any-return]


def _unpack_or_salvage(frame: Frame, private: bool) -> tuple[Any, Salvaged | None]:
    """``ser.unpack(frame)``, or, if that raises anything at all, what ``salvage`` makes of the frame;
    the first error again if even that fails (a corrupt stream)."""
    spare = [os.dup(fd) for fd in frame.fds]  # to read the frame again, op by op, if need be
    try:
        return ser.unpack(frame, private=private), None
    except BaseException as exc:  # KeyboardInterrupt too: in a worker, or under HeldInterrupts, it is the code's
        try:
            return None, unpack(frame.payload, spare, frame.get("oob") or [], private=private)
        except BaseException:
            raise exc from None
        finally:
            spare = []
    finally:
        for fd in spare:
            os.close(fd)


def unpack_items(frame: Frame) -> tuple[list[Any], dict[int, BaseException]]:
    """A chunk's items (a worker unpickles them) and, for each one that cannot be rebuilt here, why:
    the others are rebuilt as usual and run."""
    items, saved = _unpack_or_salvage(frame, private=False)
    if saved is None:
        return items, {}
    if not isinstance(saved.value, list):
        raise SerializationError(f"a chunk's items are a {type(saved.value).__name__}, not a list")
    return saved.value, {k: why for k, why in enumerate(saved.elements(saved.value)) if why is not None}


def unpack_outcomes(frame: Frame) -> Any:
    """A ``result`` frame's ``(offsets, values, problems)`` (``ser.unpack`` with ``private``). If one
    value or problem cannot be unpickled here, it becomes a ``FAILED`` problem of its own item
    (``SerializationError``), and every other outcome of the chunk is kept."""
    outcomes, saved = _unpack_or_salvage(frame, private=True)
    if saved is None:
        return outcomes
    offsets, values, problems = saved.value
    kept_offsets: list[int] = []
    kept_values: list[Any] = []
    failures: dict[int, tuple[int, Any]] = {}
    broken = saved.entries(problems)
    start = frame.get("start")  # the sidecar's result frames say where the chunk starts
    for offset, problem in problems.items():
        if offset in broken:
            problem = (ser.FAILED, unreadable("exception", broken[offset], None if start is None else start + offset))
        failures[offset] = problem
    for offset, value, why in zip(offsets, values, saved.elements(values)):
        if why is None:
            kept_offsets.append(offset)
            kept_values.append(value)
        else:
            failures[offset] = (ser.FAILED, unreadable("result", why, None if start is None else start + offset))
    return kept_offsets, kept_values, failures


def unreadable(what: str, error: BaseException, index: int | None = None) -> Unreadable:
    """The error of an item whose ``what`` (its input, result or exception) cannot be unpickled here."""
    which = "this item" if index is None else f"item {index}"
    return Unreadable(f"the {what} of {which} could not be unpickled here ({type(error).__name__}: {error}). "
                              "Is everything it holds importable here (same sys.path, same cwd)?", index=index)
