"""Register the joblib backend when joblib is imported, without importing joblib ourselves.

``import nbparallel`` must stay light (the sidecar and every worker import the package), so it
cannot import joblib to register a backend with it. Instead ``install()`` puts a small finder at the
front of ``sys.meta_path`` that watches for ``joblib.parallel`` (joblib's own ``__init__`` imports
it): once that module has run, ``joblib_backend.register()`` is called, and the finder removes
itself. If joblib was imported before nbparallel, registration happens at once. Either way
``joblib.parallel_config(backend="nbparallel")`` works after ``import nbparallel``, in any order.
``nbparallel.register_joblib()`` does the same explicitly.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importlib.abc alone costs every sidecar and worker start ~10 ms: duck typing instead
    import types
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec

WATCHED = "joblib.parallel"


def register_joblib() -> None:
    """Make ``joblib.parallel_config(backend="nbparallel")`` available now (imports joblib).

    ``import nbparallel`` already arranges this for when joblib is imported; call it to be explicit.
    """
    from .joblib_backend import register  # it imports joblib: only when joblib is used

    register()
    _uninstall()


class _Loader:
    """Runs the real loader, then registers our backend with the module it made."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def create_module(self, spec: ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self.real.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        self.real.exec_module(module)
        _uninstall()
        try:
            register_joblib()
        except Exception as exc:  # an unexpected joblib must not break importing it
            print(f"nbparallel: could not register the joblib backend: {type(exc).__name__}: {exc}",
                  file=sys.stderr)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package...: the real loader's
        return getattr(self.real, name)


class _Watcher:
    """A meta path finder (the protocol, not the ABC) that finds nothing itself."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> ModuleSpec | None:
        if fullname != WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)  # type: ignore[assignment]  # a loader by protocol
                return spec
        return None


_watcher = _Watcher()


def install() -> None:
    """Register now if joblib is loaded, else when it is (called by ``import nbparallel``)."""
    if WATCHED in sys.modules:
        try:
            register_joblib()
        except Exception:  # a joblib too old or half-imported: the explicit call still says why
            pass
    elif _watcher not in sys.meta_path:
        sys.meta_path.insert(0, _watcher)


def _uninstall() -> None:
    try:
        sys.meta_path.remove(_watcher)
    except ValueError:
        pass
