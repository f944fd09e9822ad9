"""A worker: ``python -m nbparallel.worker FD SLOT_FD SIDECAR_PID PRELOAD_JSON``; see loop.py."""

import sys

from .loop import main

main(sys.argv[1:])
