#!/usr/bin/env bash
# Creates a virtual environment (if missing) and installs nbparallel into it, editable, with extras.
# With no variables: .venv on python3, with everything the whole test suite needs. Variables pick
# one CI leg's environment (.ci/run):
#   NBP_PYTHON       the interpreter to make the venv from (default: python3)
#   NBP_VENV         the venv's folder (default: .venv)
#   NBP_EXTRAS       the extras, comma-separated (default: test,test-browser, what all the tests
#                    need; "test" for all but the browser tests; "demo" for scripts/demo.sh; "" for none)
#   NBP_CONSTRAINTS  a pip constraints file, e.g. constraints/lowest.txt (default: none)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${NBP_PYTHON:-python3}"
venv="${NBP_VENV:-.venv}"
extras="${NBP_EXTRAS-test,test-browser}"
wanted=$("$python" -c 'import sys; print(sys.version)')
# A venv made from another interpreter (another Python version) is made again.
if [ -f "$venv/pyvenv.cfg" ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null)" != "$wanted" ]; then
  echo "setup.sh: $venv was made from another Python; making it again from $python"
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
  echo '*' > "$venv/.gitignore"  # git ignores the venv wherever it is (Python 3.13 does this itself)
  "$venv/bin/python" -m pip install -q --no-compile --upgrade pip
fi
# --no-compile: Python compiles a module when it is first imported; compiling every installed file
# up front is most of an install's time (the test extra: 41 s with it, 15 s without, on 2 cores),
# and most of those files are never imported.
install=(--no-compile -e ".${extras:+[$extras]}")
if [ -n "${NBP_CONSTRAINTS:-}" ]; then
  install+=(-c "$NBP_CONSTRAINTS")
fi
"$venv/bin/python" -m pip install -q "${install[@]}"
