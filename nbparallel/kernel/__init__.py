"""The kernel's side: starting and talking to the sidecar, the job engine, chunking, output to the caller's cell."""
