"""The sidecar process (``python -m nbparallel.sidecar``): its loop, the workers as it sees them, jobs and the scheduling policy."""
