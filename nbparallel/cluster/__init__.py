"""Dask: the bridge process (``python -m nbparallel.cluster``) and what runs on Dask workers."""
