"""How a call's input is read and cut into chunks."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from .. import config
from ..payload import pickling as ser


class ChunkSizer:
    """Chooses how many items go in the next chunk.

    ``"auto"`` first sends one item to each worker (``probing``: nothing more until a time comes
    back, so a call of hour-long tasks never queues many on one worker), then aims at
    ``CHUNK_SECONDS`` of work per chunk from the per-item time the workers report, bounded by bytes,
    by ``MAX_CHUNK_ITEMS``, and near the end by a fair share of what is left, so the last chunks
    don't leave workers idle; never below an eighth of the target, so the tail is not a dribble of
    tiny chunks.
    """

    def __init__(self, chunksize: int | str, workers: int) -> None:
        if chunksize != "auto" and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f'chunksize must be "auto" or a positive int, got {chunksize!r}')
        self.fixed = None if chunksize == "auto" else int(chunksize)
        self.workers = workers
        self.seconds_per_item: float | None = None
        self.bytes_per_item: float | None = None

    def next_size(self, remaining: int | None) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.seconds_per_item is None:
            return 1
        size = config.CHUNK_SECONDS / max(self.seconds_per_item, 1e-8)
        if self.bytes_per_item:
            size = min(size, config.MAX_CHUNK_BYTES / self.bytes_per_item)
        if remaining is not None:
            size = min(size, max(math.ceil(remaining / (2 * self.workers)), size / 8))
        return int(max(1, min(size, config.MAX_CHUNK_ITEMS)))

    @property
    def probing(self) -> bool:
        """Still waiting for the first timing (auto mode)."""
        return self.fixed is None and self.seconds_per_item is None

    def observe_time(self, items: int, seconds: float) -> None:
        if items <= 0:
            return
        per_item = seconds / items
        old = self.seconds_per_item
        self.seconds_per_item = per_item if old is None else 0.5 * old + 0.5 * per_item

    def observe_bytes(self, items: int, size: int) -> None:
        per_item = size / max(1, items)
        old = self.bytes_per_item
        self.bytes_per_item = per_item if old is None else 0.5 * old + 0.5 * per_item


def known_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    lengths = []
    for iterable in iterables:
        if not hasattr(iterable, "__len__"):
            return None
        try:
            lengths.append(len(iterable))  # type: ignore[arg-type]
        except TypeError:
            return None
    return min(lengths)


def iterate(iterables: tuple[Iterable[Any], ...]) -> Iterator[Any]:
    iterators = []
    for position, iterable in enumerate(iterables):
        try:
            iterators.append(iter(iterable))
        except TypeError:
            which = f"argument {position + 2}" if len(iterables) > 1 else "the second argument"
            raise TypeError(
                f"map() needs iterables after the function; {which} is a {type(iterable).__name__} "
                f"({ser.describe(iterable)}), which is not iterable. Wrap a single value in a list."
            ) from None
    if len(iterators) == 1:
        return iterators[0]
    return zip(*iterators)


