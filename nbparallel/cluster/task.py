"""What runs on a Dask worker: one chunk of a call, its outcomes packed as worker.py packs them.

The Dask bridge (bridge.py) submits ``run_chunk`` once per chunk. Its arguments are opaque
bytes made in the kernel (the pickled function, the pickled items, their large buffers); they are
unpickled here, on the Dask worker, and nowhere else on the way. nbparallel must therefore be
importable on every Dask worker (``pip install nbparallel`` in the workers' environment): Dask
pickles ``run_chunk`` by reference.

A Dask worker runs tasks in threads that share one process, so ``print`` is captured per thread:
a router installed once on ``sys.stdout``/``sys.stderr`` sends the text a task thread writes to
that task's list, tagged with the item it was running, and everything else to the real streams.
The lines travel back with the chunk's outcomes (not live, as from a local worker).

A coroutine function's chunk (the job has ``concurrency``) runs on an event loop of its own, made for
that task in its thread (``asyncio.run``), its items in flight together, at most ``concurrency`` at
once; what they print is tagged by the item whose coroutine printed it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import pickle
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle
from distributed.diagnostics.plugin import WorkerPlugin

from ..payload import aiocall
from ..payload import pickling as ser
from ..errors import SerializationError
from ..payload.calls import call_item
from ..payload.shm import OUT_OF_BAND_MIN
from ..payload.outcomes import Batch
from ..wire.messages import CallMode

FUNCTION_CACHE = 16  # unpickled functions a Dask worker process keeps, by the job's key...
FUNCTION_CACHE_BYTES = 256 * 2**20  # ...and at most this much of their pickles (a closure's arrays live on)
OUTPUT_CAP = 1 << 20  # characters of printed output one chunk sends back; the rest is dropped
CANCEL_CHECK = 0.1  # seconds between looks at whether Dask cancelled the running chunk


# A pickle stream and its out-of-band buffers. A plain tuple, not a class: Dask walks tuples and lists
# and sends each bytes-like object in them as a frame of its own, without copying it into a pickle.
Payload = tuple[bytes, list[Any]]


def load(payload: Payload) -> Any:
    stream, buffers = payload
    return pickle.loads(stream, buffers=buffers) if buffers else pickle.loads(stream)


def pack_portable(value: Any, out_of_band: bool = True) -> Payload:
    """Pickle ``value``, keeping buffers of 1 MiB and up out of band as memoryviews (Dask sends
    them as frames of their own, without copying them into the stream)."""
    buffers: list[Any] = []

    def keep(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickle copies it inline
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    stream = cloudpickle.dumps(value, protocol=5, buffer_callback=keep if out_of_band else None)
    return stream, buffers


# -- output, per task thread ------------------------------------------------------------------------

_capture = threading.local()  # .lines: list of (index, stream, text) while a chunk runs; .index
_install_lock = threading.Lock()


class _Router(io.TextIOBase):
    """Stands in for sys.stdout/stderr: a task thread's text goes to its chunk, the rest passes."""

    def __init__(self, name: str, original: Any) -> None:
        self.name = name
        self.original = original

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        lines: list[tuple[int | None, str, str]] | None = getattr(_capture, "lines", None)
        if lines is None:
            return int(self.original.write(text))
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        _capture.size += len(text)
        if _capture.size <= OUTPUT_CAP:
            index = aiocall.CURRENT_INDEX.get()  # a coroutine's item (an async chunk)...
            if index is None:
                index = _capture.index  # ...or the item this thread runs
            if lines and lines[-1][0] == index and lines[-1][1] == self.name:
                lines[-1] = (index, self.name, lines[-1][2] + text)  # one entry per item and stream
            else:
                lines.append((index, self.name, text))
        return len(text)

    def flush(self) -> None:
        if getattr(_capture, "lines", None) is None:
            self.original.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return int(self.original.fileno())


def _install_router() -> None:
    with _install_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router("stdout", sys.stdout)
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router("stderr", sys.stderr)


