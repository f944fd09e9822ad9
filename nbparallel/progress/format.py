"""Numbers as the progress displays write them; the same formats as js/format.js, so the widget
and the text bar read alike."""

from __future__ import annotations


def format_count(n: int | None) -> str:
    """``1,234``."""
    return "?" if n is None else f"{n:,}"


def format_duration(seconds: float | None) -> str:
    """``0.4 s``, ``12.3 s``, ``1:05``, ``1:02:03`` (as formatDuration in js/format.js)."""
    if seconds is None or seconds < 0:
        return "–"
    if seconds < 60 and f"{seconds:.1f}" != "60.0":
        return f"{seconds:.1f} s"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_eta(seconds: float | None) -> str:
    """Whole seconds left; ``–`` when unknown."""
    if seconds is None or seconds < 0 or seconds != seconds:
        return "–"
    if seconds >= 86400:
        return "> 1 day"
    if seconds < 1:
        return "< 1 s"
    whole = round(seconds)
    return f"{whole} s" if whole < 60 else format_duration(whole)


def format_rate(per_second: float | None) -> str:
    """``1,234/s``, ``85.2/s``, ``0.50/s``, or per minute below 0.1/s."""
    if not per_second or per_second <= 0:
        return "–"
    if per_second >= 100:
        return f"{round(per_second):,}/s"
    if per_second >= 10:
        return f"{per_second:.1f}/s"
    if per_second >= 0.1:
        return f"{per_second:.2f}/s"
    return f"{per_second * 60:.1f}/min"


def format_bytes(n: int | None) -> str:
    """``812 KiB``, ``52 MiB``, ``1.4 GiB``; empty when not sampled yet (as formatBytes in js/format.js)."""
    if not n or n <= 0:
        return ""
    value, unit = float(n), 0
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    shown = str(round(value)) if value >= 10 or unit == 0 else f"{value:.1f}"
    return f"{shown} {units[unit]}"


def percent(finished: int, total: int | None) -> int | None:
    """Whole percent done, rounded, but never 100 before every item has an outcome nor 0 after the
    first (as percentLabel in js/format.js): 1 of 6 is 17%, 999 of 1,000 is 99%."""
    if total is None or total < 0:
        return None
    if total == 0 or finished >= total:
        return 100
    whole = int(100 * finished / total + 0.5)  # halves up, as Math.floor(x + 0.5) in JavaScript
    return max(1 if finished > 0 else 0, min(99, whole))


def percent_label(done: int, failed: int, total: int | None) -> str:
    """``17%``; empty while the total is unknown."""
    whole = percent(done + failed, total)
    return "" if whole is None else f"{whole}%"
