"""The kernel's side of the protocol: one ``TypedDict`` for each message's header and one builder
(docs/protocol.md), for what the kernel sends a runner (the sidecar, or the Dask bridge) and what a
runner answers; and ``view``, how any receiver reads a frame's header. What the sidecar and its
workers say to each other is in worker_messages.py.

Senders build headers only through the builders here and in worker_messages.py; receivers read a
frame's header through its type (``view(frame, Result)``). A builder takes the message's required
fields as keyword arguments; its optional fields are sent only when passed (a receiver reads a
missing field as its default). The framing fields (``sizes``, ``fds``) are added and removed by
frames.py, never seen here.

The registries at the end (``TO_RUNNER``, ``TO_KERNEL``) list each direction's ops with their type
and builder; tests/unit/test_messages.py checks them against the tables in docs/protocol.md. Only
the standard library: the sidecar imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, cast, get_args

from .frames import PROTOCOL_VERSION, Frame

if TYPE_CHECKING:  # PEP 692 keyword types: typing has Unpack from Python 3.11 on, mypy knows it anyway
    from typing_extensions import Unpack

#: How a worker calls the function on an item: ``fn(item)``, ``fn(*item)``, or ``fn(*args, **kwargs)``
#: for submit's ``(args, kwargs)``.
CallMode = Literal["one", "star", "kwargs"]
CALL_MODES: tuple[CallMode, ...] = get_args(CallMode)

#: Where an out-of-band buffer sits among a frame's descriptors (payload/shm.py makes them):
#: ``{"fd", "offset", "size", "writable"}``, and ``"stream": true`` for a pickle stream sent that way.
Segments = list[dict[str, Any]]

M = TypeVar("M", bound=Mapping[str, Any])


def view(frame: Frame, kind: type[M]) -> M:
    """``frame``'s header, read as the message ``kind`` (no copy, no check: the op says which)."""
    return cast(M, frame.header)


# -- kernel -> runner (the sidecar, or the Dask bridge) ----------------------------------------------


class Hello(TypedDict):
    op: Literal["hello"]
    version: int


def hello() -> Hello:
    """The kernel's first frame."""
    return {"op": "hello", "version": PROTOCOL_VERSION}


class Configure(TypedDict):
    op: Literal["configure"]
    workers: int
    preload: list[str]
    env: dict[str, str]
    max_tasks_per_worker: int | None


def configure(*, workers: int, preload: list[str], env: dict[str, str],
              max_tasks_per_worker: int | None) -> Configure:
    """The pool's size, the modules every worker imports, their extra environment, their lifetime."""
    return {"op": "configure", "workers": workers, "preload": preload, "env": env,
            "max_tasks_per_worker": max_tasks_per_worker}


class JobOptional(TypedDict, total=False):
    stop_on_error: bool
    group: Any  # jobs of one Executor share its max_workers
    timeout: float | None
    retries: int
    memory_limit: int | None
    concurrency: int  # an async job: the items a worker keeps in flight on its event loop
    rate: float  # item starts per second across the job (the sidecar paces its chunks)
    report_started: bool  # send ``started`` when a chunk of the job starts running on a worker
    max_tasks: int  # replace a worker once it ran this many items of the job's group
    oob: Segments


class Job(JobOptional):
    op: Literal["job"]
    job: int
    key: str
    call: CallMode
    limit: int | None
    cwd: str | None
    path: list[str]


def job(*, job: int, key: str, call: CallMode, limit: int | None, cwd: str | None, path: list[str],
        **optional: Unpack[JobOptional]) -> Job:
    """A new call; its payload is the pickled function (``oob``: its out-of-band buffers)."""
    return {"op": "job", "job": job, "key": key, "call": call, "limit": limit, "cwd": cwd, "path": path,
            **optional}


class ChunkOptional(TypedDict, total=False):
    oob: Segments


class Chunk(ChunkOptional):
    op: Literal["chunk"]
    job: int
    chunk: int
    start: int
    count: int


def chunk(*, job: int, chunk: int, start: int, count: int, **optional: Unpack[ChunkOptional]) -> Chunk:
    """Items ``start..start+count-1`` of a job; the payload is their pickled list."""
    return {"op": "chunk", "job": job, "chunk": chunk, "start": start, "count": count, **optional}


class Cancel(TypedDict):
    op: Literal["cancel"]
    job: int


def cancel(*, job: int) -> Cancel:
    """Drop the job's queued chunks and kill the workers running its chunks."""
    return {"op": "cancel", "job": job}


class End(TypedDict):
    op: Literal["end"]
    job: int


def end(*, job: int) -> End:
    """The kernel (or, to a worker, the sidecar) is done with the job."""
    return {"op": "end", "job": job}


class StatusRequest(TypedDict):
    op: Literal["status"]
    req: int


def status_request(*, req: int) -> StatusRequest:
    """Ask for the pool's state; the answer carries the same ``req``."""
    return {"op": "status", "req": req}


class Shutdown(TypedDict):
    op: Literal["shutdown"]


def shutdown() -> Shutdown:
    """Kill the workers and exit."""
    return {"op": "shutdown"}


# -- runner -> kernel ------------------------------------------------------------------------------


class HelloReplyOptional(TypedDict, total=False):  # from the Dask bridge
    runner: str
    cluster: str
    dashboard: str | None
    workers: int
    window: int


class HelloReply(HelloReplyOptional):
    op: Literal["hello"]
    version: int
    pid: int


def hello_reply(*, pid: int, **optional: Unpack[HelloReplyOptional]) -> HelloReply:
    """The runner's answer to ``hello``."""
    return {"op": "hello", "version": PROTOCOL_VERSION, "pid": pid, **optional}


