"""The Dask bridge: ``python -m nbparallel.cluster FD KERNEL_PID ADDRESS [OPTIONS_JSON]``; see bridge.py."""

import sys

from .bridge import main

main(sys.argv[1:])
