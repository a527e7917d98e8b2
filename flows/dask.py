"""The Dask task runner of the parallel stages: an existing scheduler, or a local cluster."""

from __future__ import annotations

from prefect_dask import DaskTaskRunner


def dask_runner(address: str | None, n_workers: int) -> DaskTaskRunner:
    """`address` (tcp://host:8786) of a running scheduler, or a local cluster of single-threaded
    worker processes bound to 127.0.0.1 (tasks pin their own BLAS threads to 1)."""
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": n_workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": None, "host": "127.0.0.1"})
