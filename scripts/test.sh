#!/usr/bin/env bash
# Runs the test suite from a fresh clone: installs what it needs (scripts/setup.sh), then pytest with
# this script's arguments. With no arguments and no variables: the whole suite, in .venv on python3.
# One CI leg (.ci/run) picks its Python, venv, extras and constraints with scripts/setup.sh's variables:
#   NBP_PYTHON="$(pyenv prefix 3.12)/bin/python" NBP_VENV=.venv-3.12 NBP_EXTRAS=test \
#     bash scripts/test.sh -m "not browser and not dask and not slow"
#   NBP_CONSTRAINTS=constraints/lowest.txt ...    the lowest versions pyproject.toml allows
# It prints the Python and the versions the install resolved before the tests, and the time after.
# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
venv="${NBP_VENV:-.venv}"
# Python writes the compiled modules it imports (__pycache__, which git ignores) while the tests run.
# Where PYTHONDONTWRITEBYTECODE is set (some CI images set it), every kernel, sidecar and worker the
# tests start compiles IPython, ipykernel, numpy and nbparallel from source again: a kernel's imports
# took 0.9-1.1 s of CPU that way against 0.4-0.5 s from the cache, hundreds of times per run.
unset PYTHONDONTWRITEBYTECODE
bash scripts/setup.sh
echo "test.sh: $venv: $("$venv/bin/python" -c 'import sys; print("Python", sys.version.split()[0], sys.executable)')" \
  "${NBP_CONSTRAINTS:+(constraints: $NBP_CONSTRAINTS)}"
echo "test.sh: resolved:" $("$venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
  | grep -iE '^(cloudpickle|psutil|ipykernel|ipywidgets|anywidget|joblib|numpy|dask|distributed|jupyter[_-]client|jupyterlab|notebook|nbclient|ipython|pytest|mypy)==' | sort -f)
# Test files run side by side in NBP_TEST_PROCESSES pytest processes (pytest-xdist; default: one more
# than the CPUs, at most 4). Most tests wait on the processes they start: on 2 cores the main leg
# took 389 s with 2 processes (before the bytecode cache above), 301 s with 2 and 260 s with 4 (after).
# A file stays in one process (--dist loadfile), so a module's fixtures (a Dask cluster, a kernel)
# are made once. NBP_TEST_PROCESSES=0 runs everything in this process.
processes="${NBP_TEST_PROCESSES:-$("$venv/bin/python" -c 'import os; print(min(4, (os.cpu_count() or 1) + 1))')}"
parallel=()
[ "$processes" -gt 0 ] && parallel=(-n "$processes" --dist loadfile)
echo "test.sh: set up in $((SECONDS - started)) s; pytest ${parallel[*]} $*"
status=0
"$venv/bin/python" -m pytest "${parallel[@]}" "$@" || status=$?
echo "test.sh: $venv done in $((SECONDS - started)) s (pytest exit $status)"
exit "$status"
