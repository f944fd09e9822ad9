"""A joblib backend: ``with joblib.parallel_config(backend="nbparallel"):`` runs joblib work, and so
scikit-learn's ``n_jobs``, on nbparallel's workers (or its Dask cluster), with the progress widget,
worker output in the cell and the interrupt guarantees.

Each batch joblib dispatches becomes one task (``kernel.tasks.Task``, as ``nbparallel.submit`` makes),
so the kernel never forks and functions defined in the notebook travel by value. joblib's contract
(joblib 1.5+): ``submit`` returns a future-like object and calls ``callback`` when it is done (here on
the client's reader thread, which then dispatches joblib's next batch); ``retrieve_result_callback``
turns it into the batch's results or raises the task's error (a ``TaskError`` that is also the
original type, with the remote traceback); ``abort_everything`` cancels what is still queued or
running, and the sidecar kills and replaces the workers running it (Ctrl-C, the stop button, or the
first error). The pool is shared and stays ready, whatever ``ensure_ready`` asks.

Registered by ``nbparallel.register_joblib()``, which ``import nbparallel`` arranges to run as soon
as joblib is imported (joblib_hook.py), so this module, and joblib, load only when joblib is used.
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import threading
from typing import Any

from joblib._parallel_backends import (AutoBatchingMixin, FallbackToBackend, ParallelBackendBase,
                                       SequentialBackend)

from . import config
from .kernel.output import CellTarget
from .kernel.runner import get_client, settings
from .kernel.tasks import Task, TaskFuture, new_group
from .payload.aiocall import is_async
from .payload.initializing import Initialized, key_of
from .progress.driver import choose_display
from .progress.tracking import FutureGroup

NAME = "nbparallel"


class NbParallelBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]  # joblib is untyped
    """joblib's ParallelBackendBase on nbparallel's pool.

    ``parallel_config(backend="nbparallel", progress=False)`` hides the widget; ``n_jobs`` follows
    joblib (and nbparallel): -1 every worker of the pool (the cluster's threads on a Dask cluster),
    -2 all but one, n at most n batches at once (the pool grows to n if it is smaller), 1 runs in
    the caller, as joblib always does.
    """

    supports_retrieve_callback = True  # so also return_as="generator"/"generator_unordered" and timeout
    supports_inner_max_num_threads = False  # the workers' BLAS threads are limited by configure()
    supports_sharedmem = False  # require="sharedmem" falls back to joblib's threads
    uses_threads = False
    default_n_jobs = -1  # choosing this backend means "use the pool"

    def __init__(self, nesting_level: int | None = None, inner_max_num_threads: int | None = None,
                 progress: bool | None = None, **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        self.progress = progress
        self.limit = 0
        self.group: int | None = None
        self.pending: set[TaskFuture] = set()
        self.lock = threading.Lock()
        self.target: CellTarget | None = None
        self.display: FutureGroup | None = None
        self.parallel: Any = None
        self.initializer: Any = None  # see configure
        self.initargs: tuple[Any, ...] = ()
        self.initializer_key = ""
        self.awaiting = False  # the call's functions are coroutine functions (see AsyncBatch)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return int(n_jobs)
        return max(1, _pool_size() + 1 + int(n_jobs))

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None, require: str | None = None,
                  **backend_kwargs: Any) -> int:
        """Called by joblib for each Parallel call (or once per ``with Parallel(...)`` block)."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:  # joblib's convention: one job runs in the caller, with no overhead
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self.limit = n_jobs
        self.group = new_group()  # the call's tasks share its n_jobs cap, as an Executor's do
        # Parallel(initializer=..., initargs=...) or parallel_config(initializer=...): run in each
        # worker before its first batch of a call with that initializer and those arguments.
        options = {**self.backend_kwargs, **backend_kwargs}
        self.initializer = options.get("initializer")
        self.initargs = tuple(options.get("initargs") or ())
        self.initializer_key = key_of(self.initializer, self.initargs) if self.initializer is not None else ""
        return n_jobs

    def start_call(self) -> None:
        # On the caller's thread, in the cell that runs the call: later batches are submitted from
        # the reader thread, and their output and widget must still land here.
        self.target = CellTarget.capture()
        self.display = None
        if self.progress is not False and choose_display(force=self.progress is True) == "widget":
            group = FutureGroup("joblib", force=self.progress is True)  # named after the first batch
            total = getattr(self.parallel, "n_tasks", None)
            if isinstance(total, int):
                group.fixed_total = True
                group.model.add(total=total)
            group.hold()
            group.driver.start(show_now=True)
            self.display = group

    def stop_call(self) -> None:
        display, self.display = self.display, None
        if display is not None:
            display.release()

    def submit(self, func: Any, callback: Any = None) -> cf.Future[Any]:
        """Run one batch (a joblib ``BatchedCalls``) as a task; ``callback`` when it is done."""
        calls = len(func) if hasattr(func, "__len__") else 1
        label = _describe(func, calls)
        name = _function_name(func)
        if _awaits(func):  # delayed(coroutine function): the batch's calls run concurrently on an event loop
            func = AsyncBatch(func)
            self.awaiting = True
        if self.initializer is not None:
            func = Initialized(func, self.initializer_key, self.initializer, self.initargs)
        task = Task(func, (), {}, self.limit, self.group, target=self.target, label=label)
        future = task.future
        with self.lock:
            self.pending.add(future)
        future.add_done_callback(self._forget)
        display = self.display
        if display is not None:
            if display.model.description == "joblib":
                display.model.description = f"joblib: {name}"
            display.add(future, calls)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _forget(self, future: cf.Future[Any]) -> None:
        with self.lock:
            self.pending.discard(future)  # type: ignore[arg-type,unused-ignore]  # it is one of ours

    def compute_batch_size(self) -> int:
        """joblib's automatic batch size; coroutines of a batch run side by side, so their batches
        hold the call's share of ``config.ASYNC_CONCURRENCY`` items in flight (after the first batch)."""
        if self.awaiting:
            return max(1, config.ASYNC_CONCURRENCY // max(1, self.limit))
        return int(super().compute_batch_size())

    def retrieve_result_callback(self, out: cf.Future[Any]) -> Any:
        # A cancelled batch raises CancelledError here: joblib then stops the call and raises it.
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Cancel every batch not yet finished: queued ones are dropped, running ones stopped (the
        sidecar kills their workers and starts others). The shared pool stays ready."""
        with self.lock:
            pending = list(self.pending)
        for future in pending:
            future.stop()  # running ones too, unlike cancel()

    def terminate(self) -> None:
        self.abort_everything()
        self.reset_batch_stats()


class AsyncBatch:
    """A joblib batch whose calls give coroutines (``delayed(fetch)(url)`` with ``async def
    fetch``): run in a worker's event loop, the batch's coroutines awaited together. Its results
    in order, or the first call's exception in order, as joblib's own batches."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch)

    async def __call__(self) -> list[Any]:
        import asyncio  # in the worker, whose event loop runs this

        values = self.batch()
        pending = [(k, v) for k, v in enumerate(values) if inspect.isawaitable(v)]
        settled = await asyncio.gather(*(v for _, v in pending), return_exceptions=True)
        for (k, _), value in zip(pending, settled):
            if isinstance(value, BaseException):
                raise value
            values[k] = value
        return list(values)


def _awaits(batch: Any) -> bool:
    items = getattr(batch, "items", None)
    try:
        return any(is_async(entry[0]) for entry in items or ())
    except (TypeError, IndexError):  # not joblib's BatchedCalls: run it as it is
        return False


def _pool_size() -> int:
    """What n_jobs=-1 means now: the cluster's threads, or the local pool's size."""

    if settings.cluster is not None:
        return get_client().size or 1
    return config.resolve_workers(settings.workers)


def _function_name(batch: Any) -> str:
    try:
        fn = batch.items[0][0]
    except (AttributeError, IndexError, TypeError):
        return type(batch).__name__
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__)


def _describe(batch: Any, calls: int) -> str:
    name = _function_name(batch)
    return f"a batch of {calls} {name} call{'s' if calls != 1 else ''}" if calls != 1 else f"a {name} call"


def register() -> None:
    """Make ``backend="nbparallel"`` known to joblib (idempotent)."""
    from joblib.parallel import BACKENDS, register_parallel_backend  # joblib is there: it asked for us

    if BACKENDS.get(NAME) is not NbParallelBackend:
        register_parallel_backend(NAME, NbParallelBackend)
