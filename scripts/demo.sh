#!/usr/bin/env bash
# Runs examples/quickstart.ipynb end to end in a real kernel and prints what it computed: among it,
# the same CPU-bound work timed serially and through nbparallel, and the speed-up.
# Installs only what that needs (nbparallel and its "demo" extra: nbclient, nbformat, numpy) into
# .venv, the venv scripts/test.sh uses too (NBP_VENV, NBP_PYTHON: see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
NBP_EXTRAS="${NBP_EXTRAS-demo}" bash scripts/setup.sh
"${NBP_VENV:-.venv}/bin/python" scripts/run_notebook.py "${1:-examples/quickstart.ipynb}"
