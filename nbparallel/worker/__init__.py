"""The worker process (``python -m nbparallel.worker``): runs chunks of items and sends their outcomes."""
