"""The progress display in a real browser: JupyterLab 4 and Notebook 7, in Debian's headless Chromium.

JupyterLab runs examples/progress_demo.ipynb. While the first call runs, the test reads the bar, the
counts and the worker lanes from the DOM, checks that the widget sits at the top of its cell's
output with the workers' lines below it, and opens a failure's traceback; when the call ends, the
static rendering that replaces the widget must keep that traceback open. The sweep cell's runs
plot in the workers, and their figures appear in the cell, tagged by parameters. Cancel stops the
background job. The notebook saved from the browser holds no widget view, and opened again in a
server where no kernel can start (JupyterLab and Notebook 7, untrusted) it still shows every result.
Screenshots go to test-output/browser/. Without Chromium (or Playwright, JupyterLab, Notebook)
these tests skip, except in CI, where the browser is installed on purpose (scripts/install_browser.sh)
and its absence is a failure.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from _browser import OUTPUT, READ_DISPLAYS, JupyterServer, launch_chromium, require_browser
from _notebooks import load_runner
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "progress_demo.ipynb"
SHOTS = OUTPUT / "browser"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
# The demo's background job runs 10 s x SCALE; 3 makes it 30 s, far longer than a cancel should take.
SCALE = "3"
WAIT_MS = 90_000  # a busy 2-core machine can take a while to start a kernel
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# The demo's code cells, by their place among all its cells (markdown cells count).
MEASURE, FRAGILE, SWEEP, BACKGROUND = 3, 5, 7, 9

# browser: CI's lighter legs run -m "not browser and not dask"
pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


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
    # PROGRESS_AFTER 0: the sweep's display shows however quick its runs are (with compiled modules
    # cached, its four figures take under the default second, and a call that quick shows none)
    jupyter = JupyterServer(tmp_path, {"NBPARALLEL_DEMO_SCALE": SCALE, "NBPARALLEL_DEMO_PROGRESS_AFTER": "0"},
                            save_widget_state=True)
    jupyter.start()
    try:
        yield jupyter
    finally:
        jupyter.stop()


def open_page(browser: Any, jupyter: JupyterServer, path: str, height: int = 900, *,
              kernel: bool = True) -> tuple[Any, list[str]]:
    """A page showing ``path`` (once its kernel is idle, or with no kernel at all); also the list its
    script errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"{error}\n{getattr(error, 'stack', '')}"))
    page.goto(jupyter.url(path))
    page.wait_for_selector(".jp-Notebook", timeout=WAIT_MS)
    if kernel:
        # Works in JupyterLab and Notebook 7 alike (both run with expose_app_in_browser).
        page.wait_for_function(
            "() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'",
            timeout=WAIT_MS)
    else:  # "Select Kernel": its default answer is No Kernel
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=WAIT_MS)
        page.wait_for_selector(".jp-Dialog", state="detached", timeout=WAIT_MS)
    return page, errors


def run_all(page: Any) -> None:
    # Not awaited: the command's promise resolves only when every cell has finished.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def displays(page: Any) -> list[dict[str, Any]]:
    return list(page.evaluate(READ_DISPLAYS))


def in_cell(page: Any, cell: int) -> dict[str, Any] | None:
    return next((shown for shown in displays(page) if shown["cell"] == cell), None)


def wait_static(page: Any, cell: int) -> dict[str, Any]:
    """The static rendering that replaced the widget in ``cell`` once its call ended."""
    page.wait_for_function(
        f"() => document.querySelectorAll('.jp-Notebook .jp-Cell')[{cell}]?.querySelector('.nbp-static')",
        timeout=WAIT_MS)
    shown = in_cell(page, cell)
    assert shown is not None and shown["kind"] == "static"
    return shown


def cell_text(page: Any, cell: int) -> str:
    return str(page.evaluate(
        f"() => document.querySelectorAll('.jp-Notebook .jp-Cell')[{cell}].querySelector('.jp-OutputArea')"
        "?.textContent ?? ''"))