# -- the function, once per worker process -------------------------------------------------------------

_functions: OrderedDict[str, tuple[Callable[..., Any], int]] = OrderedDict()  # key -> (function, bytes)
_functions_lock = threading.Lock()


def _function(key: str, payload: Payload) -> Callable[..., Any]:
    with _functions_lock:
        cached = _functions.get(key)
        if cached is not None:
            _functions.move_to_end(key)
            return cached[0]
    fn: Callable[..., Any] = load(payload)
    size = len(payload[0]) + sum(len(b) for b in payload[1])
    with _functions_lock:
        _functions[key] = (fn, size)
        while len(_functions) > 1 and (len(_functions) > FUNCTION_CACHE or
                                       sum(n for _, n in _functions.values()) > FUNCTION_CACHE_BYTES):
            _functions.popitem(last=False)
    return fn


class _Cancelled:
    """Whether Dask has cancelled the task running this chunk (the caller cancelled the call).
    A running thread cannot be stopped from outside; the chunk stops at its next item instead."""

    def __init__(self) -> None:
        self.worker: Any = None
        self.key: Any = None
        try:
            from distributed import get_worker  # only on a Dask worker, where distributed is

            self.worker = get_worker()
            self.key = self.worker.get_current_task()
        except Exception:  # not in a Dask worker (a test calling run_chunk directly)
            pass
        self.checked = time.monotonic()

    def __call__(self) -> bool:
        if self.worker is None or time.monotonic() - self.checked < CANCEL_CHECK:
            return False
        self.checked = time.monotonic()
        state = self.worker.state.tasks.get(self.key)
        return state is None or state.state in ("cancelled", "released", "forgotten")


_specs: OrderedDict[str, dict[str, Any]] = OrderedDict()  # a job's chunks share its JSON: parse it once


def _job_spec(text: str) -> dict[str, Any]:
    with _functions_lock:  # a Dask worker may run several chunks at once, in threads
        spec = _specs.get(text)
        if spec is None:
            spec = _specs[text] = json.loads(text)
            while len(_specs) > FUNCTION_CACHE:
                _specs.popitem(last=False)
        return spec


def _add_path(entries: list[str]) -> None:
    # Functions pickled by reference are imported from the caller's sys.path where those folders
    # exist here too (a LocalCluster, a shared file system). The cwd is not changed: the threads of
    # a Dask worker share one.
    for entry in reversed(entries):
        if entry and entry not in sys.path and os.path.isdir(entry):
            sys.path.insert(0, entry)


Outcome = tuple[dict[str, Any], list[Any], bytes, list[Any]]