class ResultOptional(TypedDict, total=False):
    running: int  # an async job: the items in flight in that worker after this frame
    oob: Segments


class Result(ResultOptional):
    op: Literal["result"]
    job: int
    chunk: int
    start: int
    upto: int
    n: int
    failed: int
    elapsed: float
    final: bool
    pid: int


def result(*, job: int, chunk: int, start: int, upto: int, n: int, failed: int, elapsed: float, final: bool,
           pid: int, **optional: Unpack[ResultOptional]) -> Result:
    """Outcomes of a chunk's items up to offset ``upto``; ``final``: the chunk's last."""
    return {"op": "result", "job": job, "chunk": chunk, "start": start, "upto": upto, "n": n, "failed": failed,
            "elapsed": elapsed, "final": final, "pid": pid, **optional}


class CrashedOptional(TypedDict, total=False):
    reason: Literal["timeout", "memory"]  # the sidecar killed the worker for a limit...
    limit: float  # ...this one (seconds, or bytes)
    cause: str  # from the Dask bridge: what Dask reported
    worker: str | None  # from the Dask bridge: the last Dask worker's address


class Crashed(CrashedOptional):
    op: Literal["crashed"]
    job: int
    chunk: int
    indices: list[int]
    pid: int
    exitcode: int | None
    memory: int | None
    attempts: int


def crashed(*, job: int, chunk: int, indices: list[int], pid: int, exitcode: int | None, memory: int | None,
            attempts: int, **optional: Unpack[CrashedOptional]) -> Crashed:
    """The worker running these items died; they are failed."""
    return {"op": "crashed", "job": job, "chunk": chunk, "indices": indices, "pid": pid, "exitcode": exitcode,
            "memory": memory, "attempts": attempts, **optional}


class Output(TypedDict):
    op: Literal["output"]
    job: int | None
    index: int | None
    stream: str
    text: str
    pid: int


def output(*, job: int | None, index: int | None, stream: str, text: str, pid: int) -> Output:
    """Text a worker printed while it ran item ``index``."""
    return {"op": "output", "job": job, "index": index, "stream": stream, "text": text, "pid": pid}


class DisplayOptional(TypedDict, total=False):
    display_id: str  # the task gave the display an id...
    update: bool  # ...and this replaces what it showed under it


class Display(DisplayOptional):
    op: Literal["display"]
    job: int | None
    index: int | None
    pid: int


def display(*, job: int | None, index: int | None, pid: int, **optional: Unpack[DisplayOptional]) -> Display:
    """A mime bundle item ``index`` displayed (the payload: ``{"data", "metadata"}`` as JSON)."""
    return {"op": "display", "job": job, "index": index, "pid": pid, **optional}


class Started(TypedDict):
    op: Literal["started"]
    job: int
    chunk: int
    pid: int


def started(*, job: int, chunk: int, pid: int) -> Started:
    """The chunk has started running on the worker ``pid`` (for a job with ``report_started``)."""
    return {"op": "started", "job": job, "chunk": chunk, "pid": pid}


class Cancelled(TypedDict):
    op: Literal["cancelled"]
    job: int


def cancelled(*, job: int) -> Cancelled:
    """The cancellation of the job is done: nothing more about it follows."""
    return {"op": "cancelled", "job": job}


class StatusOptional(TypedDict, total=False):
    pid: int
    rss: int
    rss_peak: int
    size: int
    queued: int
    jobs: int
    tmpdir: str | None  # the sidecar's private directory (None where memfd exists)
    runner: str  # the Dask bridge: "dask"...
    cluster: str
    dashboard: str | None
    scattered: int
    bytes_scattered: int
    problem: str  # ...and why it could not ask its scheduler


class Status(StatusOptional):
    op: Literal["status"]
    req: int | None
    workers: list[dict[str, Any]]


def status(*, req: int | None, workers: list[dict[str, Any]], **optional: Unpack[StatusOptional]) -> Status:
    """The answer to ``status``: the runner's state, one entry per worker."""
    return {"op": "status", "req": req, **optional, "workers": workers}  # the long list last


class ErrorOptional(TypedDict, total=False):
    fatal: bool


class Error(ErrorOptional):
    op: Literal["error"]
    message: str


def error(*, message: str, **optional: Unpack[ErrorOptional]) -> Error:
    """An internal error in the runner; ``fatal``: the reason it is about to exit."""
    return {"op": "error", "message": message, **optional}


def unknown_op(op: str, runner: str) -> Error:
    """The protocol error a runner answers a frame with when the kernel may not send its op."""
    return error(message=f"protocol error: the kernel sent op {op!r}, which the {runner} does not take (it takes "
                         f"{', '.join(sorted(TO_RUNNER))}); are the kernel and the {runner} from different installs?")



# -- the registries: each direction's ops, their header type and their builder ------------------------

Message = tuple[type[Mapping[str, Any]], Callable[..., Mapping[str, Any]]]

#: What the kernel sends; the sidecar's and the bridge's handler tables take exactly these ops.
TO_RUNNER: dict[str, Message] = {
    "hello": (Hello, hello),
    "configure": (Configure, configure),
    "job": (Job, job),
    "chunk": (Chunk, chunk),
    "cancel": (Cancel, cancel),
    "end": (End, end),
    "status": (StatusRequest, status_request),
    "shutdown": (Shutdown, shutdown),
}
#: What the sidecar (or the Dask bridge) sends the kernel.
TO_KERNEL: dict[str, Message] = {
    "hello": (HelloReply, hello_reply),
    "result": (Result, result),
    "crashed": (Crashed, crashed),
    "output": (Output, output),
    "display": (Display, display),
    "started": (Started, started),
    "cancelled": (Cancelled, cancelled),
    "status": (Status, status),
    "error": (Error, error),
}
