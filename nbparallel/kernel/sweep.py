"""A durable sweep: a map or imap that restores what its journal holds and runs only the rest.

``api.map(fn, items, checkpoint=PATH)`` comes here (``run_map``), which:

1. opens the journal (journal.py), checks the function against the one that wrote it, and finds the
   items whose outcome it holds: same position, same value (``plan``);
2. calls the ordinary ``map`` on the other items, with a ``Recorder`` as the run's observer: every
   batch of outcomes is written to the journal as it arrives (renumbered to the caller's indices),
   then passed on to the progress display, which also shows how many were restored;
3. merges the restored and the new outcomes in input order, and on an error or an interrupt puts the
   restored results into ``err.completed`` too (and writes what arrived while cancelling).

The recorder reaches the inner call through a context variable that ``recording`` reads once,
so the front door's only change is to pass its observer through ``recording`` (recording.py).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import Interrupted, NbParallelError, completed_of, is_failure, keep_completed, renumber
from .identity import function_id, source
from .journal import Checkpoint, Journal, as_checkpoint
from .journalrows import Row
from .recording import RECORDER

if TYPE_CHECKING:
    from .mapping import Batch, MapRun, Observer

class Sweep:
    """The bookkeeping of one checkpointed call: which original index each run index is, what was
    written, how many were restored."""

    def __init__(self, journal: Journal, items: Sequence[Any] | dict[int, Any], todo: range | list[int]) -> None:
        self.journal = journal
        self.items = items  # map: every item; imap: the pending ones by index, until written
        self.todo = todo  # run index -> the caller's index
        self.written = bytearray(len(todo))  # per run index: its outcome is in the journal
        self.restored = 0
        self.renumbered: set[int] = set()  # ids of errors already given the caller's index

    def item_list(self, indices: Sequence[int]) -> list[Any]:
        items = self.items
        if isinstance(items, dict):
            return [items.pop(i) for i in indices]
        if isinstance(indices, range) and isinstance(items, list):
            return items[indices.start:indices.stop]
        return [items[i] for i in indices]

    def record(self, batch: Batch) -> tuple[range | list[int], dict[int, BaseException]]:
        """Write ``batch`` (run indices) to the journal; return its indices and errors renumbered."""
        run = batch.indices
        indices: range | list[int]
        if isinstance(run, range):
            indices = self.todo[run.start:run.stop]
            self.written[run.start:run.stop] = b"\1" * len(run)
        else:
            indices = [self.todo[k] for k in run]
            for k in run:
                self.written[k] = 1
        if batch.values:  # stored as the worker sent them if it can; else pickled: a map's on the writer
            deferred = not isinstance(self.items, dict)  # thread, an imap's now (its consumer has them)
            self.journal.record(indices, self.item_list(indices), batch.values, now=not deferred, pickled=batch.pickled)
        errors: dict[int, BaseException] = {}
        for k, error in batch.errors.items():
            index = self.todo[k]
            self.renumber(error, index)
            self.journal.record_failure(index, self.item_list([index])[0], error)
            self.written[k] = 1
            errors[index] = error
        return indices, errors

    def renumber(self, error: BaseException, index: int) -> None:
        """Give ``error`` the caller's index (its message too, where the index is written in it)."""
        if id(error) in self.renumbered:
            return
        self.renumbered.add(id(error))
        renumber(error, index)

    def catch_up(self, outcomes: dict[int, Any] | list[Any]) -> None:
        """Write the outcomes (by run index: values or errors) that no batch brought: those that
        arrived while the call was being cancelled, the placeholders of a total_timeout."""
        written = self.written
        late: list[tuple[int, Any]] = []
        k = written.find(0)
        while k != -1:  # only the gaps: a whole call's results are not walked in Python
            if isinstance(outcomes, list) and k < len(outcomes):
                late.append((k, outcomes[k]))
            elif isinstance(outcomes, dict) and k in outcomes:
                late.append((k, outcomes[k]))
            k = written.find(0, k + 1)
        values = [(k, v) for k, v in late if not is_failure(v)]
        if values:
            indices = [self.todo[k] for k, _ in values]
            self.journal.record(indices, self.item_list(indices), [v for _, v in values])
        for k, error in late:
            if is_failure(error):
                self.renumber(error, self.todo[k])
                self.journal.record_failure(self.todo[k], self.item_list([self.todo[k]])[0], error)
        for k, _ in late:
            written[k] = 1

    def completed(self, completed: dict[int, Any], restored: dict[int, Any]) -> dict[int, Any]:
        """An error's ``completed`` (run indices) in the caller's indices, the restored ones added."""
        merged = dict(restored)
        merged.update((self.todo[k], v) for k, v in completed.items() if k < len(self.todo))
        return merged


