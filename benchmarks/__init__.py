"""Side-by-side benchmarks of nbparallel and its peers; run ``python -m benchmarks.run --help``."""
