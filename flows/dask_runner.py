"""The Dask task runner of the parallel stages: an existing scheduler, or a local cluster.

Inside `cluster_per_run()` (as in `saema run`), the stages share one local cluster: it starts when
the first stage has cells to compute and stays up until the run ends, so each worker process starts
and imports torch and saema once per run instead of once per stage. Outside it, each stage starts
its own local cluster and closes it when done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import dask
from distributed import LocalCluster
from prefect_dask import DaskTaskRunner as _PrefectDaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from storage.locations import is_process_local

# Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (memory goes back to the OS
# sooner). Any explicit value stops glibc from adapting its mmap threshold, so every large numpy
# temporary is mapped and page-faulted afresh: the stratify cells ran 1.4× slower in the workers
# than in a plain process (BENCHMARKS.md). Our workers keep glibc's default behaviour.
_WORKER_ENV = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}

# A local cluster's scheduler and nannies live in the flow's process and log each start, connection
# and close at INFO (about 20 lines per stage), and prefect-dask announces a dashboard at :8787 that
# is not served without bokeh. Those are lifecycle chatter: only their warnings and errors are shown.
for _name in ("distributed", "prefect.task_runner.dask"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class DaskTaskRunner(_PrefectDaskTaskRunner):
    """prefect-dask's task runner, submitting each task run to Dask with `pure=False`.

    With prefect-dask's default (`pure=True`) Dask names every submission by hashing its arguments,
    which include the serialised Prefect context (all settings): about 60 ms of the flow process per
    task run, spent before the workers get the task. Every Prefect task run is unique anyway (its
    own run id), so a random Dask key changes nothing else.
    """

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        future = self.client.submit(task, parameters=self._optimize_futures(parameters),
                                    wait_for=self._optimize_futures(wait_for) if wait_for else None,
                                    dependencies=dependencies, return_type="state", pure=False)
        return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)


def _local_cluster_kwargs(n_workers: int, processes: bool) -> dict:
    # tcp on 127.0.0.1 for threads too: the in-process transport (inproc://) takes no host, and its
    # HTTP servers would then listen on every interface.
    return {"n_workers": n_workers, "threads_per_worker": 1, "processes": processes, "protocol": "tcp",
            "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"}  # no fixed :8787 to collide on


class _RunCluster:
    """One local cluster of worker processes for a whole run, started on first use."""

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None

    def address(self, n_workers: int) -> str:
        """The scheduler's address; the first call starts the cluster with `n_workers` workers."""
        if self.cluster is None:
            print(f"starting a local Dask cluster of {n_workers} worker processes for this run")
            with dask.config.set(_WORKER_ENV):
                self.cluster = LocalCluster(**_local_cluster_kwargs(n_workers, processes=True))
        return self.cluster.scheduler_address

    def close(self) -> None:
        if self.cluster is not None:
            with _quiet_worker_kills():
                self.cluster.close()
            self.cluster = None


class _WorkerKilledAtClose(logging.Filter):
    """Drops the nanny's "Worker process still alive after 4.0 seconds, killing" (only that record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Worker process still alive after")


@contextlib.contextmanager
def _quiet_worker_kills() -> Iterator[None]:
    """While the run's own cluster closes, after its last task: a busy machine's worker processes
    (torch loaded, Prefect flushing their logs) can take longer than the nanny's fixed 4 s to exit,
    and the nanny then kills them and warns. Nothing is left to lose at that point, so that warning
    is not shown here; any other record of the close, and the same warning at any other time, are."""
    nanny, quiet = logging.getLogger("distributed.nanny"), _WorkerKilledAtClose()
    nanny.addFilter(quiet)
    try:
        yield
    finally:
        nanny.removeFilter(quiet)


_run_cluster: _RunCluster | None = None


@contextlib.contextmanager
def cluster_per_run() -> Iterator[None]:
    """Within the context, the stages' local Dask work shares one cluster (closed on exit)."""
    global _run_cluster
    if _run_cluster is not None:  # nested (a pipeline inside a run that has one): share it
        yield
        return
    _run_cluster = _RunCluster()
    try:
        yield
    finally:
        _run_cluster.close()
        _run_cluster = None


def dask_runner(address: str | None, n_workers: int, out: str | None = None) -> DaskTaskRunner:
    """`address` (tcp://host:8786) of a running scheduler, or a local cluster of single-threaded
    workers bound to 127.0.0.1 (tasks pin their own BLAS threads to 1): the run's shared cluster
    inside `cluster_per_run()`, otherwise one for this stage.

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
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs=_local_cluster_kwargs(n_workers, processes=False))
    if _run_cluster is not None:
        return DaskTaskRunner(address=_run_cluster.address(n_workers))
    dask.config.set(_WORKER_ENV)  # the stage's cluster is created later, by the task runner
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs=_local_cluster_kwargs(n_workers, processes=True))


def cluster_workers(address: str | None, n_workers: int) -> int:
    """Tasks the cluster runs at once: the local cluster's `n_workers` (one thread each), or the
    threads of the scheduler at `address`."""
    if address is None:
        return n_workers
    from distributed import Client

    with Client(address, timeout=30, set_as_default=False) as client:
        return max(1, sum(client.nthreads().values()))