def our_errors(errors: list[str]) -> list[str]:
    # Notebook 7.6 itself throws one "reading 'schema'" error while loading its settings; not ours.
    return [error for error in errors if "/static/notebook/" not in error]


def tidy(page: Any) -> None:
    """Code and the file browser out of the way, so the displays fill the screenshot."""
    page.evaluate("""async () => {
        const app = window.jupyterapp;
        await app.commands.execute('notebook:hide-all-cell-code');
        if (app.shell.leftCollapsed === false) await app.commands.execute('application:toggle-left-area');
    }""")


def watch_first_call(page: Any) -> tuple[list[int], list[str], dict[str, Any], dict[str, Any]]:
    """Follow the first call until its widget is replaced: the finished counts seen, the busy lanes
    seen, the widget when the running screenshot was taken, and its last frame."""
    page.wait_for_function("() => document.querySelector('.nbp-progress')?.dataset.state === 'running'",
                           timeout=WAIT_MS)
    counts: list[int] = []
    busy: list[str] = []
    snapped: dict[str, Any] = {}
    last: dict[str, Any] = {}
    opened = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        shown = in_cell(page, MEASURE)
        if shown is None or shown["kind"] != "live":
            break
        last = shown
        finished = shown["done"] + shown["failed"]
        if not counts or counts[-1] != finished:
            counts.append(finished)
        busy += [lane["what"] for lane in shown["lanes"] if str(lane["what"]).startswith("item ")]
        if not opened and shown["errors"]:
            # The user opens the first failure while the call runs: it must stay open to the end.
            page.locator(".nbp-progress").first.locator(".nbp-error summary").first.click()
            opened = True
        if not snapped and finished >= 25 and any(str(lane["what"]).startswith("item ") for lane in shown["lanes"]):
            page.locator(".nbp-progress").first.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "lab-running.png"))
            page.locator(".nbp-progress").first.screenshot(path=str(SHOTS / "widget-running.png"))
            snapped = shown
        page.wait_for_timeout(100)
    return counts, busy, snapped, last


