"""The progress widget in a real browser: JupyterLab 4 and Notebook 7, in Debian's headless Chromium.

JupyterLab runs examples/progress_demo.ipynb; the test reads the bar, the counts, the worker lanes
and the failure list from the DOM while the first call runs and after every call ends, clicks Cancel
on the background job and checks that it stopped. Screenshots go to test-output/browser/.
Without Chromium (or Playwright, JupyterLab, Notebook) these tests skip, except in CI, where the
browser is installed on purpose (scripts/install_browser.sh) and its absence is a failure.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from _browser import OUTPUT, READ_WIDGETS, JupyterServer, launch_chromium, require_browser
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "progress_demo.ipynb"
SHOTS = OUTPUT / "browser"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
# The demo's background job runs 10 s x SCALE; 3 makes it 30 s, far longer than a cancel should take.
SCALE = "3"
WAIT_MS = 90_000  # a busy 2-core machine can take a while to start a kernel

# browser: CI's lighter legs run -m "not browser and not dask"
pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]


@pytest.fixture
def browser() -> Iterator[Any]:
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[JupyterServer]:
    require_browser()
    shutil.copy(DEMO, tmp_path / DEMO.name)  # a copy: JupyterLab edits and may autosave what it opens
    jupyter = JupyterServer(tmp_path, {"NBPARALLEL_DEMO_SCALE": SCALE})
    jupyter.start()
    try:
        yield jupyter
    finally:
        jupyter.stop()


def open_page(browser: Any, jupyter: JupyterServer, path: str, height: int = 900) -> tuple[Any, list[str]]:
    """A page showing ``path``, once its kernel is idle; also the list its script errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"{error}\n{getattr(error, 'stack', '')}"))
    page.goto(jupyter.url(path))
    page.wait_for_selector(".jp-Notebook", timeout=WAIT_MS)
    # Works in JupyterLab and Notebook 7 alike (both run with expose_app_in_browser).
    page.wait_for_function(
        "() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'",
        timeout=WAIT_MS)
    return page, errors


def run_all(page: Any) -> None:
    # Not awaited: the command's promise resolves only when every cell has finished.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def widgets(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate(READ_WIDGETS))


def wait_state(page: Any, position: int, states: tuple[str, ...]) -> dict[str, Any]:
    page.wait_for_function(
        f"() => {list(states)!r}.includes(document.querySelectorAll('.nbp-progress')[{position}]?.dataset.state)",
        timeout=WAIT_MS)
    return widgets(page)[position]


def our_errors(errors: list[str]) -> list[str]:
    # Notebook 7.6 itself throws one "reading 'schema'" error while loading its settings; not ours.
    return [error for error in errors if "/static/notebook/" not in error]


def tidy(page: Any) -> None:
    """Code and the file browser out of the way, so the widgets fill the screenshot."""
    page.evaluate("""async () => {
        const app = window.jupyterapp;
        await app.commands.execute('notebook:hide-all-cell-code');
        if (app.shell.leftCollapsed === false) await app.commands.execute('application:toggle-left-area');
    }""")


def watch_first_call(page: Any) -> tuple[list[int], list[str], dict[str, Any]]:
    """Sample the first widget until its call ends: finished counts seen, busy lanes seen, and the
    widget as it was when the running screenshot was taken."""
    page.wait_for_function("() => document.querySelector('.nbp-progress')?.dataset.state === 'running'",
                           timeout=WAIT_MS)
    counts: list[int] = []
    busy: list[str] = []
    snapped: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        first = widgets(page)[0]
        if first["state"] != "running":
            break
        finished = first["done"] + first["failed"]
        if not counts or counts[-1] != finished:
            counts.append(finished)
        busy += [lane["what"] for lane in first["lanes"] if str(lane["what"]).startswith("item ")]
        if not snapped and finished >= 25 and any(str(lane["what"]).startswith("item ") for lane in first["lanes"]):
            page.locator(".nbp-progress").first.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "lab-running.png"))
            page.locator(".nbp-progress").first.screenshot(path=str(SHOTS / "widget-running.png"))
            snapped = first
        page.wait_for_timeout(100)
    return counts, busy, snapped


