"""The sidecar: ``python -m nbparallel.sidecar FD KERNEL_PID``; see loop.py."""

import sys

from .loop import main

main(sys.argv[1:])
