"""A journal's rows: how a batch's outcomes and items are stored, read back and compared.

A row holds the values of some items (``indices``: first and count, or an int64 array when they
have gaps), pickled as a list or as the ``(offsets, values, problems)`` tuple a worker sent them in
(stored as it came: format 2), or one failure. Its items are kept so that a later call can tell whether the item at an
index is still the same: pickled as one list (compared as bytes with the current items pickled the
same way: one comparison for a whole batch), or, for big items, a digest each (identity.py). When
the bytes differ (an item changed, or equal values pickle differently), items are compared one by
one, and by digest as the last word.
"""

from __future__ import annotations

import array
import json
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from ..payload.pickling import RemoteException
from .identity import DIGEST_SIZE, item_digest

ITEMS_INLINE = 2**20  # bytes: a batch's items pickled bigger than this are kept as digests
CAUSES = 8  # a failure is stored with at most this many exceptions of its __cause__ chain


class Row:
    """One stored outcome: values for ``indices``, or (``failed``) one failure."""

    def __init__(self, raw: tuple[Any, ...], read_blob: Callable[[str, int], bytearray]) -> None:
        (self.id, self.call, failed, first, count, indices, self.items, self.digests, self.value, buffers,
         self.message, self.finished) = raw
        self.failed = bool(failed)
        self.indices: Sequence[int] = (range(first, first + count) if indices is None
                                       else memoryview(indices).cast("q").tolist())
        self.buffers: list[tuple[str, int]] = json.loads(buffers) if buffers else []
        self.read_blob = read_blob
        self.decoded: list[Any] | None = None
        self.stored_items: list[Any] | None = None

    def outcomes(self) -> list[Any]:
        """The values (a failure: a one-element list with the exception); raises if unreadable."""
        if self.decoded is None:
            if self.failed:
                error = pickle.loads(self.value) if self.value is not None else None
                if type(error) is tuple and error and isinstance(error[0], BaseException):  # with its causes
                    for outer, cause in zip(error, error[1:]):
                        object.__setattr__(outer, "__cause__", cause)  # (as errors.attach does)
                    error = error[0]
                # An exception that could not be pickled was kept as its message.
                self.decoded = [error if isinstance(error, BaseException) else RemoteException("?", self.message or "")]
            else:
                values = pickle.loads(self.value, buffers=[self.read_blob(n, s) for n, s in self.buffers])
                # A worker's (offsets, values, problems) stored as it came (journal.record's ``pickled``).
                self.decoded = values[1] if type(values) is tuple else values
        return self.decoded

    def same_items(self, current: list[Any]) -> bool:
        """Whether ``current`` (the items now at ``indices``) are the items stored, all of them."""
        if self.items is None:
            return False
        try:
            return bool(pickle.dumps(current, protocol=5) == self.items)
        except Exception:  # an item plain pickle refuses: compare one by one
            return False

    def same_item(self, offset: int, item: Any) -> bool:
        """Whether ``item`` is the one stored at ``offset`` (the slow path: a digest each)."""
        if self.digests is not None:
            return bool(self.digests[offset * DIGEST_SIZE:(offset + 1) * DIGEST_SIZE] == item_digest(item))
        if self.stored_items is None:
            try:
                self.stored_items = pickle.loads(self.items)
            except Exception:  # e.g. a class the stored items need is not defined here
                self.stored_items = []
        if offset >= len(self.stored_items):
            return False
        stored = self.stored_items[offset]
        try:
            if pickle.dumps(stored, protocol=5) == pickle.dumps(item, protocol=5):
                return True
        except Exception:
            pass
        return item_digest(stored) == item_digest(item)


def pickle_failure(error: BaseException) -> bytes | None:
    """``error`` pickled with its ``__cause__`` chain, which pickle leaves out (a task's exception
    has its remote traceback and item there: errors.details): as much of it as can be pickled;
    None if not even ``error`` can be."""
    chain = [error]
    while len(chain) < CAUSES:
        cause = chain[-1].__cause__
        if cause is None or any(cause is seen for seen in chain):
            break
        chain.append(cause)
    while chain:
        try:
            return bytes(cloudpickle.dumps(tuple(chain) if len(chain) > 1 else error, protocol=5))
        except Exception:  # a cause that cannot be pickled: without it
            chain.pop()
    return None


def pack_indices(indices: Sequence[int]) -> tuple[int, int, bytes | None]:
    """(first, count, None) for contiguous indices; else (first, count, int64 array)."""
    first, count = indices[0], len(indices)
    if isinstance(indices, range) or indices[-1] - first == count - 1:  # ascending: contiguous
        return first, count, None
    return first, count, array.array("q", indices).tobytes()


def identify(items: list[Any]) -> tuple[bytes | None, bytes | None]:
    """The items of a batch as stored: pickled as one list (small items), or a digest each."""
    oversized: list[pickle.PickleBuffer] = []
    try:
        stored = pickle.dumps(items, protocol=5, buffer_callback=oversized.append)
        if not oversized and len(stored) <= ITEMS_INLINE:
            return stored, None
    except Exception:  # an item plain pickle refuses (a lambda, say): digests instead
        pass
    return None, b"".join(item_digest(item) for item in items)
