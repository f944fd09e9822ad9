"""nbparallel: parallel work from a Jupyter notebook, through a small sidecar process.

The kernel never forks: a sidecar started with ``subprocess`` owns the workers, and functions
defined in the notebook travel by value (cloudpickle). See README.md and docs/.

Names are imported lazily, so ``python -m nbparallel.sidecar`` and the workers stay light. The
joblib backend (``backend="nbparallel"``) registers itself when joblib is imported (joblib_hook.py).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "map",
    "imap",
    "submit",
    "Executor",
    "configure",
    "status",
    "shutdown",
    "last_results",
    "share",
    "shared_array",
    "NbParallelError",
    "TaskError",
    "RemoteTraceback",
    "details",
    "WorkerCrashed",
    "InitializerFailed",
    "MemoryLimitExceeded",
    "TaskTimeout",
    "SidecarDied",
    "ClusterUnavailable",
    "SerializationError",
    "Interrupted",
    "register_joblib",
    "load_ipython_extension",
    "unload_ipython_extension",
]

_WHERE = {
    "map": "api",
    "imap": "api",
    "configure": "api",
    "status": "api",
    "shutdown": "api",
    "last_results": "api",
    "submit": "futures",
    "Executor": "futures",
    "share": "payload.shared",
    "shared_array": "payload.shared",
    "register_joblib": "joblib_hook",
    # IPython is imported only when IPython itself asks for these (``%load_ext nbparallel``).
    "load_ipython_extension": "cellmagic.magics",
    "unload_ipython_extension": "cellmagic.magics",
    "WorkerCrashed": "crashes",
    "MemoryLimitExceeded": "crashes",
    "InitializerFailed": "crashes",
    **{name: "errors" for name in ("NbParallelError", "TaskError", "RemoteTraceback", "details", "TaskTimeout",
                                   "SidecarDied", "ClusterUnavailable", "SerializationError", "Interrupted")},
}

if TYPE_CHECKING:
    from .api import configure, imap, last_results, map, shutdown, status
    from .crashes import InitializerFailed, MemoryLimitExceeded, WorkerCrashed
    from .errors import (ClusterUnavailable, Interrupted, NbParallelError, RemoteTraceback, SerializationError,
                         SidecarDied, TaskError, TaskTimeout, details)
    from .futures import Executor, submit
    from .joblib_hook import register_joblib
    from .payload.shared import share, shared_array
    from .cellmagic.magics import load_ipython_extension, unload_ipython_extension


def __getattr__(name: str) -> Any:
    if name == "checkpoint":  # a submodule: nbparallel.checkpoint.load(path) without importing it first
        return importlib.import_module(".checkpoint", __name__)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'nbparallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def _watch_for_joblib() -> None:
    # Only in the caller's process: the sidecar, the bridge and the workers import this package
    # too (their environment names their role), and have no business registering with joblib.
    if os.environ.get("NBPARALLEL_ROLE"):  # config.ROLE_ENV, not imported: this module stays tiny
        return
    from . import joblib_hook  # stdlib only; it imports the backend once joblib is imported

    joblib_hook.install()


_watch_for_joblib()