def test_jupyterlab_live_progress_static_results_and_a_saved_file(server: JupyterServer, browser: Any) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page, errors = open_page(browser, server, "/lab/tree/progress_demo.ipynb?reset")
    tidy(page)
    run_all(page)

    # While the first call runs: the counts climb, the lanes name the items being worked on, and the
    # widget is the cell's first output, with the lines the workers print below it.
    counts, busy, running, last = watch_first_call(page)
    assert len(counts) >= 4 and counts == sorted(counts), counts
    assert busy, "no lane ever showed the item it was running"
    assert running, "the widget never showed a running state with busy lanes to photograph"
    assert running["badge"] == "running" and running["total"] == 100 and running["position"] == 0
    assert 0 < float(running["bar"].rstrip("%")) < 100, running["bar"]
    assert "ETA" in running["time"] and running["rate"].endswith("/s"), running

    # At its end: the widget became a static rendering of the final state, in the same place, with
    # what the user opened still open (the first failure's traceback).
    first = wait_static(page, MEASURE)
    assert (first["done"], first["failed"], first["total"]) == (95, 5, 100) and first["position"] == 0
    assert first["tone"] == "warn" and first["badge"] == "done, with failures" and first["percent"] == "100%"
    assert first["summary"].startswith("100 items in ") and first["summary"].endswith("· 2 workers · 5 failed")
    assert [error["where"] for error in first["errors"]] == ["item 7", "item 32", "item 42", "item 57", "item 82"]
    assert first["errors"][0]["message"] == "ValueError: 7 is out of range"
    assert first["errors"][2]["message"].startswith("WorkerCrashed:")
    assert first["errors"][0]["open"] and "in measure" in first["errors"][0]["traceback"]
    assert not any(error["open"] for error in first["errors"][1:])
    assert first["sections"]["errors"] and first["height"] >= 0.75 * last["height"], (first["height"], last["height"])
    assert page.locator(".nbp-static .nbp-traceback").first.is_visible()
    # Each printed line once, in the cell, under the display; no copy inside it.
    text = cell_text(page, MEASURE)
    assert text.count("[item 20] checkpoint at 20") == 1 and "5 of 100 items failed" in text
    assert text.index("100 items in") < text.index("[item 0] checkpoint at 0")
    page.locator(".jp-Cell").nth(MEASURE).locator(".nbp-lanes-box > summary").click()
    page.locator(".jp-Cell").nth(MEASURE).locator(".nbp-static").screenshot(path=str(SHOTS / "static-finished.png"))

    # The call that stops at its first error stays red.
    second = wait_static(page, FRAGILE)
    assert second["tone"] == "bad" and second["badge"] == "failed" and second["failed"] == 1
    assert [e["message"] for e in second["errors"]] == ["KeyError: 30"] and second["summary"].startswith("failed after ")

    # The sweep: each run's figure, drawn in a worker, in the cell under a line naming the run.
    sweep = wait_static(page, SWEEP)
    assert sweep["description"] == "%%parallel k × noise" and sweep["summary"].startswith("4 runs in ")
    page.wait_for_function(
        f"() => document.querySelectorAll('.jp-Notebook .jp-Cell')[{SWEEP}].querySelectorAll('.jp-OutputArea img').length === 4",
        timeout=WAIT_MS)
    tags = cell_text(page, SWEEP)
    assert all(f"[k={k}, noise=0.2]" in tags for k in (1, 2, 3, 4)), tags
    page.set_viewport_size({"width": 1280, "height": 1500})  # the four figures, one under the other
    page.locator(".jp-Cell").nth(SWEEP).locator(".nbp-static").scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    page.locator(".jp-Cell").nth(SWEEP).locator(".jp-Cell-outputWrapper").screenshot(path=str(SHOTS / "sweep-plots.png"))
    page.set_viewport_size({"width": 1280, "height": 900})

    # The background job: Cancel stops it long before its 30 s are up.
    page.wait_for_function(
        f"() => {{ const w = document.querySelectorAll('.jp-Notebook .jp-Cell')[{BACKGROUND}].querySelector('.nbp-progress');"
        " return w && w.offsetParent !== null && !w.querySelector('.nbp-cancel').hidden; }", timeout=WAIT_MS)
    background = page.locator(".jp-Cell").nth(BACKGROUND).locator(".nbp-progress")
    background.scroll_into_view_if_needed()
    live = in_cell(page, BACKGROUND)
    assert live is not None and live["counts"] == "" and live["percent"] == ""  # one task: no counts, no 0%
    clicked = time.monotonic()
    background.locator(".nbp-cancel").click()
    third = wait_static(page, BACKGROUND)
    page.wait_for_selector(".jp-OutputArea-output >> text=background: cancelled", timeout=WAIT_MS)
    took = time.monotonic() - clicked
    assert third["state"] == "cancelled" and third["tone"] == "muted" and not third["cancelShown"]
    assert third["summary"].startswith("cancelled after ") and "worker" not in third["summary"]
    assert took < 15, f"the background job took {took:.1f} s to stop after Cancel"
    workers_line = page.locator(".jp-OutputArea-output >> text=workers:").inner_text()
    assert "busy" not in workers_line, workers_line
    assert not any(shown["kind"] == "live" for shown in displays(page))  # every widget replaced

    page.set_viewport_size({"width": 1280, "height": 1400})
    page.locator(".jp-Cell").nth(MEASURE).scroll_into_view_if_needed()
    page.wait_for_timeout(400)
    page.screenshot(path=str(SHOTS / "lab-finished.png"))
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_timeout(1200)
    page.screenshot(path=str(SHOTS / "lab-finished-dark.png"))

    # Saved (widget state saving on): no widget view anywhere, the view's code at most once.
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=WAIT_MS)
    saved = json.loads((server.root / DEMO.name).read_text())
    outputs = [output for cell in saved["cells"] for output in cell.get("outputs", [])]
    assert not any(WIDGET_VIEW in output.get("data", {}) for output in outputs)
    pages = ["".join(output.get("data", {}).get("text/html", "")) for output in outputs]  # a string, or its lines
    assert sum('class="nbp-static"' in page for page in pages) == 4
    assert json.dumps(saved["metadata"]).count("function drawHead") <= 1
    assert our_errors(errors) == []
    page.close()


