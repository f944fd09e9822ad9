"""One small adapter per peer, so every scenario drives them all the same way.

A peer is used as: ``start(workers)``, any number of ``map`` calls, ``close()``. ``start`` + the first
``map`` together are "pool start counted"; later ``map`` calls are "warm". Each adapter uses its
library the way its documentation suggests for this job (its own default chunking), except where a
comment says otherwise. Libraries are imported lazily so a child process pays only for its own peer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

# The peers every timing scenario runs, nbparallel first. S5 adds spawn/forkserver variants.
TIMING_PEERS = ["nbparallel", "pool-fork", "pool-forkserver", "ppe", "joblib-loky", "mpire", "dask"]


class Peer:
    """The common shape; subclasses fill it in."""

    name = "peer"

    def label(self) -> str:
        """The name printed in tables (with the start method where the library picks it)."""
        return self.name

    def start(self, workers: int) -> None:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        """``[fn(x) for x in items]`` in the workers; ``chunksize`` only where the caller needs it fixed."""
        raise NotImplementedError

    def map_arrays(self, fn: Callable[[Any], Any], arrays: Sequence[Any]) -> list[Any]:
        """Like ``map`` for large array arguments; a peer with a better way to move data overrides it."""
        return self.map(fn, arrays)

    def close(self) -> None:
        raise NotImplementedError


class NbParallel(Peer):
    name = "nbparallel"

    def __init__(self) -> None:
        import inspect

        import nbparallel

        accepts = "progress" in inspect.signature(nbparallel.map).parameters  # older engines lack it
        self.quiet: dict[str, Any] = {"progress": False} if accepts else {}

    def start(self, workers: int) -> None:
        import nbparallel
        import nbparallel.api

        nbparallel.configure(workers=workers)
        nbparallel.api.start()  # returns once the sidecar answers; its workers come up on their own

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        import nbparallel
        import nbparallel.api

        # No progress display: none of the peers shows one by default either.
        return nbparallel.map(fn, items, chunksize=chunksize or "auto", **self.quiet)

    def close(self) -> None:
        import nbparallel
        import nbparallel.api

        nbparallel.shutdown()


class MpPool(Peer):
    """multiprocessing.Pool with an explicit start method."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.name = f"pool-{method}"
        self.pool: Any = None

    def start(self, workers: int) -> None:
        import multiprocessing

        self.pool = multiprocessing.get_context(self.method).Pool(workers)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


class ProcessPool(Peer):
    """concurrent.futures.ProcessPoolExecutor; ``method=None`` is Python's default for this platform."""

    def __init__(self, method: str | None) -> None:
        self.method = method
        self.name = "ppe" if method is None else f"ppe-{method}"
        self.pool: Any = None
        self.workers = 1

    def label(self) -> str:
        import multiprocessing

        return f"ppe-{self.method or multiprocessing.get_start_method()}"

    def start(self, workers: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context(self.method)
        self.pool = ProcessPoolExecutor(workers, mp_context=context)
        self.workers = workers

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        # Executor.map's default chunksize is 1, which makes 100,000 tiny tasks take tens of
        # seconds; we give it the chunksize Pool.map would pick, as a user who tunes it would.
        if chunksize is None:
            chunksize = max(1, math.ceil(len(items) / (4 * self.workers)))
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class JoblibLoky(Peer):
    name = "joblib-loky"

    def __init__(self) -> None:
        self.parallel: Any = None

    def start(self, workers: int) -> None:
        from joblib import Parallel

        # The loky executor itself starts on the first call (joblib starts it lazily).
        self.parallel = Parallel(n_jobs=workers, backend="loky")

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        from joblib import delayed

        return list(self.parallel(delayed(fn)(x) for x in items))

    def close(self) -> None:
        # joblib keeps loky's executor (and its workers) alive for reuse; shut it down so the
        # next "cold" start is really cold and no worker outlives the measurement.
        from joblib.externals.loky import reusable_executor

        executor = getattr(reusable_executor, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)
        self.parallel = None


class Mpire(Peer):
    """mpire.WorkerPool; ``method=None`` is mpire's default (fork on Linux)."""

    def __init__(self, method: str | None) -> None:
        self.method = method
        self.name = "mpire" if method is None else f"mpire-{method}"
        self.pool: Any = None

    def label(self) -> str:
        if self.method is not None:
            return self.name
        from mpire.context import DEFAULT_START_METHOD

        return f"mpire-{DEFAULT_START_METHOD}"

    def start(self, workers: int) -> None:
        from mpire import WorkerPool  # type: ignore[attr-defined]

        kwargs: dict[str, Any] = {"n_jobs": workers, "keep_alive": True}  # keep_alive: warm calls reuse workers
        if self.method is not None:
            kwargs["start_method"] = self.method
        self.pool = WorkerPool(**kwargs)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        # mpire unpacks tuple/list items into arguments; our items are ints, arrays or wrapped below.
        args = [(x,) if isinstance(x, (tuple, list, dict)) else x for x in items]
        return list(self.pool.map(fn, args, chunk_size=chunksize, progress_bar=False))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop_and_join(keep_alive=False)
            self.pool.terminate()
            self.pool = None


class Dask(Peer):
    """A distributed.LocalCluster of worker processes, one thread each."""

    name = "dask"

    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None
        self.workers = 1

    def start(self, workers: int) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,  # type: ignore[no-untyped-call]
                                    dashboard_address=None)
        self.client = Client(self.cluster)  # type: ignore[no-untyped-call]
        self.workers = workers

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None = None) -> list[Any]:
        # One task per item, the usual client.map; pure=False so equal items are not merged.
        return list(self.client.gather(self.client.map(fn, list(items), pure=False)))

    def map_batched(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """dask.bag: items grouped into partitions, the Dask way to run very many tiny tasks."""
        import dask.bag as db

        # Four partitions per worker, as Pool.map chunks; from_sequence's own default (about 30
        # items per partition at 100,000 items) is four times slower still.
        bag = db.from_sequence(items, npartitions=4 * self.workers)  # type: ignore[no-untyped-call]
        return list(bag.map(fn).compute())

    def map_arrays(self, fn: Callable[[Any], Any], arrays: Sequence[Any]) -> list[Any]:
        # Scatter first: passing big arrays straight to client.map embeds them in the task graph.
        futures = self.client.scatter(list(arrays))
        return list(self.client.gather(self.client.map(fn, futures, pure=False)))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def make_peer(name: str) -> Peer:
    """Build the adapter for a peer name such as ``pool-forkserver`` or ``mpire-spawn``."""
    base, _, method = name.partition("-")
    if name == "nbparallel":
        return NbParallel()
    if base == "pool" and method:
        return MpPool(method)
    if base == "ppe":
        return ProcessPool(method or None)
    if name == "joblib-loky":
        return JoblibLoky()
    if base == "mpire":
        return Mpire(method or None)
    if name == "dask":
        return Dask()
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(TIMING_PEERS)} and pool-/ppe-/mpire-<method>")
