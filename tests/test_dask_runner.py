"""The Dask task runner of the parallel stages: one shared local cluster per run, worker settings."""

from __future__ import annotations

import os

import pytest
from distributed import Client

from flows.dask_runner import cluster_per_run, dask_runner


def _worker_env(address: str) -> dict:
    with Client(address) as client:
        return client.run(lambda: {"trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"), "pid": os.getpid()})


def test_stages_of_a_run_share_one_local_cluster_whose_workers_keep_the_default_allocator():
    with cluster_per_run():
        first, second = dask_runner(None, 1), dask_runner(None, 1)
        assert first.address == second.address  # the second stage reuses the running cluster
        workers = _worker_env(first.address)
        assert len(workers) == 1
        assert [w["trim"] for w in workers.values()] == [None]
        assert all(w["pid"] != os.getpid() for w in workers.values())  # worker processes
    with pytest.raises(OSError):  # closed with the run
        Client(first.address, timeout=2)
    per_stage = dask_runner(None, 2)  # outside a run: each stage starts its own
    assert per_stage.address is None and per_stage.cluster_kwargs["n_workers"] == 2


def test_only_the_worker_kill_at_the_runs_own_close_is_quiet(caplog):
    import logging

    from flows.dask_runner import _quiet_worker_kills

    nanny = logging.getLogger("distributed.nanny")
    with caplog.at_level(logging.WARNING, logger="distributed"):
        with _quiet_worker_kills():
            nanny.warning("Worker process still alive after 4.0 seconds, killing")
            nanny.warning("Restarting worker")
        nanny.warning("Worker process still alive after 4.0 seconds, killing")
    assert [r.getMessage() for r in caplog.records] == ["Restarting worker",
                                                         "Worker process still alive after 4.0 seconds, killing"]