def test_a_saved_notebook_reads_without_a_kernel(browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo run headless (as nbconvert or papermill would), then opened where no kernel can
    start, untrusted, in JupyterLab and Notebook 7: every result is there, nothing says 'model not found'."""
    require_browser()
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO, tmp_path / DEMO.name)
    monkeypatch.setenv("NBPARALLEL_DEMO_SCALE", "0.2")
    run = load_runner().execute_notebook(tmp_path / DEMO.name)
    assert run.ok, run.failure
    nbformat.write(run.notebook, str(tmp_path / DEMO.name))  # type: ignore[no-untyped-call]
    jupyter = JupyterServer(tmp_path, kernels=False)
    jupyter.start()
    try:
        for name, path in (("lab", f"/lab/tree/{DEMO.name}?reset"), ("notebook7", f"/notebooks/{DEMO.name}")):
            page, errors = open_page(browser, jupyter, path, height=1100, kernel=False)
            page.wait_for_selector(".nbp-static", timeout=WAIT_MS)
            status = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session?.kernel ?? null")
            assert status is None  # read as a reader would: no kernel
            shown = displays(page)
            # (the sweep's display shows only if it ran past a second: that depends on the machine)
            by_cell = {s["cell"]: s for s in shown if s["cell"] != SWEEP}
            assert sorted(by_cell) == [MEASURE, FRAGILE, BACKGROUND] and all(s["kind"] == "static" for s in shown)
            first = by_cell[MEASURE]
            assert first["badge"] == "done, with failures" and first["counts"] == "100 / 100"
            assert first["summary"].endswith("· 2 workers · 5 failed") and len(first["errors"]) == 5
            assert first["errors"][0]["message"] == "ValueError: 7 is out of range" and not first["errors"][0]["open"]
            assert by_cell[FRAGILE]["badge"] == "failed" and by_cell[BACKGROUND]["summary"].startswith("done in ")
            body = page.evaluate("() => document.querySelector('.jp-Notebook').textContent")
            assert "Error displaying widget" not in body and "model not found" not in body
            assert page.locator(".jp-Cell").nth(SWEEP).locator(".jp-OutputArea img").count() == 4
            page.locator(".jp-Cell").nth(MEASURE).scroll_into_view_if_needed()
            page.wait_for_timeout(300)
            page.screenshot(path=str(SHOTS / f"saved-{name}-no-kernel.png"))
            assert our_errors(errors) == []
            page.close()
    finally:
        jupyter.stop()


def test_notebook7_shows_the_widget_then_the_static_result(server: JupyterServer, browser: Any, tmp_path: Path) -> None:
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
    final = wait_static(page, 0)
    page.wait_for_selector(".jp-OutputArea-output >> text=sum 780", timeout=WAIT_MS)
    assert (final["done"], final["failed"], final["total"]) == (40, 0, 40) and final["position"] == 0
    assert final["tone"] == "ok" and final["percent"] == "100%" and float(final["bar"].rstrip("%")) == 100
    assert final["summary"].startswith("40 items in ") and final["summary"].endswith("· 2 workers")
    assert len(final["lanes"]) == 2 and sum(int(lane["what"].split(" done")[0].split(" · ")[-1])
                                            for lane in final["lanes"]) == 40
    page.screenshot(path=str(SHOTS / "notebook7-finished.png"))
    assert our_errors(errors) == []
    page.close()
