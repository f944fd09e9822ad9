#!/usr/bin/env bash
# Runs examples/quickstart.ipynb end to end in a real kernel and prints what it computed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/run_notebook.py "${1:-examples/quickstart.ipynb}"
