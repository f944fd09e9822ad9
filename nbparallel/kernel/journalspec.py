"""What ``checkpoint=`` asks for (``Checkpoint``), and the errors of a journal that cannot be used as asked.

Here so that journal.py holds the journal itself; both are imported from there as well.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import NbParallelError
from .identity import FunctionId

ON_CHANGE = ("error", "restart", "keep")


class CheckpointError(NbParallelError):
    """The journal of a checkpointed call cannot be used as asked."""


class CheckpointBusy(CheckpointError):
    """Another sweep is writing this journal now (in this process or another)."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The journal holds results of a different function; ``on_change=`` says what to do."""

    def __init__(self, message: str, *, stored: str, current: str) -> None:
        super().__init__(message)
        self.stored = stored
        self.current = current


@dataclass(frozen=True)
class Checkpoint:
    """Where a sweep keeps its journal, and what to do with what it finds there.

    ``on_change``: when the function differs from the one that wrote the journal, ``"error"``
    (the default) raises ``CheckpointMismatch``; ``"restart"`` deletes the old results and starts
    over; ``"keep"`` keeps them and runs only the missing items with the new function.
    ``rerun_failed``: run the items that failed last time again (the default), or keep their failure.
    """

    path: str | os.PathLike[str]
    on_change: str = "error"
    rerun_failed: bool = True

    def __post_init__(self) -> None:
        if self.on_change not in ON_CHANGE:
            raise ValueError(f'on_change must be "error", "restart" or "keep", got {self.on_change!r}')
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise TypeError(f"a checkpoint is a file path, got {self.path!r}")


def as_checkpoint(value: Any) -> Checkpoint:
    """``checkpoint=`` as given (a path or a Checkpoint) made a Checkpoint."""
    return value if isinstance(value, Checkpoint) else Checkpoint(value)


def mismatch(shown: str, name: str, stored: str, fid: FunctionId, count: int, last: float | None) -> CheckpointMismatch:
    """The error for a journal (``shown`` as the caller wrote its path) whose ``count`` results were made by
    another function (``name``, digest ``stored``) than ``fid``'s; ``last``: when the newest one finished."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last)) if last else "?"
    return CheckpointMismatch(
        f"the checkpoint {shown!r} holds {count:,} results of a different function: {name} (digest {stored[:8]}, "
        f"last result {when}); this call's {fid.name} is not the same (digest {fid.digest[:8]}): its code, a "
        "default, its closure or a global it reads changed. Choose one: pass "
        f"checkpoint=nbparallel.checkpoint.Checkpoint({shown!r}, on_change=\"restart\") to start over (the old "
        "results are deleted), on_change=\"keep\" to keep the old results and run only the missing items with this "
        "function, or give a new path (in %%parallel: --on-change restart|keep, or another --checkpoint).",
        stored=stored, current=fid.digest)
