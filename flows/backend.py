"""The Prefect API a run reports to: the configured server, or one temporary server for the whole run.

Without `PREFECT_API_URL`, Prefect starts a temporary (ephemeral) server on first use — but only in
the process that asks; Dask worker processes would each start their own, costing seconds per worker
and hiding their task runs from the run's own history. `prefect_backend` starts the temporary server
once, up front, and puts its address in the settings that Prefect hands to every worker.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)


@contextlib.contextmanager
def prefect_backend() -> Iterator[str]:
    """Yield the API URL of the run; start (and stop) a temporary local server when none is set."""
    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by worker processes of a local cluster
    try:
        # Heartbeats let a long-lived server notice crashed runs; this server lives only as long as the
        # run, and each flow would wait up to a second for its heartbeat thread at exit.
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, "flows.heartbeat_frequency": None}):
            yield server.api_url
    finally:
        APILogWorker.drain_all(timeout=5)  # the run's last logs reach the server before it stops
        time.sleep(1.0)  # and its task-run recorder its last events (it drops in-flight ones at shutdown)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
