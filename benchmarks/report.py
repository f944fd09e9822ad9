"""Plain-text tables and the "÷best" ratios every scenario prints.

Ratio convention (the same in every table): the row's cost divided by the best peer's cost, where
cost is time, memory, or time per item, and "the best peer" is the lowest cost among the peers,
nbparallel's own rows and reference rows (serial, shared-memory limit) left out. 1.00x is the best
peer itself, 2.00x twice as slow (or twice the memory), 0.50x twice as good as the best peer.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from .harness import Outcome

MISSING = "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-align the first column, right-align the rest. A last column named "note" is dropped
    when no row fills it, and left-aligned when one does."""
    if headers and headers[-1] == "note":
        if all(len(row) < len(headers) or row[-1] is None for row in rows):
            headers = headers[:-1]
            rows = [row[: len(headers)] for row in rows]
        else:
            rows = [list(row) + [None] * (len(headers) - len(row)) for row in rows]
    cells = [[str(h) for h in headers]] + [[MISSING if c is None else str(c) for c in row] for row in rows]
    if headers[-1] == "note":
        for row, source in zip(cells[1:], rows):
            row[-1] = "" if source[-1] is None else str(source[-1])
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    noted = headers[-1] == "note"

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        if noted:
            rest[-1] = row[-1].ljust(widths[-1])
        return "  ".join([first, *rest]).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells[1:])
    return "\n".join(out)


def ratios(costs: dict[str, float | None], reference: Collection[str] = ()) -> dict[str, float | None]:
    """Each name's cost divided by the best peer's: the lowest cost among names that are neither
    nbparallel rows (names starting with "nbparallel") nor in ``reference``."""
    peers = [c for n, c in costs.items()
             if not n.startswith("nbparallel") and n not in reference and c is not None and c > 0]
    best = min(peers) if peers else None
    return {name: None if cost is None or best is None else cost / best for name, cost in costs.items()}


def seconds(value: float | None) -> str | None:
    if value is None:
        return None
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def rate(items: int, secs: float | None) -> str | None:
    if not secs:
        return None
    per_s = items / secs
    if per_s >= 1e6:
        return f"{per_s / 1e6:.2f} M/s"
    if per_s >= 1e3:
        return f"{per_s / 1e3:.1f} k/s"
    return f"{per_s:.0f} /s"


def mib(value: float | None) -> str | None:
    return None if value is None else f"{value / 2**20:.1f} MiB"


def times(value: float | None) -> str | None:
    """A ratio, marked so it can't be mistaken for seconds."""
    return None if value is None else f"{value:.2f}x"


def status_note(outcome: Outcome) -> str | None:
    """A short note for a row whose child did not finish cleanly, or left processes behind."""
    notes = []
    if outcome.status == "error":
        notes.append(f"error: {str(outcome.data.get('error', ''))[:70]}")
    elif outcome.status != "ok":
        notes.append(outcome.status)
    if outcome.leaked:
        notes.append(f"{len(outcome.leaked)} process(es) left behind, killed")
    return "; ".join(notes) or None


def failed_row(label: str, outcome: Outcome, columns: int) -> list[Any]:
    """A row of dashes with the reason in the last ("note") column."""
    return [label, *([None] * (columns - 2)), status_note(outcome)]
