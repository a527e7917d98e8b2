"""Shared fixtures: an ephemeral Prefect backend, tiny random models saved to disk, offline hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry racing on the test DB

import pytest  # noqa: E402

from tests.tiny_models import ARCHITECTURES, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_backend(tmp_path_factory):
    """Prefect in ephemeral mode against a throw-away database (never the user's ~/.prefect)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """A saved tiny random model of every supported architecture: {architecture: folder}."""
    root = tmp_path_factory.mktemp("models")
    return {arch: str(save_tiny_model(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine run far faster without OpenMP thread contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
