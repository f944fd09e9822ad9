#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: installs what it needs, then pytest.
# pytest exits non-zero (5) when it collects no test, so an empty run fails here too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest "$@"
