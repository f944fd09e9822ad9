"""A finished call's display as plain HTML and text: what a saved notebook keeps.

When a call ends, its widget is replaced by this rendering of the final state (view.py), so the
notebook file holds an output every frontend can draw without a kernel or saved widget state:
JupyterLab, Notebook 7, VS Code, nbviewer and GitHub. No script, no external stylesheet: styles are
inline, each colour a JupyterLab theme variable with a fixed fallback, and the text alone (the head
line, the summary, the failures in ``<details>``) reads well where a sanitizer drops every style.

Hooks for the page and the tests: the root carries ``class="nbp-static"``, ``data-nbp-key`` (the
widget's key: its view restores what the user opened and scrolled onto this rendering) and
``data-state``/``data-done``/``data-failed``/``data-total``; each section ``data-nbp-section``.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from .format import format_bytes, format_count, format_duration, format_rate, percent_label

if TYPE_CHECKING:
    from .model import Snapshot

#: Failures listed one per line in the text/plain form (the HTML lists all the model kept).
TEXT_FAILURES = 10

# Colours: a theme variable where JupyterLab has one, after a plain fallback for a sanitizer that
# drops var() (JupyterLab's, for an untrusted notebook) and for frontends without the variables.
_COLOUR = {
    "ok": ("#388e3c", "--jp-success-color1"),
    "bad": ("#d32f2f", "--jp-error-color1"),
    "warn": ("#f57c00", "--jp-warn-color1"),
    "muted": ("#757575", "--jp-ui-font-color2"),
    "live": ("#1976d2", "--jp-brand-color1"),
    "text": ("#212121", "--jp-ui-font-color1"),
    "track": ("#e0e0e0", "--jp-layout-color3"),
    "border": ("#e0e0e0", "--jp-border-color2"),
    "code-bg": ("#f5f5f5", "--jp-layout-color2"),
}
# (background and padding: a frontend's own style for <code> in rendered HTML would box the text)
_MONO = "font-family:monospace;font-family:var(--jp-code-font-family,monospace);background:none;padding:0"


def _colour(prop: str, name: str) -> str:
    fallback, variable = _COLOUR[name]
    return f"{prop}:{fallback};{prop}:var({variable},{fallback})"


def tone(state: str, failed: int) -> str:
    """The colour of the whole display (as stateTone in js/format.js)."""
    if state == "done":
        return "warn" if failed > 0 else "ok"
    return {"failed": "bad", "cancelled": "muted"}.get(state, "live")


def badge(state: str, failed: int) -> str:
    """The word in the coloured badge."""
    return "done, with failures" if state == "done" and failed > 0 else state


def single_task(snap: Snapshot) -> bool:
    """One submitted task: no counts, percentages, rates or worker totals to show."""
    return snap.total == 1 and snap.unit == "tasks"


def counts_text(snap: Snapshot) -> str:
    """``423 / 1,000`` (as countsText in js/format.js); empty for a single task."""
    if single_task(snap):
        return ""
    finished = snap.done + snap.failed
    if snap.total is None:
        return f"{format_count(finished)} items"
    return f"{format_count(finished)} / {format_count(snap.total)}"


def head_text(snap: Snapshot) -> str:
    """The first line: description and summary (also the text/plain's first line)."""
    return f"{snap.description}: {snap.summary}" if snap.description else snap.summary


def text(snap: Snapshot) -> str:
    """The text/plain form: the head line, then one line per failure (the first few)."""
    lines = [head_text(snap)]
    for error in snap.errors[:TEXT_FAILURES]:
        lines.append(f"  {error['where']}: {error['message']}")
    hidden = snap.error_count - min(len(snap.errors), TEXT_FAILURES)
    if hidden > 0:
        lines.append(f"  ... and {format_count(hidden)} more failed")
    return "\n".join(lines)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bar(snap: Snapshot, colour: str) -> str:
    total = snap.total
    if single_task(snap) or total is None:
        done_pct, failed_pct = (100.0, 0.0) if snap.state != "running" else (0.0, 0.0)
    elif total == 0:
        done_pct, failed_pct = 100.0, 0.0
    else:
        done_pct = min(100.0, 100.0 * snap.done / total)
        failed_pct = min(100.0 - done_pct, 100.0 * snap.failed / total)
    done_colour = "ok" if colour in ("warn", "bad") else colour  # the part that succeeded stays green
    return (
        f'<div class="nbp-bar" style="display:flex;height:6px;margin:5px 0 3px;border-radius:3px;overflow:hidden;'
        f'{_colour("background", "track")}">'
        f'<div class="nbp-bar-done" style="width:{done_pct:.2f}%;{_colour("background", done_colour)}"></div>'
        f'<div class="nbp-bar-failed" style="width:{failed_pct:.2f}%;{_colour("background", "bad")}"></div>'
        "</div>"
    )


def _section(name: str, css_class: str, title: str, body: str, *, open_: bool, title_colour: str = "muted") -> str:
    return (
        f'<details class="{css_class}" data-nbp-section="{_esc(name)}" style="margin-top:3px"{" open" if open_ else ""}>'
        f'<summary style="cursor:pointer;font-size:11px;{_colour("color", title_colour)}">{_esc(title)}</summary>'
        f"{body}</details>"
    )


def _failures(snap: Snapshot) -> str:
    if snap.error_count == 0:
        return ""
    rows = []
    for error in snap.errors:
        index = error.get("index")
        key = f"error-{index}" if index is not None else f"error-{_esc(error['where'])}"
        rows.append(
            f'<li class="nbp-error" data-index="{"" if index is None else index}" style="margin:1px 0">'
            f'<details data-nbp-section="{key}"><summary style="cursor:pointer;display:flex;gap:8px;min-width:0">'
            f'<b class="nbp-error-where" style="white-space:nowrap">{_esc(error["where"])}</b> '
            f'<code class="nbp-error-msg" style="{_MONO};font-size:12px;overflow:hidden;text-overflow:ellipsis;'
            f'white-space:nowrap;{_colour("color", "bad")}">{_esc(error["message"])}</code>'
            "</summary>"
            f'<pre class="nbp-traceback" data-nbp-scroll="traceback-{key}" style="{_MONO};font-size:12px;white-space:pre-wrap;overflow-wrap:anywhere;'
            f'max-height:320px;overflow:auto;padding:4px 6px;margin:2px 0 4px;border-radius:3px;'
            f'{_colour("background", "code-bg")}">{_esc(error.get("traceback") or error["message"])}</pre>'
            "</details></li>"
        )
    listed = len(snap.errors)
    more = f" (first {format_count(listed)} listed)" if listed < snap.error_count else ""
    body = (f'<ol class="nbp-error-list" data-nbp-scroll="errors" style="margin:2px 0 0;padding-left:12px;'
            f'list-style:none;max-height:480px;overflow-y:auto">{"".join(rows)}</ol>')
    return _section("errors", "nbp-errors", f"{format_count(snap.error_count)} failed{more}", body, open_=True,
                    title_colour="bad")


def _lanes(snap: Snapshot) -> str:
    if not snap.lanes:
        return ""
    rows = []
    for position, lane in enumerate(snap.lanes):
        parts = [f"w{position + 1}", f"pid {lane.get('pid')}"]
        memory = format_bytes(lane.get("rss"))
        if memory:
            parts.append(memory)
        if lane.get("tasks") is not None:
            parts.append(f"{format_count(lane.get('tasks') or 0)} done")
        if lane.get("note"):
            parts.append(str(lane["note"]))
        rows.append(f'<div class="nbp-lane" data-pid="{_esc(lane.get("pid"))}">{_esc(" · ".join(parts))}</div>')
    body = f'<div class="nbp-lanes" style="margin:2px 0 0 12px;font-size:11px">{"".join(rows)}</div>'
    return _section("lanes", "nbp-lanes-box", f"workers · {len(snap.lanes)}", body, open_=False)


def html_text(snap: Snapshot, key: str = "") -> str:
    """The text/html form: head, bar, summary, failures (open, each traceback closed), workers."""
    colour = tone(snap.state, snap.failed)
    single = single_task(snap)
    head = [
        f'<span class="nbp-badge" style="font-size:11px;font-weight:600;text-transform:uppercase;'
        f'letter-spacing:0.04em;color:#fff;border-radius:3px;padding:0 6px;{_colour("background", colour)}">'
        f"{_esc(badge(snap.state, snap.failed))}</span>",
        f'<code class="nbp-desc" style="{_MONO};font-size:12px">{_esc(snap.description)}</code>',
    ]
    if not single:
        head.append(f'<b class="nbp-counts">{_esc(counts_text(snap))}</b>')
        label = percent_label(snap.done, snap.failed, snap.total)
        if label:
            head.append(f'<span class="nbp-pct" style="{_colour("color", "muted")}">{_esc(label)}</span>')
        head.append(f'<span class="nbp-rate" style="{_colour("color", "muted")}">{_esc(format_rate(snap.rate))}</span>')
    head.append(f'<span class="nbp-time" style="{_colour("color", "muted")}">{_esc(format_duration(snap.elapsed))}</span>')
    root_style = (
        "font-family:system-ui,sans-serif;font-family:var(--jp-ui-font-family,system-ui,sans-serif);"
        f"font-size:13px;line-height:1.4;max-width:880px;padding:6px 8px 6px 10px;border-radius:4px;"
        f"box-sizing:border-box;{_colour('color', 'text')};border:1px solid #e0e0e0;"
        f"border:1px solid var(--jp-border-color2,#e0e0e0);"
        f"border-left:3px solid {_COLOUR[colour][0]};border-left:3px solid var({_COLOUR[colour][1]},{_COLOUR[colour][0]})"
    )
    total = "" if snap.total is None else str(snap.total)
    return (
        f'<div class="nbp-static" data-nbp-key="{_esc(key)}" data-state="{_esc(snap.state)}" data-tone="{colour}" '
        f'data-done="{snap.done}" data-failed="{snap.failed}" data-total="{total}" style="{root_style}">'
        f'<div class="nbp-head" style="display:flex;align-items:center;gap:8px;flex-wrap:wrap">{" ".join(head)}</div>'
        f"{_bar(snap, colour)}"
        f'<div class="nbp-summary" style="font-weight:500">{_esc(snap.summary)}</div>'
        f"{_failures(snap)}{_lanes(snap)}"
        "</div>"
    )


def bundle(snap: Snapshot, key: str = "") -> dict[str, str]:
    """The final display's mime bundle: text/html and text/plain, nothing that needs a kernel."""
    return {"text/html": html_text(snap, key), "text/plain": text(snap)}
