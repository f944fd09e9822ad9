"""The sidecar's side of the protocol with its workers: one ``TypedDict`` and one builder for each
message the sidecar sends a worker and each a worker sends back (docs/protocol.md). The kernel never
sees these: the sidecar turns a worker's ``result``, ``output`` and ``display`` into the kernel's
(messages.py), adding what only it knows (``start``, ``pid``).

As in messages.py: headers are built only by the builders, read through ``messages.view``; optional
fields are sent only when passed. The registries at the end (``TO_WORKER``, ``FROM_WORKER``) are
checked against docs/protocol.md by tests/unit/test_messages.py. Only the standard library: the
sidecar imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypedDict

from .frames import PROTOCOL_VERSION
from .messages import DisplayOptional, End, Job, Message, Segments, end, job

if TYPE_CHECKING:  # PEP 692 keyword types: typing has Unpack from Python 3.11 on, mypy knows it anyway
    from typing_extensions import Unpack


# -- sidecar -> worker (also ``job`` and ``end``, as above) -------------------------------------------


class WorkerChunkOptional(TypedDict, total=False):
    resume: int
    skip: list[int]
    careful: bool
    pace: list[float]  # a paced job (rate): [not_before, spacing], time.monotonic() seconds
    oob: Segments


class WorkerChunk(WorkerChunkOptional):
    op: Literal["chunk"]
    job: int
    chunk: int
    start: int
    count: int


def worker_chunk(*, job: int, chunk: int, start: int, count: int,
                 **optional: Unpack[WorkerChunkOptional]) -> WorkerChunk:
    """Run items ``resume..count-1`` of the chunk except the offsets in ``skip``."""
    return {"op": "chunk", "job": job, "chunk": chunk, "start": start, "count": count, **optional}


class Forget(TypedDict):
    op: Literal["forget"]
    key: str


def forget(*, key: str) -> Forget:
    """Drop a cached function."""
    return {"op": "forget", "key": key}


class Exit(TypedDict):
    op: Literal["exit"]


def exit() -> Exit:  # named for its op; nothing here needs the builtin
    """Exit now."""
    return {"op": "exit"}


# -- worker -> sidecar -----------------------------------------------------------------------------


class WorkerHello(TypedDict):
    op: Literal["hello"]
    version: int
    pid: int


def worker_hello(*, pid: int) -> WorkerHello:
    """A worker's first frame: it is ready."""
    return {"op": "hello", "version": PROTOCOL_VERSION, "pid": pid}


class WorkerResultOptional(TypedDict, total=False):
    running: int  # an async job: the items in flight here after this frame
    settled: list[int]  # an async job: offsets past ``upto`` with an outcome in this frame
    requeue: bool  # a paced chunk's final frame: its items without an outcome go back to the queue
    oob: Segments


class WorkerResult(WorkerResultOptional):
    op: Literal["result"]
    job: int
    chunk: int
    upto: int
    n: int
    failed: int
    elapsed: float
    final: bool


def worker_result(*, job: int, chunk: int, upto: int, n: int, failed: int, elapsed: float, final: bool,
                  **optional: Unpack[WorkerResultOptional]) -> WorkerResult:
    """Outcomes of the chunk's items up to offset ``upto`` (the sidecar adds ``start`` and ``pid``)."""
    return {"op": "result", "job": job, "chunk": chunk, "upto": upto, "n": n, "failed": failed,
            "elapsed": elapsed, "final": final, **optional}


class WorkerOutput(TypedDict):
    op: Literal["output"]
    job: int | None
    index: int | None
    stream: str
    text: str


def worker_output(*, job: int | None, index: int | None, stream: str, text: str) -> WorkerOutput:
    """Text printed while item ``index`` ran (the sidecar adds ``pid``)."""
    return {"op": "output", "job": job, "index": index, "stream": stream, "text": text}


class WorkerDisplay(DisplayOptional):
    op: Literal["display"]
    job: int | None
    index: int | None


def worker_display(*, job: int | None, index: int | None, **optional: Unpack[DisplayOptional]) -> WorkerDisplay:
    """A mime bundle displayed while item ``index`` ran (the sidecar adds ``pid``)."""
    return {"op": "display", "job": job, "index": index, **optional}


# -- the registries: each direction's ops, their header type and their builder ------------------------

#: What the sidecar sends a worker (``job`` is the kernel's header, forwarded).
TO_WORKER: dict[str, Message] = {
    "job": (Job, job),
    "chunk": (WorkerChunk, worker_chunk),
    "end": (End, end),
    "forget": (Forget, forget),
    "exit": (Exit, exit),
}
#: What a worker sends the sidecar.
FROM_WORKER: dict[str, Message] = {
    "hello": (WorkerHello, worker_hello),
    "result": (WorkerResult, worker_result),
    "output": (WorkerOutput, worker_output),
    "display": (WorkerDisplay, worker_display),
}
