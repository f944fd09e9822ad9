"""The widget's JavaScript helpers, tested by Node's own test runner (``node --test js/``).

Running them from pytest puts them under the README's one test command. No Node here: skip, except
in CI (the CI variable set), where a missing Node must not pass silently.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from _browser import in_ci

pytestmark = pytest.mark.browser  # Node comes with the browser (scripts/install_browser.sh)

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "js"


def test_js_helpers_pass_node_tests() -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        message = "node is not installed, so the JavaScript tests in js/ cannot run (apt-get install -y nodejs)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tests = sorted(str(path) for path in JS.glob("*.test.js"))
    assert tests, "no js/*.test.js files"
    # Files named explicitly: how `node --test DIR` searches a folder differs between Node versions.
    done = subprocess.run([node, "--test", *tests], cwd=ROOT, capture_output=True, text=True, timeout=60)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "# fail 0" in report and "# pass 0" not in report, report


def test_widget_module_parses() -> None:
    """progress.js (the view, which Node cannot render) at least parses as a module."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    done = subprocess.run([node, "--check", str(JS / "progress.js")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
