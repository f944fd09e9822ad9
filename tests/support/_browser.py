"""Helpers for the real-browser tests: a private Jupyter server and Debian's Chromium via Playwright.

The server runs on 127.0.0.1 with a random port and token, and with its own config, data, runtime,
settings and IPython folders, so nothing from the machine's Jupyter setup leaks in. Its "python3"
kernelspec (in the private data folder, which Jupyter searches first) runs this interpreter, so the
kernel imports the nbparallel under test. Everything it started is stopped by ``stop``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

CHROMIUM = os.environ.get("NBPARALLEL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUTPUT = Path(__file__).resolve().parents[2] / "test-output"


def in_ci() -> bool:
    """True when the CI variable is set to anything but an explicit no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (run scripts/install_browser.sh, or apt-get install -y chromium)"
    for module, package in (("playwright", "playwright"), ("jupyterlab", "jupyterlab"), ("notebook", "notebook"),
                            ("anywidget", "anywidget")):
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed (pip install -e '.[test]')"
    return None


def require_browser() -> None:
    """Skip with the reason; but in CI, where the browser is installed on purpose, fail instead."""
    reason = missing()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"browser tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class JupyterServer:
    """A JupyterLab server (which also serves Notebook 7's pages) for one test."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None, *, kernels: bool = True,
                 save_widget_state: bool = False) -> None:
        self.root = root
        self.kernels = kernels  # False: no kernel can start (a notebook opened as a reader would)
        self.save_widget_state = save_widget_state  # JupyterLab's "Save Widget State Automatically"
        self.home = Path(tempfile.mkdtemp(prefix="nbp-jupyter-"))
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "server.log"
        self.env = self._environment(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        dirs = {name: self.home / name for name in ("config", "data", "runtime", "settings", "workspaces", "ipython")}
        for folder in dirs.values():
            folder.mkdir()
        spec = dirs["data"] / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--HistoryManager.hist_file=:memory:"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }))
        # No "get notified about Jupyter news?" toast over the screenshots.
        notices = dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notices.parent.mkdir(parents=True)
        notices.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        if self.save_widget_state:
            widgets = dirs["settings"] / "@jupyter-widgets" / "jupyterlab-manager" / "plugin.jupyterlab-settings"
            widgets.parent.mkdir(parents=True)
            widgets.write_text(json.dumps({"saveState": True}))
        env = dict(os.environ)
        env.update(JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
                   JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
                   JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
                   PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def start(self, timeout: float = 90) -> None:
        command = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--LabApp.expose_app_in_browser=True", "--JupyterNotebookApp.expose_app_in_browser=True",
            "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        if not self.kernels:  # only a kernelspec that does not exist is allowed: none can start
            command.append("--KernelSpecManager.allowed_kernelspecs=nbp-no-kernel")
        with open(self.log_path, "wb") as log:
            # Its own process group, so a stuck server can be killed with everything in it.
            self.proc = subprocess.Popen(command, cwd=self.root, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Jupyter server exited early:\n{self.log()}")
            try:
                self.api("GET", "/api/status")
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the Jupyter server did not answer in {timeout} s:\n{self.log()}")

    def url(self, path: str) -> str:
        return f"{self.base}{path}{'&' if '?' in path else '?'}token={self.token}"

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(self.base + path, method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            body = reply.read()
        return json.loads(body) if body else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Shut down through the REST API (kernels too); then kill whatever of ours is still alive."""
        proc = self.proc
        if proc is None:
            return
        try:
            ours = psutil.Process(proc.pid).children(recursive=True)  # kernels, sidecars, workers
        except psutil.NoSuchProcess:
            ours = []
        try:
            self.api("POST", "/api/shutdown")
        except (OSError, urllib.error.URLError):
            pass
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # Kernels run in sessions of their own; a sidecar goes when its kernel goes, but don't count on it.
        _gone, alive = psutil.wait_procs(ours, timeout=5)
        for leftover in alive:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc = None
        shutil.rmtree(self.home, ignore_errors=True)


def launch_chromium(playwright: Any) -> Any:
    """Debian's Chromium, headless, with a fresh temporary profile (never a downloaded browser)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


# Every progress display on the page, live widget or static rendering, in page order, as the tests
# read it. A static rendering in an untrusted notebook has lost its data-* attributes to the
# sanitizer: what it says is read from its text then.
READ_DISPLAYS = """() => {
  const cells = Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell'));
  return Array.from(document.querySelectorAll('.nbp-progress, .nbp-static')).map((root) => {
    const text = (sel) => root.querySelector(sel)?.textContent ?? null;
    const output = root.closest('.jp-OutputArea-child');
    const siblings = output ? Array.from(output.parentElement.children) : [];
    const lanes = Array.from(root.querySelectorAll('.nbp-lane')).map((lane) => ({
      state: lane.dataset.state, what: lane.querySelector('.nbp-lane-what')?.textContent ?? lane.textContent,
      restarts: lane.querySelector('.nbp-lane-restarts')?.textContent ?? null, title: lane.title }));
    const errors = Array.from(root.querySelectorAll('.nbp-error')).map((row) => ({
      where: row.querySelector('.nbp-error-where')?.textContent, message: row.querySelector('.nbp-error-msg')?.textContent,
      traceback: row.querySelector('.nbp-traceback')?.textContent, open: row.querySelector('details')?.open ?? false }));
    const sections = {};
    for (const box of root.querySelectorAll('details')) {
      sections[box.dataset.nbpSection ?? box.querySelector('summary')?.textContent] = box.open;
    }
    const cancel = root.querySelector('.nbp-cancel');
    const badge = text('.nbp-badge');
    const fallbackState = badge && badge.startsWith('done') ? 'done' : badge;
    return {
      kind: root.classList.contains('nbp-static') ? 'static' : 'live',
      cell: cells.indexOf(root.closest('.jp-Cell')), position: siblings.indexOf(output),
      description: text('.nbp-desc'), state: root.dataset.state ?? fallbackState, tone: root.dataset.tone ?? null,
      done: root.dataset.done === undefined ? null : Number(root.dataset.done),
      failed: root.dataset.failed === undefined ? null : Number(root.dataset.failed),
      total: root.dataset.total === undefined || root.dataset.total === '' ? null : Number(root.dataset.total),
      visible: root.offsetParent !== null, badge, counts: text('.nbp-counts'),
      percent: text('.nbp-pct'), rate: text('.nbp-rate'), time: text('.nbp-time'),
      bar: root.querySelector('.nbp-bar-done')?.style.width ?? null,
      barFailed: root.querySelector('.nbp-bar-failed')?.style.width ?? null,
      summary: text('.nbp-summary'), lanesTitle: text('.nbp-lanes-box > summary'), lanes,
      errorsTitle: text('.nbp-errors > summary'), errors, sections,
      cancelShown: cancel ? !cancel.hidden : false, height: root.getBoundingClientRect().height,
    };
  });
}"""
