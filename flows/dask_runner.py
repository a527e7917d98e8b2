"""The Dask task runner of the parallel stages: an existing scheduler, or a local cluster."""

from __future__ import annotations

from prefect_dask import DaskTaskRunner

from storage.locations import is_process_local


def dask_runner(address: str | None, n_workers: int, out: str | None = None) -> DaskTaskRunner:
    """`address` (tcp://host:8786) of a running scheduler, or a local cluster of single-threaded
    workers bound to 127.0.0.1 (tasks pin their own BLAS threads to 1).

    The local workers are processes, except when `out` is a `memory://` URL: that store exists only
    inside this process, so its workers are threads of this process (`processes=False`), and a
    scheduler `address`, whose workers live elsewhere, is refused.
    """
    in_process = out is not None and is_process_local(out)
    if in_process and address:
        raise ValueError(f"--out {out} lives in this process's memory, which the Dask workers of {address} "
                         f"cannot see; write to a folder or an object store (s3://…), or drop --dask-address")
    if address:
        return DaskTaskRunner(address=address)
    if in_process:
        print(f"--out {out} lives in this process's memory: the Dask stage runs on {n_workers} worker "
              f"threads of this process instead of worker processes, which could not see it")
    # tcp on 127.0.0.1 for threads too: the in-process transport (inproc://) takes no host, and its
    # HTTP servers would then listen on every interface.
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": n_workers, "threads_per_worker": 1, "processes": not in_process, "protocol": "tcp",
        "dashboard_address": None, "host": "127.0.0.1"})
