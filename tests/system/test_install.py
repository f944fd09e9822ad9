"""``python -m nbparallel install | uninstall`` against a throwaway IPython directory; what the wheel and the
sdist carry (the license, no test files in the wheel, what the sdist's own tests need)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

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


# -- packaging: what the wheel and the sdist carry ------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
LOWEST = ROOT / "constraints" / "lowest.txt"
# What the sdist holds at its top: the package, what builds it, what its tests read and run, and
# nothing else (no benchmarks or their results, no CI script, no caches or venvs).
SDIST_TOP = {"nbparallel", "js", "docs", "examples", "tests", "scripts", "constraints",
             "README.md", "LICENSE", "pyproject.toml", "PKG-INFO", ".gitignore"}


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist, built from this checkout by hatchling (no network, no isolation)."""
    pytest.importorskip("hatchling", reason="the test extra installs hatchling, the build backend")
    out = tmp_path_factory.mktemp("dist")
    code = ("import sys; from hatchling.build import build_sdist, build_wheel; "
            "print(build_wheel(sys.argv[1])); print(build_sdist(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    wheel, sdist = done.stdout.split()[-2:]
    return {"wheel": out / wheel, "sdist": out / sdist}


def _wheel_names(dist: dict[str, Path]) -> list[str]:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        return wheel.namelist()


def _sdist_names(dist: dict[str, Path]) -> list[str]:
    """The sdist's paths without its top folder (nbparallel-VERSION/)."""
    with tarfile.open(dist["sdist"]) as sdist:
        return [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]


def test_license_is_in_the_repository_the_sdist_and_the_wheel_metadata(dist: dict[str, Path]) -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Copyright (c) 2026, the nbparallel developers" in text
    assert _pyproject()["project"]["license"] == "BSD-3-Clause"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        info = next(name.split("/")[0] for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
        assert wheel.read(f"{info}/licenses/LICENSE").decode() == text
        metadata = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in metadata and "License-File: LICENSE" in metadata
    with tarfile.open(dist["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        member = sdist.extractfile(f"{top}/LICENSE")
        assert member is not None and member.read().decode() == text


def test_the_wheel_ships_the_widget_and_no_test_files(dist: dict[str, Path]) -> None:
    names = _wheel_names(dist)
    shipped = [name for name in names if not name.startswith("nbparallel-")]  # dist-info aside
    assert all(name.startswith("nbparallel/") for name in shipped), shipped
    tests = [name for name in shipped if name.endswith((".test.js", "package.json", "conftest.py"))
             or "/tests/" in name or name.rsplit("/", 1)[-1].startswith("test_")]
    assert tests == []
    # Every file of the widget, and nothing but them, under nbparallel/js (widget.js_dir() looks there).
    widget = {f"nbparallel/js/{path.name}" for path in (ROOT / "js").iterdir()
              if path.suffix in (".js", ".css") and not path.name.endswith(".test.js")}
    assert {name for name in shipped if name.startswith("nbparallel/js/")} == widget
    assert {name for name in shipped if name.endswith(".py")} == {
        path.relative_to(ROOT).as_posix() for path in (ROOT / "nbparallel").rglob("*.py")}


def test_the_sdist_holds_what_its_tests_need_and_nothing_unrelated(dist: dict[str, Path]) -> None:
    names = _sdist_names(dist)
    assert {name.split("/")[0] for name in names} == SDIST_TOP
    for needed in ["scripts/run_notebook.py", "scripts/test.sh", "scripts/setup.sh", "constraints/lowest.txt",
                   "js/format.test.js", "js/package.json", "tests/conftest.py", "README.md"]:
        assert needed in names, f"{needed} is missing from the sdist"
    tracked = {path.relative_to(ROOT).as_posix() for folder in ("tests", "examples", "js", "nbparallel")
               for path in (ROOT / folder).rglob("*") if path.is_file()
               and not any(part == "__pycache__" or part.startswith(".") for part in path.parts)}
    assert tracked <= set(names), sorted(tracked - set(names))
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.slow  # what the sdist holds does not depend on the Python that builds it
@pytest.mark.timeout(300)
def test_the_unpacked_sdist_runs_its_own_tests(dist: dict[str, Path], tmp_path: Path) -> None:
    """Its suite collects, and the tests that read its files (notebooks, the runner script, the
    constraints) pass against the sdist's own nbparallel."""
    with tarfile.open(dist["sdist"]) as sdist:
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 on
            sdist.extractall(tmp_path, filter="data")
        else:
            sdist.extractall(tmp_path)
    unpacked = next(tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": str(unpacked)}  # ahead of this checkout's editable install
    where = subprocess.run([sys.executable, "-c", "import nbparallel; print(nbparallel.__file__)"], cwd=unpacked,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(unpacked / "nbparallel" / "__init__.py"), where.stdout + where.stderr
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    collected = subprocess.run([*base, "--collect-only"], cwd=unpacked, env=env, capture_output=True,
                               text=True, timeout=120)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    chosen = ["tests/system/test_examples.py::test_there_are_examples",
              "tests/system/test_examples.py::test_notebook_is_stored_clean",
              "tests/system/test_examples.py::test_script_prints_each_cell_and_uses_this_python_in_the_notebook_folder",
              "tests/system/test_install.py::test_the_lowest_constraints_pin_every_lower_bound"]
    ran = subprocess.run([*base, *chosen], cwd=unpacked, env=env, capture_output=True, text=True, timeout=240)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert " passed" in ran.stdout and "skipped" not in ran.stdout, ran.stdout[-3000:]


def _bounds() -> dict[str, str]:
    """Every ">=" bound of the dependencies, the extras and the build backend: {normalized name: version}.
    The bench extra aside: benchmarks/ is not part of the package or of its tests."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = _pyproject()["project"]
    extras = {name: extra for name, extra in project["optional-dependencies"].items() if name != "bench"}
    requirements = [*project["dependencies"], *(r for extra in extras.values() for r in extra)]
    requirements += _pyproject()["build-system"]["requires"]
    bounds: dict[str, str] = {}
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "nbparallel":
            continue  # an extra that includes another
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert lower, f"{text}: every requirement has a lower bound"
        assert bounds.setdefault(name, lower[0]) == lower[0], f"{name} has two lower bounds"
    return bounds


def _pins() -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in LOWEST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_the_lowest_constraints_pin_every_lower_bound() -> None:
    """constraints/lowest.txt is what CI's lowest leg installs: it must say what pyproject.toml says."""
    from packaging.version import Version

    bounds, pins = _bounds(), _pins()
    assert set(bounds) <= set(pins), f"not pinned in {LOWEST.name}: {sorted(set(bounds) - set(pins))}"
    wrong = {name: (bounds[name], pins[name]) for name in bounds if Version(bounds[name]) != Version(pins[name])}
    assert wrong == {}, "bound in pyproject.toml vs pin in constraints/lowest.txt"
