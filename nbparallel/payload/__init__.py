"""User values as bytes: pickling, shared memory, outcomes, retrying, remote tracebacks. Never imported by the sidecar."""
