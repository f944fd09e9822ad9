"""The outcomes of a chunk's items, packed the way the kernel unpacks them fastest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from . import pickling as ser
from . import shm
from ..errors import NbParallelError, SerializationError

_Packed = TypeVar("_Packed")


class Batch:
    """Outcomes of some items of one chunk, in the shape the kernel unpacks fastest.

    Pickled as ``(offsets, values, problems)``: ``offsets`` a ``range`` when contiguous (the usual
    case) or a list; ``values`` the results of those offsets; ``problems`` ``{offset: (status,
    value)}`` for items that raised or failed.
    """

    def __init__(self, start: int) -> None:
        self.start = start
        self.offsets: list[int] = []
        self.values: list[Any] = []
        self.problems: dict[int, tuple[int, Any]] = {}

    def add_problem(self, offset: int, status: int, value: Any) -> None:
        self.problems[offset] = (status, value)

    def pickle(self) -> shm.Packed:
        """The outcomes for the wire: each large buffer in a fresh segment (see shm.py), which the
        kernel keeps exactly as long as it keeps the result."""
        return self.pack_with(shm.dumps)

    def pack_with(self, pack: Callable[[Any], _Packed]) -> _Packed:
        """The outcomes pickled by ``pack`` (a Dask worker keeps its buffers as bytes instead,
        see cluster/task.py); a value that cannot be pickled fails only its own item."""
        offsets: range | list[int] = self.offsets
        if self.offsets and self.offsets[-1] - self.offsets[0] + 1 == len(self.offsets):
            offsets = range(self.offsets[0], self.offsets[-1] + 1)
        try:
            return pack((offsets, self.values, self.problems))
        except shm.SharedMemoryLimit as exc:  # no room for the results: each item says which limit
            every = {offset: (ser.FAILED, NbParallelError(f"the result could not be sent back: {exc}"))
                     for offset in [*self.offsets, *self.problems]}
            return pack((range(0), [], every))
        except BaseException:  # a value's __reduce__ may raise anything (SystemExit too): see below
            pass
        # One value spoils the batch: pickle each alone and fail only those that cannot travel.
        kept_offsets: list[int] = []
        kept_values: list[Any] = []
        problems: dict[int, tuple[int, Any]] = {}
        pairs = [(o, (ser.OK, v)) for o, v in zip(self.offsets, self.values)] + list(self.problems.items())
        for offset, (status, value) in pairs:
            error = None if status == ser.RAISED else ser.pickling_error(value)  # Raised is plain data
            if error is not None and not isinstance(error, Exception):
                # Pickling the value raised SystemExit or the like: the item's outcome, as
                # ProcessPoolExecutor reports it.
                value, status = ser.encode_exception(error), ser.RAISED
            elif error is not None:
                value, status = (
                    SerializationError(
                        f"the result of item {self.start + offset} ({ser.describe(value)}, a "
                        f"{type(value).__name__}) cannot be sent back: {ser.why(error)}. "
                        "Return plain data (numbers, strings, arrays, dicts) instead.",
                        index=self.start + offset,
                    ),
                    ser.FAILED,
                )
            if status == ser.OK:
                kept_offsets.append(offset)
                kept_values.append(value)
            else:
                problems[offset] = (status, value)
        return pack((kept_offsets, kept_values, problems))