def test_jupyterlab_shows_live_progress_and_cancels(server: JupyterServer, browser: Any) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page, errors = open_page(browser, server, "/lab/tree/progress_demo.ipynb?reset")
    tidy(page)
    run_all(page)

    # While the first call runs: the counts climb, the lanes name the items being worked on.
    counts, busy, running = watch_first_call(page)
    assert len(counts) >= 4 and counts == sorted(counts), counts
    assert busy, "no lane ever showed the item it was running"
    assert running, "the widget never showed a running state with busy lanes to photograph"
    assert running["badge"] == "running" and running["total"] == 100
    assert 0 < float(running["bar"].rstrip("%")) < 100, running["bar"]
    assert "ETA" in running["time"] and running["rate"].endswith("/s"), running

    # At its end: 95 values, 5 failures (4 raised, 1 worker killed), listed with tracebacks.
    first = wait_state(page, 0, ("done",))
    assert (first["done"], first["failed"], first["total"]) == (95, 5, 100)
    assert first["percent"] == "100%" and first["bar"] == "95%" and first["barFailed"] == "5%"
    assert first["tone"] == "warn" and first["badge"] == "done, with failures"
    assert first["summary"].startswith("100 items in ") and first["summary"].endswith("· 2 workers · 5 failed")
    assert [error["where"] for error in first["errors"]] == ["item 7", "item 32", "item 42", "item 57", "item 82"]
    assert first["errors"][0]["message"] == "ValueError: 7 is out of range"
    assert "in measure" in first["errors"][0]["traceback"]
    assert first["errors"][2]["message"].startswith("WorkerCrashed:")
    assert any(lane["restarts"] == "↻1" and "crashed on item 42" in lane["title"] for lane in first["lanes"])
    assert first["lanesTitle"] == "workers · 0 busy of 2"
    assert "[item 20] checkpoint at 20" in first["output"]

    # The failure list opens, and each failure opens onto its remote traceback.
    widget = page.locator(".nbp-progress").first
    widget.locator(".nbp-errors > summary").click()
    widget.locator(".nbp-error summary").first.click()
    traceback = widget.locator(".nbp-traceback").first
    assert traceback.is_visible() and "ValueError: 7 is out of range" in traceback.inner_text()
    widget.locator(".nbp-output > summary").click()
    assert widget.locator(".nbp-output-lines").is_visible()
    widget.locator(".nbp-lanes-box > summary").click()  # closed at the end; open it for the picture
    widget.screenshot(path=str(SHOTS / "widget-finished.png"))

    # The call that stops at its first error stays red.
    second = wait_state(page, 1, ("failed",))
    assert second["tone"] == "bad" and second["badge"] == "failed"
    assert second["failed"] == 1 and [e["message"] for e in second["errors"]] == ["KeyError: 30"]
    assert second["summary"].startswith("failed after ")

    # The background job: Cancel stops it long before its 30 s are up.
    page.wait_for_function(
        "() => { const w = document.querySelectorAll('.nbp-progress')[2];"
        " return w && w.offsetParent !== null && !w.querySelector('.nbp-cancel').hidden; }", timeout=WAIT_MS)
    background = page.locator(".nbp-progress").nth(2)
    background.scroll_into_view_if_needed()
    clicked = time.monotonic()
    background.locator(".nbp-cancel").click()
    third = wait_state(page, 2, ("cancelled", "done", "failed"))
    page.wait_for_selector(".jp-OutputArea-output >> text=background: cancelled", timeout=WAIT_MS)
    took = time.monotonic() - clicked
    assert third["state"] == "cancelled" and third["tone"] == "muted" and not third["cancelShown"]
    assert third["summary"].startswith("cancelled after 0 of 1 task")
    assert took < 15, f"the background job took {took:.1f} s to stop after Cancel"
    workers_line = page.locator(".jp-OutputArea-output >> text=workers:").inner_text()
    assert "busy" not in workers_line, workers_line

    page.set_viewport_size({"width": 1280, "height": 1400})
    page.locator(".nbp-progress").first.scroll_into_view_if_needed()
    page.wait_for_timeout(400)
    page.screenshot(path=str(SHOTS / "lab-finished.png"))
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_timeout(1200)
    page.screenshot(path=str(SHOTS / "lab-finished-dark.png"))
    assert our_errors(errors) == []
    page.close()


def test_notebook7_renders_the_widget(server: JupyterServer, browser: Any, tmp_path: Path) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    source = (
        "import time\nimport nbparallel\n\n\ndef slow(x):\n    time.sleep(0.1)\n    return x\n\n\n"
        "values = nbparallel.map(slow, range(40), workers=2)\nprint('sum', sum(values))"
    )
    notebook = new_notebook(cells=[new_code_cell(source)], metadata={"kernelspec": KERNELSPEC})  # type: ignore[no-untyped-call]
    nbformat.write(notebook, str(tmp_path / "nb7_check.ipynb"))  # type: ignore[no-untyped-call]
    page, errors = open_page(browser, server, "/notebooks/nb7_check.ipynb", height=600)
    run_all(page)
    page.wait_for_function("() => document.querySelector('.nbp-progress')?.dataset.state === 'running'",
                           timeout=WAIT_MS)
    final = wait_state(page, 0, ("done",))
    page.wait_for_selector(".jp-OutputArea-output >> text=sum 780", timeout=WAIT_MS)
    assert (final["done"], final["failed"], final["total"]) == (40, 0, 40)
    assert final["tone"] == "ok" and final["percent"] == "100%" and final["bar"] == "100%"
    assert final["summary"].startswith("40 items in ") and final["summary"].endswith("· 2 workers")
    assert len(final["lanes"]) == 2 and sum(int(lane["title"].split(" · ")[-1].split()[0]) for lane in final["lanes"]) == 40
    page.screenshot(path=str(SHOTS / "notebook7-finished.png"))
    assert our_errors(errors) == []
    page.close()
