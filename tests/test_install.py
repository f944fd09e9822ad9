"""``python -m nbparallel install | uninstall`` against a throwaway IPython directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from traitlets.config.loader import PyFileConfigLoader

from nbparallel.__main__ import CONFIG_FILE, main


@pytest.fixture
def ipython_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    return tmp_path


def _extensions(config_file: Path) -> list[str]:
    """The extension list IPython would read from that file."""
    config = PyFileConfigLoader(config_file.name, path=str(config_file.parent)).load_config()
    value = config.InteractiveShellApp.extensions
    return list(value.get_value([]) if hasattr(value, "get_value") else value)


def test_install_is_idempotent_and_uninstall_removes_the_file(ipython_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    config_file = ipython_dir / "profile_default" / CONFIG_FILE
    assert main(["install"]) == 0
    assert f"in {config_file}" in capsys.readouterr().out
    assert _extensions(config_file) == ["nbparallel"]
    before = config_file.read_text()
    main(["install"])
    assert "already" in capsys.readouterr().out and config_file.read_text() == before
    main(["uninstall"])
    assert "removed" in capsys.readouterr().out and not config_file.exists()
    main(["uninstall"])
    assert "nothing changed" in capsys.readouterr().out


def test_the_users_own_config_is_kept(ipython_dir: Path) -> None:
    folder = ipython_dir / "profile_work"
    folder.mkdir()
    original = 'c = get_config()\nc.InteractiveShellApp.extensions = ["autoreload"]'  # no final newline
    (folder / CONFIG_FILE).write_text(original)
    main(["install", "--profile", "work"])
    assert _extensions(folder / CONFIG_FILE) == ["autoreload", "nbparallel"]
    main(["uninstall", "--profile", "work"])
    assert (folder / CONFIG_FILE).read_text() == original + "\n"


def test_the_module_runs_as_a_command(ipython_dir: Path) -> None:
    env = {**os.environ, "IPYTHONDIR": str(ipython_dir)}
    done = subprocess.run([sys.executable, "-m", "nbparallel", "install"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "added" in done.stdout
    assert (ipython_dir / "profile_default" / CONFIG_FILE).exists()
    usage = subprocess.run([sys.executable, "-m", "nbparallel"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "install" in usage.stderr
