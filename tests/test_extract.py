"""Streaming extraction into Zarr: layout, equality with a direct forward, resume, refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from flows.config import ExtractConfig
from flows.extract import extract_flow
from saema_core.hooks import HookError, capture_residuals
from storage import activation_store as store
from storage.models import ModelSpec, load_model
from storage.prompts import builtin_concept
from tests.processes import kill_tree

HOOKS = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    from storage.corpus import iter_documents

    path = tmp_path_factory.mktemp("corpus") / "speeches.txt"
    path.write_text("\n\n".join(doc for _, doc in zip(range(3), iter_documents("sotu"))))
    return str(path)


def _config(out, model_dir, corpus, **overrides) -> ExtractConfig:
    base = ExtractConfig(out=str(out), model=ModelSpec(name=model_dir), hooks=HOOKS,
                         concepts=("months", "planets"), corpus=corpus, batch_size=8,
                         corpus_seq_len=64, corpus_batch_size=4, corpus_max_tokens=4096)
    return replace(base, **overrides)


def _arrays(url: str, hook: str, concept: str | None) -> dict[str, np.ndarray]:
    ds = xr.open_zarr(url, group=store.group_path(hook, concept), consolidated=False)
    return {name: ds[name].values for name in ("resid", "prompt_id", "position", "token_id", "token_str", "mask")}


def test_store_layout_and_values(tmp_path, tiny_model_dirs, corpus_file):
    cfg = _config(tmp_path, tiny_model_dirs["bert"], corpus_file)
    refs = extract_flow(cfg)
    assert all(ref.computed for ref in refs) and len(refs) == 3
    url = store.activation_store_url(cfg.out, cfg.model.name)
    ds = xr.open_zarr(url, group=store.group_path(HOOKS[1], "months"))  # plain xarray, consolidated
    assert ds.resid.dims == ("token", "d_model") and ds.resid.dtype == np.float32
    assert set(ds.coords) >= {"prompt_id", "position", "token_id", "token_str", "concept", "mask"}
    for key in ("model", "model_revision", "hook", "dtype", "tokenizer", "saema_version", "git_commit",
                "created", "content_hash"):
        assert key in ds.attrs, key
    assert zarr.open_group(url, path=store.group_path(HOOKS[0], "months"), mode="r")["resid"].shape[1] == 32
    # Equality with an independent forward of the same prompts.
    lm = load_model(cfg.model)
    prompts = builtin_concept("months").texts
    encoded = lm.tokenizer(prompts, padding="longest", return_tensors="pt")
    direct = capture_residuals(lm.model, dict(encoded), [HOOKS[1]])[HOOKS[1]]
    stored = ds.resid.values.reshape(len(prompts), -1, lm.d_model)
    np.testing.assert_allclose(stored, direct.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ds.token_id.values.reshape(len(prompts), -1), encoded["input_ids"].numpy())
    assert set(ds.concept.values) == {"months"} and ds["mask"].values.sum() > 0


@pytest.mark.parametrize("dtype, rtol", [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_corpus_dtype_halves_the_corpus_and_reads_back_within_its_rounding(tmp_path, tiny_model_dirs, corpus_file,
                                                                          dtype, rtol):
    full = _config(tmp_path / "f32", tiny_model_dirs["bert"], corpus_file, concepts=("months",))
    half = replace(full, out=str(tmp_path / dtype), corpus_dtype=dtype)
    extract_flow(full), extract_flow(half)
    urls = [store.activation_store_url(cfg.out, cfg.model.name) for cfg in (full, half)]
    region = store.corpus_chunks(urls[0], HOOKS[1], 0.05)[0][0]
    exact, rounded = (store.read_region(url, HOOKS[1], region) for url in urls)
    assert rounded.dtype == np.float32 and rounded.shape == exact.shape
    assert np.all(np.abs(rounded - exact) <= rtol * np.abs(exact) + 1e-30)  # round to nearest: half an ulp
    sizes = [zarr.open_group(url, path=store.group_path(HOOKS[1]), mode="r")["resid"].nbytes for url in urls]
    assert sizes[1] * 2 == sizes[0]
    concept = [_arrays(url, HOOKS[1], "months")["resid"] for url in urls]  # concepts stay float32
    assert concept[1].dtype == np.float32 and np.array_equal(concept[0], concept[1])
    with pytest.raises(store.StoreError, match=f"holds {dtype} activations, this run asks for float32"):
        extract_flow(replace(full, out=half.out))


def test_unchanged_rerun_recomputes_nothing(tmp_path, tiny_model_dirs, corpus_file):
    cfg = _config(tmp_path, tiny_model_dirs["gpt2"], corpus_file)
    extract_flow(cfg)
    assert not any(ref.computed for ref in extract_flow(cfg))
    # A new concept computes only that concept.
    refs = extract_flow(replace(cfg, concepts=("months", "planets", "days")))
    assert [ref.concept for ref in refs if ref.computed] == ["days"]


def test_interrupted_run_resumes_to_identical_arrays(tmp_path, tiny_model_dirs, corpus_file, monkeypatch):
    model = tiny_model_dirs["llama"]
    reference = _config(tmp_path / "ref", model, corpus_file)
    extract_flow(reference)
    cfg = _config(tmp_path / "resumed", model, corpus_file)
    original, calls = store.write_batch, {"n": 0}

    def failing_write(parts, batch):
        calls["n"] += 1
        if calls["n"] >= 4:  # a persistent failure: the retry fails too
            raise OSError("simulated crash in the middle of the run")
        original(parts, batch)

    monkeypatch.setattr(store, "write_batch", failing_write)
    with pytest.raises(Exception, match="simulated crash"):
        extract_flow(cfg)
    assert calls["n"] >= 4
    monkeypatch.setattr(store, "write_batch", original)
    extract_flow(cfg)
    for hook in HOOKS:
        for concept in ("months", "planets", None):
            a = _arrays(store.activation_store_url(reference.out, model), hook, concept)
            b = _arrays(store.activation_store_url(cfg.out, model), hook, concept)
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{hook} {concept} {name}")


@pytest.mark.slow
def test_kill_9_then_rerun_completes(tmp_path, tiny_model_dirs, corpus_file):
    """A real SIGKILL in the middle of the corpus; the re-run completes with identical arrays."""
    model = tiny_model_dirs["bert"]
    cfg = _config(tmp_path / "ref", model, corpus_file, concepts=("days",), corpus_max_tokens=60_000,
                  corpus_seq_len=128)
    extract_flow(cfg)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "saema.cli", "extract", "--out", str(out), "--model", model,
               "--hooks", *HOOKS, "--concepts", "days", "--batch-size", "8", "--corpus", corpus_file,
               "--corpus-max-tokens", "60000", "--corpus-batch-size", "4", "--corpus-seq-len", "128"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = store.activation_store_url(str(out), model)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            done = zarr.open_group(url, path=store.group_path(HOOKS[0]), mode="r")["batch_done"][:]
            if 3 <= done.sum() < len(done) - 3:
                break
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
    kill_tree(process)  # the run and its temporary Prefect server, which would otherwise outlive the test
    assert not store.group_complete(url, store.group_path(HOOKS[0]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    for hook in HOOKS:
        a = _arrays(store.activation_store_url(cfg.out, model), hook, None)
        b = _arrays(url, hook, None)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{hook} {name}")


def test_refuses_store_of_another_model(tmp_path, corpus_file):
    from tests.tiny_models import save_tiny_model

    first = save_tiny_model("bert", tmp_path / "a" / "model")
    second = save_tiny_model("gpt2", tmp_path / "b" / "model")  # same folder name, other weights
    extract_flow(_config(tmp_path / "out", str(first), None, concepts=("days",)))
    with pytest.raises(store.StoreError, match="another model"):
        extract_flow(_config(tmp_path / "out", str(second), None, concepts=("days",)))
    assert store.group_complete(store.activation_store_url(str(tmp_path / "out"), str(first)),
                                store.group_path(HOOKS[0], "days"))


def test_changed_prompts_are_refused_without_refresh(tmp_path, tiny_model_dirs):
    cfg = _config(tmp_path, tiny_model_dirs["bert"], None, concepts=("days",))
    extract_flow(cfg)
    with pytest.raises(store.StoreError, match="other inputs"):
        extract_flow(replace(cfg, batch_size=4))
    assert any(ref.computed for ref in extract_flow(replace(cfg, batch_size=4, refresh=True)))


def test_bad_hook_and_output_path(tmp_path, tiny_model_dirs):
    with pytest.raises(HookError, match="valid hooks"):
        extract_flow(_config(tmp_path, tiny_model_dirs["bert"], None, hooks=("blocks.7.hook_resid_post",)))
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(store.StoreError, match="is a file"):
        extract_flow(_config(a_file, tiny_model_dirs["bert"], None))


@pytest.mark.slow
def test_embedded_minilm_end_to_end(tmp_path):
    from saema.cli import main

    code = main(["extract", "--out", str(tmp_path), "--concepts", "planets", "--corpus", "none"])
    assert code == 0
    url = store.activation_store_url(str(tmp_path), "all-MiniLM-L6-v2")
    ds = store.open_activations(url, "blocks.3.hook_resid_post", "planets")
    assert ds.resid.shape[1] == 384 and np.isfinite(ds.resid.values).all()
    analysed = set(ds.token_str.values[ds["mask"].values])
    assert {"mars", "jupiter", "saturn"} <= analysed
    assert torch.get_num_threads() >= 1


def test_a_lost_chunk_makes_only_its_batch_pending(tmp_path):
    """A batch whose flag is set but whose chunk file is gone is not complete (it is re-extracted)."""
    import zarr

    url = str(tmp_path / "store.zarr")
    group = zarr.open_group(url, mode="w").create_group("g")
    for name in ("resid", "prompt_id", "position", "token_id", "mask"):
        shape, chunks = ((6, 2), (2, 2)) if name == "resid" else ((6,), (2,))
        array = group.create_array(name, shape=shape, chunks=chunks, dtype="f4", fill_value=0,
                                   config={"write_empty_chunks": True})
        array[:] = 1.0
    flags = group.create_array("batch_done", shape=(3,), chunks=(1,), dtype=bool, fill_value=False)
    flags[:] = True
    assert store.group_complete(url, "g")
    (tmp_path / "store.zarr" / "g" / "resid" / "c" / "1" / "0").unlink()
    assert store.lost_batches(zarr.open_group(url, path="g"), {0, 1, 2}) == {1}
    assert not store.group_complete(url, "g")