class Recorder:
    """The observer of a checkpointed call's run (see mapping.Observer): writes, then passes on."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.inner: Observer | None = None

    def _note_restored(self) -> None:
        note = getattr(self.inner, "note_restored", None)  # the progress display says how many
        if note is not None and self.sweep.restored:
            note(self.sweep.restored)

    def started(self, run: MapRun) -> None:
        self._note_restored()
        if self.inner is not None:
            self.inner.started(run)

    def advanced(self, run: MapRun, batch: Batch) -> None:
        indices, errors = self.sweep.record(batch)
        if self.inner is not None:
            self._note_restored()
            self.inner.advanced(run, replace(batch, indices=indices, errors=errors))

    def output(self, run: MapRun, stream: str, text: str, index: int | None) -> None:
        if self.inner is not None:
            self.inner.output(run, stream, text, index)

    def finished(self, run: MapRun, state: str) -> None:
        if self.inner is not None:
            self.inner.finished(run, state)


def plan(journal: Journal, items: Sequence[Any], rerun_failed: bool) -> tuple[list[Any], bytearray, dict[int, Any]]:
    """What the journal holds for ``items``: (outcomes, restored, failures). ``restored[i]`` is 1
    when ``outcomes[i]`` holds item ``i``'s value, or its failure (then also in ``failures``) when
    failures are not to be run again. An index counts when the newest outcome stored for it whose
    item is the same as now can be read; the others are ignored (their items changed)."""
    count = len(items)
    taken = bytearray(count)  # 1: the newest outcome of this index for the same item is found
    claims: list[tuple[Row, list[int] | None]] = []  # a row and the offsets it claims (None: all)
    for row in journal.rows():
        indices = row.indices
        if isinstance(indices, range):
            fresh = indices.stop <= count and taken.count(1, indices.start, indices.stop) == 0
        else:
            fresh = indices[-1] < count and not any(taken[i] for i in indices)
        if fresh and row.same_items(_take(items, indices)):  # the usual case: one comparison of bytes
            _mark(taken, indices)
            claims.append((row, None))
            continue
        offsets = [k for k, i in enumerate(indices) if i < count and not taken[i] and row.same_item(k, items[i])]
        _mark(taken, [indices[k] for k in offsets])
        if offsets:
            claims.append((row, offsets))
    outcomes: list[Any] = [None] * count
    restored = bytearray(count)
    failures: dict[int, Any] = {}
    for row, claimed in claims:
        if row.failed and rerun_failed:
            continue
        try:
            values = row.outcomes()
        except Exception:  # unreadable (a blob lost in an OS crash, a class gone): run them again
            continue
        indices = row.indices
        if claimed is None and isinstance(indices, range):
            outcomes[indices.start:indices.stop] = values
        else:
            chosen = range(len(indices)) if claimed is None else claimed
            indices = [indices[k] for k in chosen]
            for index, k in zip(indices, chosen):
                outcomes[index] = values[k]
        _mark(restored, indices)
        if row.failed:
            failures.update((i, outcomes[i]) for i in indices)
    return outcomes, restored, failures


def _mark(flags: bytearray, indices: Sequence[int]) -> None:
    if isinstance(indices, range):
        flags[indices.start:indices.stop] = b"\1" * len(indices)
    else:
        for index in indices:
            flags[index] = 1


_FLIP = bytes.maketrans(b"\0\1", b"\1\0")


def _kept(outcomes: list[Any], restored: bytearray, failed: dict[int, Any]) -> dict[int, Any]:
    """The restored values by index (an error's ``completed``)."""
    return {i: outcomes[i] for i in itertools.compress(range(len(outcomes)), restored) if i not in failed}


def _take(items: Sequence[Any], indices: Sequence[int]) -> list[Any]:
    if isinstance(indices, range) and isinstance(items, list):
        return items[indices.start:indices.stop]
    return [items[i] for i in indices]


def _open(checkpoint: Any, fn: Callable[..., Any], form: str) -> tuple[Checkpoint, Journal]:
    spec = as_checkpoint(checkpoint)
    journal = Journal.open(spec.path)
    try:
        journal.begin(function_id(fn, form), spec.on_change, lambda: source(fn))
    except BaseException:
        journal.close()
        raise
    return spec, journal


def run_map(map_fn: Callable[..., list[Any]], fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
            checkpoint: Any, *, errors: str, ordered: bool, **options: Any) -> list[Any]:
    """``map`` with ``checkpoint=``: restore, run the rest with ``map_fn``, merge (see the docstring)."""
    if not iterables:
        return map_fn(fn, errors=errors, ordered=ordered, **options)  # map's own error
    star = len(iterables) > 1
    first = iterables[0]
    # A list is used as it is: nothing can change it while this call runs.
    items: list[Any] = list(zip(*iterables)) if star else first if type(first) is list else list(first)
    spec, journal = _open(checkpoint, fn, "map:star" if star else "map:one")
    try:
        outcomes, restored, failed = plan(journal, items, spec.rerun_failed)
        if failed and errors == "raise":
            error = failed[min(failed)]
            keep_completed(error, _kept(outcomes, restored, failed))
            raise error
        todo: range | list[int] = range(len(items))
        if restored.count(1):
            todo = list(itertools.compress(todo, restored.translate(_FLIP)))
        sweep = Sweep(journal, items, todo)
        sweep.restored = len(items) - len(todo) - len(failed)
        got: list[Any] = []
        if todo:
            pending = items if isinstance(todo, range) else [items[i] for i in todo]
            token = RECORDER.set(Recorder(sweep))
            try:
                got = map_fn(fn, *(zip(*pending) if star else (pending,)), errors=errors, ordered=ordered, **options)
            except BaseException as error:  # a task's own exception too (see errors.details)
                completed = completed_of(error)
                if completed is not None:
                    sweep.catch_up(completed)
                    keep_completed(error, sweep.completed(completed, _kept(outcomes, restored, failed)))
                raise
            finally:
                RECORDER.reset(token)
            if ordered:
                sweep.catch_up(got)
        if not ordered:
            return [*itertools.compress(outcomes, restored), *got]
        if isinstance(todo, range):
            return got
        for index, value in zip(todo, got):
            outcomes[index] = value
        return outcomes
    finally:
        journal.close()


def run_imap(imap_fn: Callable[..., Iterator[Any]], fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
             checkpoint: Any, *, errors: str, ordered: bool, **options: Any) -> Iterator[Any]:
    """``imap`` with ``checkpoint=``: the input is read lazily; an item the journal holds is
    yielded from it in its place (at once with ``ordered=False``), the others run."""
    if not iterables:
        return imap_fn(fn, errors=errors, ordered=ordered, **options)  # imap's own error
    star = len(iterables) > 1
    spec, journal = _open(checkpoint, fn, "map:star" if star else "map:one")
    try:
        where: dict[int, list[tuple[Row, int]]] = {}
        for row in journal.rows():
            for k, index in enumerate(row.indices):
                where.setdefault(index, []).append((row, k))
        todo: list[int] = []
        sweep = Sweep(journal, {}, todo)
        events: deque[tuple[int, bool, Any]] = deque()  # (index, restored, value) in input order

        def feed() -> Iterator[Any]:
            source: Iterator[Any] = iter(iterables[0])
            if star:
                source = zip(*iterables)
            for index, item in enumerate(source):
                found = _lookup(where.pop(index, ()), item)
                if found is not None and (not found[0] or not spec.rerun_failed):
                    events.append((index, True, found[1]))
                    sweep.restored += 1
                    continue
                todo.append(index)
                sweep.written.append(0)
                assert isinstance(sweep.items, dict)
                sweep.items[index] = item
                if ordered:
                    events.append((index, False, None))
                yield item

        args = tuple(map(operator.itemgetter(j), part) for j, part in enumerate(itertools.tee(feed(), len(iterables)))) \
            if star else (feed(),)
        token = RECORDER.set(Recorder(sweep))
        try:
            inner = imap_fn(fn, *args, errors=errors, ordered=ordered, **options)
        finally:
            RECORDER.reset(token)
    except BaseException:
        journal.close()
        raise
    return _merge(inner, events, sweep, errors=errors, ordered=ordered)


def _lookup(candidates: Iterable[tuple[Row, int]], item: Any) -> tuple[bool, Any] | None:
    """(failed, outcome) of the newest readable outcome stored for this very item, or None."""
    for row, k in candidates:
        if row.same_item(k, item):
            try:
                return row.failed, row.outcomes()[k]
            except Exception:  # unreadable: run it again
                return None
    return None


def _merge(inner: Iterator[Any], events: deque[tuple[int, bool, Any]], sweep: Sweep, *, errors: str,
           ordered: bool) -> Iterator[Any]:
    """Yield restored outcomes in their places among the inner imap's results (``ordered``: each
    new result waits for its pending event; else restored ones go first, as they are found)."""
    got: deque[Any] = deque()
    ended = False
    try:
        while True:
            if events and events[0][1]:
                value = events.popleft()[2]
                if isinstance(value, BaseException) and errors == "raise":
                    raise value
                yield value
                continue
            if events and got:
                events.popleft()
                yield got.popleft()
                continue
            if ended:
                return
            try:
                value = next(inner)
            except StopIteration:
                ended = True
                continue
            if ordered:
                got.append(value)
            else:
                yield value
    except BaseException as error:  # a task's own exception too (see errors.details)
        completed = completed_of(error)
        if completed is not None:
            sweep.catch_up(completed)
            restored = {index: value for index, is_restored, value in events if is_restored}
            keep_completed(error, sweep.completed(completed, restored))
        raise
    finally:
        close = getattr(inner, "close", None)
        if close is not None:
            close()
        sweep.journal.close()


def run_once(submit_fn: Callable[..., cf.Future[Any]], fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any], checkpoint: Any) -> tuple[cf.Future[Any], bool]:
    """``submit`` with a journal: (a done future and True) when it holds this call's value;
    else (the submitted call's future, whose outcome is written when it ends, and False)."""
    spec, journal = _open(checkpoint, fn, "submit")
    item = (args, kwargs)
    try:
        found = _lookup([(row, 0) for row in journal.rows() if row.indices[0] == 0], item)
        if found is not None and not found[0]:
            journal.close()
            future: cf.Future[Any] = cf.Future()
            future.set_result(found[1])
            return future, True
        future = submit_fn(fn, *args, **kwargs)
    except BaseException:
        journal.close()
        raise

    def write(done: cf.Future[Any]) -> None:
        try:
            if not done.cancelled():
                error = done.exception()
                if error is None:
                    journal.record(range(1), [item], [done.result()])
                else:
                    journal.record_failure(0, item, error)
        finally:
            journal.close()

    future.add_done_callback(write)
    return future, False
