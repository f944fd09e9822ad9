"""Where a worker's printed lines go: the cell that started the call, or this process's stdout/stderr.

Worker output reaches the kernel on the client's reader thread. ipykernel 7 routes output from a
thread to the most recent cell unless told otherwise, so in a kernel we capture the parent header of
the cell when the call starts and publish each stream message with that parent explicitly. IPython is
never imported here: we only look at what the process already loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

Sink = Callable[[str, str], None]  # (stream name, text)


def kernel_shell() -> Any:
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return None
    try:
        shell = ipython.get_ipython()
    except Exception:
        return None
    if shell is None or getattr(shell, "kernel", None) is None:
        return None
    return shell


def current_parent(shell: Any) -> dict[str, Any] | None:
    attempts: list[tuple[Any, tuple[Any, ...]]] = [
        (getattr(shell, "get_parent", None), ()),  # ipykernel 7
        (getattr(shell.kernel, "get_parent", None), ("shell",)),  # ipykernel 6
    ]
    for getter, args in attempts:
        try:
            parent = getter(*args) if getter is not None else None
        except Exception:
            continue
        if parent:
            return dict(parent)
    parent = getattr(shell, "parent_header", None)
    return dict(parent) if parent else None


def capture_sink() -> Sink:
    """A sink bound to the place output belongs to now (the running cell, or std streams)."""
    shell = kernel_shell()
    if shell is not None:
        parent = current_parent(shell)
        kernel = shell.kernel
        if parent is not None and hasattr(kernel, "session") and hasattr(kernel, "iopub_socket"):

            def to_cell(stream: str, text: str) -> None:
                name = "stderr" if stream == "stderr" else "stdout"
                kernel.session.send(
                    kernel.iopub_socket,
                    "stream",
                    {"name": name, "text": text},
                    parent=parent,
                    ident=f"stream.{name}".encode(),
                )

            return to_cell

    def to_std(stream: str, text: str) -> None:
        target = sys.stderr if stream == "stderr" else sys.stdout
        try:
            target.write(text)
            target.flush()
        except Exception:  # a closed stream at interpreter exit must not kill the reader
            pass

    return to_std


def tag_lines(text: str, index: int | None) -> str:
    """Prefix each line with the item that printed it: ``[item 3] ...``."""
    if index is None:
        return text
    prefix = f"[item {index}] "
    lines = text.splitlines(keepends=True)
    return "".join(prefix + line for line in lines)


def flush_std() -> None:
    """Flush the caller's own streams so its earlier prints come before the workers' lines."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
