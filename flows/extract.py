"""Flow: prompts and corpus → activation store (DESIGN.md §4 steps 1–2)."""

from __future__ import annotations

from prefect import flow

from flows.config import ExtractConfig
from saema_core.hooks import parse_hook
from storage.activation_store import activation_store_url, ensure_output_dir
from storage.concept_sources import resolve_concepts
from storage.metadata import consolidate
from storage.models import load_model
from tasks.extract import ActivationRef, extract_concept, extract_corpus


@flow(name="saema-extract", flow_run_name="extract · {cfg.model.label}", log_prints=True)
def extract_flow(cfg: ExtractConfig = ExtractConfig(), holdout_fraction: float = 0.05) -> list[ActivationRef]:
    """Stream every concept's prompts, then the training corpus, into the model's store.

    `holdout_fraction`: the SAE stage's held-out share of the corpus, the only activations a streamed
    corpus (`cfg.stream_corpus`) stores."""
    ensure_output_dir(cfg.out)
    lm = load_model(cfg.model)
    for hook in cfg.hooks:
        parse_hook(hook, lm.n_layers)
    concepts = resolve_concepts(cfg.concepts, cfg.concept_source, cfg.context_spec())
    refs = [extract_concept(cfg, concept) for concept in concepts]
    for concept, ref in zip(concepts, refs):
        floor = "" if ref.n_analysed >= cfg.min_concept_tokens else \
            f" — BELOW the floor of {cfg.min_concept_tokens}: its analyses may not be informative"
        print(f"concept {concept.name}: {ref.n_analysed} analysed tokens from {concept.source}{floor}")
    if cfg.corpus:
        refs.append(extract_corpus(cfg, holdout_fraction))
    consolidate(activation_store_url(cfg.out, cfg.model.label))
    computed = sum(ref.computed for ref in refs)
    print(f"activations: {len(refs)} groups × {len(cfg.hooks)} hooks, {computed} computed, "
          f"{len(refs) - computed} already complete")
    return refs