def run_chunk(function: Payload, job: str, start: int, count: int, items: Payload) -> Outcome:
    """Run one chunk on a Dask worker. Returns ``(meta, output, stream, buffers)``: ``meta`` as a
    local worker's ``result`` header (``upto``, ``n``, ``failed``, ``elapsed``) plus the worker's pid
    and address; ``output`` the printed text as ``(index, stream, text)``; ``stream`` and ``buffers``
    the pickled ``(offsets, values, problems)`` of worker.py's ``Batch``.

    ``job`` is the job's settings as JSON (``key``, ``call``, ``stop_on_error``, ``path``,
    ``out_of_band``): one string, made once per call, which Dask passes along without walking it."""
    _install_router()
    began = time.perf_counter()
    spec = _job_spec(job)
    call: CallMode = spec.get("call", "one")
    stop_on_error = bool(spec.get("stop_on_error"))
    out_of_band = bool(spec.get("out_of_band", True))
    batch = Batch(start)
    upto = count
    stage = "function"
    try:
        _add_path(list(spec.get("path") or ()))
        fn = _function(str(spec["key"]), function)
        stage = "items"
        values = load(items)
    except BaseException as exc:  # the function or the items cannot be rebuilt on this worker
        error = SerializationError(
            f"the Dask worker could not unpickle the {stage}: {type(exc).__name__}: {exc}. Is every module "
            "it needs installed on the Dask workers (the same versions as in the kernel)?")
        for offset in range(count):
            batch.add_problem(offset, ser.FAILED, error)
        return _finish(batch, count, began, [], out_of_band)
    lines: list[tuple[int | None, str, str]] = []
    _capture.lines, _capture.size, _capture.index = lines, 0, None
    cancelled = _Cancelled()
    try:
        concurrency = int(spec.get("concurrency") or 0)
        if concurrency:
            upto = asyncio.run(_run_async(fn, call, values, start, batch, concurrency, stop_on_error, cancelled))
        for offset in range(0 if concurrency else count):
            if cancelled():
                upto = offset
                break
            _capture.index = start + offset
            try:
                value = call_item(fn, call, values[offset])
            except BaseException as exc:  # SystemExit and KeyboardInterrupt in a task are its outcome too
                batch.add_problem(offset, ser.RAISED, ser.encode_exception(exc))
                if stop_on_error:
                    upto = offset + 1
                    break
            else:
                batch.offsets.append(offset)
                batch.values.append(value)
    finally:
        dropped = _capture.size - OUTPUT_CAP
        _capture.lines = None
    if dropped > 0:
        lines.append((None, "stderr", f"[nbparallel: {dropped:,} more characters of output from this chunk were "
                                      "dropped]\n"))
    return _finish(batch, upto, began, lines, out_of_band)


async def _run_async(fn: Callable[..., Any], call: CallMode, values: list[Any], start: int, batch: Batch, limit: int,
                     stop_on_error: bool, cancelled: _Cancelled) -> int:
    """A coroutine function's chunk on this task's event loop, ``limit`` items in flight; returns
    ``upto`` (the chunk's count, or fewer when Dask cancelled the task or an error stopped it)."""
    gate = asyncio.Semaphore(limit)
    outcomes: dict[int, tuple[int, Any]] = {}
    stopped = False

    async def one(offset: int) -> None:
        nonlocal stopped
        async with gate:
            if stopped:
                return
            aiocall.CURRENT_INDEX.set(start + offset)  # this task's own context
            outcomes[offset] = status = await aiocall.outcome(fn, call, values[offset])
        if status[0] != ser.OK and stop_on_error:
            stopped = True

    tasks = [asyncio.ensure_future(one(offset)) for offset in range(len(values))]
    pending = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=CANCEL_CHECK)
        if pending and cancelled():  # the caller cancelled the call: stop every item in flight
            stopped = True
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
            break
    for offset in sorted(outcomes):
        status, value = outcomes[offset]
        if status == ser.OK:
            batch.offsets.append(offset)
            batch.values.append(value)
        else:
            batch.add_problem(offset, status, value)
    return len(values) if not stopped else len(outcomes)


def _finish(batch: Batch, upto: int, began: float, lines: list[Any], out_of_band: bool) -> Outcome:
    stream, buffers = batch.pack_with(lambda value: pack_portable(value, out_of_band))
    meta = {
        "upto": upto,
        "n": len(batch.offsets) + len(batch.problems),
        "failed": len(batch.problems),
        "elapsed": time.perf_counter() - began,
        "pid": os.getpid(),
        "worker": _worker_address(),
    }
    return meta, lines, stream, buffers


def _worker_address() -> str | None:
    try:
        from distributed import get_worker  # only on a Dask worker, where distributed is

        return str(get_worker().address)
    except Exception:
        return None


class Preload(WorkerPlugin):
    """``configure(preload=[...])`` on a cluster: every Dask worker, present or joining later,
    imports these modules once (a failure is printed in that worker's log, as locally)."""

    name = "nbparallel-preload"

    def __init__(self, modules: list[str]) -> None:
        self.modules = list(modules)

    def setup(self, worker: Any) -> None:
        import importlib  # noqa: stdlib, only when a preload is set up

        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:
                print(f"nbparallel: preload of {module!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
