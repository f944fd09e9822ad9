"""The public calls: map, imap, configure, status, shutdown (submit and Executor live in futures.py).

A map call is a ``MapRun`` (kernel/mapping.py) whose outcomes kernel/collect.py gathers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import config
from .errors import NbParallelError
from .kernel import collect
from .kernel import runner as _client
from .kernel.recording import recording
from .kernel.jobspec import Flow, Limits
from .kernel.mapping import MapRun
from .progress import driver as _progress

_ERRORS = ("raise", "return")
_UNSET: Any = object()


def _check_errors(errors: str) -> None:
    if errors not in _ERRORS:
        raise ValueError(f'errors must be "raise" or "return", got {errors!r}')


def map(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | str = "auto",
    ordered: bool = True,
    errors: str = "raise",
    progress: bool | None = None,
    timeout: float | None = None,
    total_timeout: float | None = None,
    retries: int = 0,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    memory_limit: int | str | None = None,
    checkpoint: Any = None,
    concurrency: int | None = None,
    rate: str | float | None = None,
    backoff: float | None = None,
) -> list[Any]:
    """Apply ``fn`` to every item in the workers and return the results as a list.

    Args:
        fn: any callable, including lambdas, closures and functions defined in a notebook. A coroutine
            function (``async def``) runs on an event loop in each worker, many items in flight.
        iterables: one iterable, or several whose items are passed as separate arguments
            (``fn(a, b)`` for ``map(fn, As, Bs)``; the shortest one ends the call).
        workers: how many workers may run this call at once; None or -1 all usable CPUs, -2 all
            but one (joblib's convention).
        chunksize: items sent to a worker at a time; ``"auto"`` adapts it to the task's duration.
        ordered: results in input order (True) or in the order they finished (False).
        errors: ``"raise"`` stops at the first failure and raises it (``details(err).completed`` holds the
            finished results by index); ``"return"`` puts the exception in that item's place.
        progress: None shows a progress display once the call has run ``progress_after`` seconds
            (a widget in a notebook, a text bar on stderr in a terminal); True always; False never.
        timeout: seconds one item may run; past it the worker is killed and replaced and the item
            fails with ``TaskTimeout``; the other items go on. A coroutine is cancelled instead (its
            worker goes on), each attempt limited by itself.
        total_timeout: seconds the whole call may run; then it is cancelled, and the unfinished
            items fail with ``TaskTimeout`` (raised, or in their places with ``errors="return"``).
        retries: how many more times to run an item whose worker crashed or timed out (on a fresh
            worker; a coroutine that timed out, in place); the error records ``attempts``.
        retry_on: exception types worth retrying in the worker (e.g. ``ConnectionError``); other
            exceptions are never retried.
        backoff: seconds before the first retry of ``retry_on`` (and of a timed-out coroutine),
            doubling with each attempt up to 60 s, each wait a random 50-100% of that; an exception
            with a ``retry_after`` attribute (seconds), or a ``Retry-After`` header in its ``headers``
            or ``response.headers``, waits that long instead. Default 0.5 s for coroutine functions;
            plain functions retry at once unless it is given.
        memory_limit: per worker, e.g. ``"2GB"``: a worker past it is killed before the machine
            runs short, and its item fails with ``MemoryLimitExceeded``.
        checkpoint: a journal file (``"runs/sweep.db"``, or a ``nbparallel.checkpoint.Checkpoint``):
            each outcome is written there as it arrives, and the same call run again (after a crash,
            a kernel restart, in another process) runs only the items it has no value for; see
            ``nbparallel.checkpoint``. A changed function raises ``CheckpointMismatch``.
        concurrency: items in flight at once across the whole call, for a coroutine function (default
            64), spread over the workers (so CPU work inside the coroutines spreads too). Also
            makes a plain function that returns awaitables (a lambda calling an async function) run
            as one.
        rate: at most this many item starts per unit of time across the whole call, whatever the
            number of workers: ``"50/s"``, ``"3000/min"``, ``"10/hour"`` or a number per second.
            Starts are spaced evenly (no bursts). For any function; a call run again right after
            with the same function and rate continues the same pace.

    Raises:
        The exception ``fn`` raised, as itself (its type, its attributes), the remote traceback
        chained as ``__cause__``; ``nbparallel.details(err)`` gives the item, its index and
        ``completed`` (the finished results). ``TaskError`` if it cannot be rebuilt here.
        WorkerCrashed: a worker died running an item.
        SidecarDied: the sidecar went away.
        Interrupted: Ctrl-C or the stop button; ``err.completed`` holds the finished results.
    """
    __tracebackhide__ = True  # IPython shows the caller's line and the task's exception, not our plumbing
    _check_errors(errors)
    if checkpoint is not None:  # a durable sweep: kernel/sweep.py calls this map on what the journal lacks
        # heavy (the journal, sqlite3: ~20 ms at a cold start), and only for a checkpointed call
        from .kernel import sweep as _sweep

        return _sweep.run_map(map, fn, iterables, checkpoint, errors=errors, ordered=ordered, workers=workers,
                              chunksize=chunksize, progress=progress, timeout=timeout, total_timeout=total_timeout,
                              retries=retries, retry_on=retry_on, memory_limit=memory_limit,
                              concurrency=concurrency, rate=rate, backoff=backoff)
    observer = _progress.for_call(progress, fn, "map")
    limits = Limits.make(timeout, retries, retry_on, memory_limit)
    flow = Flow.make(concurrency, rate, backoff)
    run = MapRun(fn, iterables, workers=workers, chunksize=chunksize, stop_on_error=errors == "raise",
                 limits=limits, observer=recording(observer), flow=flow)
    run.deadline = collect.deadline_after(total_timeout)
    return collect.gather(run, ordered=ordered, errors=errors, total_timeout=total_timeout)


def imap(
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    workers: int | None = None,
    chunksize: int | str = "auto",
    ordered: bool = True,
    errors: str = "raise",
    progress: bool | None = None,
    timeout: float | None = None,
    total_timeout: float | None = None,
    retries: int = 0,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (),
    memory_limit: int | str | None = None,
    checkpoint: Any = None,
    concurrency: int | None = None,
    rate: str | float | None = None,
    backoff: float | None = None,
) -> Iterator[Any]:
    """Like ``map``, but yield results while the work goes on; input is read lazily.

    With ``ordered=False`` results come as they finish. Only a bounded window of items is in
    flight, so an endless generator works. Stopping the iteration (or ``close()``) cancels the rest.
    On a failure with ``errors="raise"``, ``err.completed`` holds the results not yet yielded.
    ``progress`` as in ``map``; the widget's Cancel button stops an imap consumed across cells.
    ``checkpoint`` as in ``map``: an item the journal holds is yielded from it, in its place.
    ``concurrency``, ``rate`` and ``backoff`` as in ``map``.
    """
    _check_errors(errors)
    if checkpoint is not None:  # a durable sweep, as in map
        # heavy (the journal, sqlite3), and only for a checkpointed call
        from .kernel import sweep as _sweep

        return _sweep.run_imap(imap, fn, iterables, checkpoint, errors=errors, ordered=ordered, workers=workers,
                               chunksize=chunksize, progress=progress, timeout=timeout, total_timeout=total_timeout,
                               retries=retries, retry_on=retry_on, memory_limit=memory_limit,
                               concurrency=concurrency, rate=rate, backoff=backoff)
    observer = _progress.for_call(progress, fn, "imap", cancellable=True)
    limits = Limits.make(timeout, retries, retry_on, memory_limit)
    flow = Flow.make(concurrency, rate, backoff)
    run = MapRun(fn, iterables, workers=workers, chunksize=chunksize, stop_on_error=errors == "raise",
                 limits=limits, observer=recording(observer), flow=flow)
    iterator = collect.stream(run, ordered=ordered, errors=errors, deadline=collect.deadline_after(total_timeout),
                              total_timeout=total_timeout)
    return _progress.attach(observer, iterator)


def last_results() -> dict[int, Any]:
    """``{index: result}`` of the items that had finished when the last stopped call stopped (the
    stop button, Ctrl-C, a failure with ``errors="raise"``, ``total_timeout``): what that call's
    exception carries as ``err.completed``, for a cell that did not catch it. Empty if no call has
    stopped yet. (A ``%%parallel`` cell keeps its finished runs in its ``--out`` variable.)"""
    return dict(collect.last_stopped)


def configure(
    *,
    workers: Any = _UNSET,
    preload: list[str] | None = None,
    env: dict[str, str] | None = None,
    limit_threads: bool | None = None,
    tag_output: bool | None = None,
    max_tasks_per_worker: int | None | Any = _UNSET,
    max_output_bytes: int | None = None,
    progress_after: float | None = None,
    cluster: str | None | Any = _UNSET,
) -> None:
    """Change the pool: its size, modules preloaded in every worker, environment variables.

    ``workers`` follows joblib's convention (None or -1: all usable CPUs). ``preload`` names modules
    every worker imports once before work arrives (changing it restarts the workers).
    ``limit_threads`` keeps BLAS/OpenMP thread pools to each worker's share of the CPUs.
    ``tag_output`` prefixes lines printed by workers with ``[item N]``.
    ``max_tasks_per_worker`` replaces a worker after that many items (None: never).
    ``max_output_bytes`` caps the printed output one call passes on.
    ``progress_after``: seconds a call runs before its progress display appears.
    ``cluster``: run every call on a Dask cluster instead: the scheduler's address
    (``"tcp://host:8786"``), or ``"local"`` to start a Dask LocalCluster of ``workers`` processes;
    None runs on this machine again. The runner restarts now, so a cluster that cannot be reached
    raises ``ClusterUnavailable`` here (and the setting stays as it was). Needs
    ``pip install "nbparallel[dask]"``, and nbparallel installed on the Dask workers.
    """
    settings = _client.settings
    if cluster is not _UNSET:
        _check_cluster(cluster)
    if workers is not _UNSET:
        config.resolve_workers(workers)  # validate now, with a clear message
        settings.workers = workers
    if preload is not None:
        settings.preload = list(preload)
    if env is not None:
        settings.env = dict(env)
    if limit_threads is not None:
        settings.limit_threads = limit_threads
    if tag_output is not None:
        settings.tag_output = tag_output
    if max_tasks_per_worker is not _UNSET:
        if max_tasks_per_worker is not None and (not isinstance(max_tasks_per_worker, int) or max_tasks_per_worker < 1):
            raise ValueError(f"max_tasks_per_worker must be a positive int or None, got {max_tasks_per_worker!r}")
        settings.max_tasks_per_worker = max_tasks_per_worker
    if max_output_bytes is not None:
        settings.max_output_bytes = int(max_output_bytes)
    if progress_after is not None:
        settings.progress_after = float(progress_after)
    if cluster is not _UNSET and cluster != settings.cluster:
        _switch_cluster(settings, cluster)
        return
    running = _client.current_client()
    if running is not None and running.dead is None:
        running.configure(settings)


def _check_cluster(cluster: object) -> None:
    if cluster is None:
        return
    if not isinstance(cluster, str) or not cluster.strip():
        raise TypeError(f'cluster must be a scheduler address such as "tcp://host:8786", "local" or None, '
                        f"got {cluster!r}")
    import importlib.util  # only to check for Dask when a cluster is asked for

    if importlib.util.find_spec("distributed") is None:
        raise ImportError('running on a Dask cluster needs Dask: pip install "nbparallel[dask]"')


def _switch_cluster(settings: config.Settings, cluster: str | None) -> None:
    """Stop the current runner and start the one for ``cluster``; on failure keep the old setting."""
    previous = settings.cluster
    _client.shutdown_client()
    settings.cluster = cluster.strip() if cluster else None
    try:
        _client.get_client()
    except NbParallelError:
        settings.cluster = previous
        raise


def status() -> dict[str, Any]:
    """The sidecar's PID and memory, and each worker's state, current item, memory and tasks done.

    On a Dask cluster: the bridge's PID and memory, ``cluster`` (the scheduler's address),
    ``dashboard``, and one entry per Dask worker, with its ``address`` and ``threads``."""
    client = _client.get_client()
    reply = client.request({"op": "status"}).header
    reply.pop("op", None)
    reply.pop("req", None)
    return reply


def shutdown() -> None:
    """Stop the sidecar and every worker now. The next call starts them again."""
    _client.shutdown_client()


def start() -> int:
    """Start the sidecar and its workers now (``%load_ext`` does this); return the sidecar's PID."""
    return _client.get_client().pid
