"""Checks that run before a Prefect server starts and before any model weights load.

Everything about a run that can be known from its configuration, the model's config and tokenizer,
the prompt file and the stores' metadata is checked here, so that a bad hook, a prompt too long for
the model, a `k` wider than the SAE or a damaged store fails in seconds with one line — not after
minutes of extraction or training, and before anything is written. The CLI calls `preflight` before it
starts Prefect; `saema_pipeline` calls it again first thing (deployment runs do not pass the CLI).
"""

from __future__ import annotations

from flows.config import ExtractConfig, PipelineConfig
from saema_core.hooks import parse_hook
from storage.activation_store import activation_store_url
from storage.batches import concept_batches
from storage.concept_sources import check_concepts
from storage.corpus import check_corpus
from storage.locations import canonical, exists
from storage.metadata import check_metadata
from storage.models import LoadedModel, load_model
from storage.prompts import PromptError
from storage.results import results_url
from storage.sae_formats.common import CheckpointError
from storage.sae_releases import resolve_checkpoint


def preflight(cfg: PipelineConfig, stages: tuple[str, ...] = ()) -> LoadedModel:
    """Check a whole run; returns the model's tokenizer and config (weights not loaded)."""
    lm = preflight_extract(cfg.extract)
    if not stages or "sae" in stages:
        check_sae_settings(cfg, lm)
    if not stages or "structure" in stages or "intervention" in stages:
        cfg.structure.core()  # validates UMAP and HDBSCAN settings
    return lm


def preflight_extract(ex: ExtractConfig) -> LoadedModel:
    """Check the stores, the model's hooks and positions, the corpus and the concept prompts."""
    check_metadata(results_url(ex.out))
    check_metadata(activation_store_url(ex.out, ex.model.label))
    lm = load_model(ex.model)
    for hook in ex.hooks:
        parse_hook(hook, lm.n_layers)
    if lm.max_positions and ex.corpus and ex.corpus_seq_len > lm.max_positions:
        raise ValueError(f"--corpus-seq-len {ex.corpus_seq_len} is longer than {ex.model.label} takes "
                         f"({lm.max_positions} positions)")
    check_corpus(ex.corpus)
    for concept in check_concepts(ex.concepts, ex.concept_source):
        if concept.prompts:  # a concept of items only gets corpus contexts, checked when drawn
            check_prompts_fit(concept, lm, ex.batch_size)
    return lm


def check_prompts_fit(concept, lm: LoadedModel, batch_size: int) -> None:
    """Every prompt of a file concept fits the model, and some token of the concept is analysed."""
    plan, _ = concept_batches(lm.tokenizer, concept, batch_size)
    if lm.max_positions and plan.seq_len > lm.max_positions:
        lengths = [len(lm.tokenizer(text)["input_ids"]) for text in concept.texts]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        text = concept.texts[longest]
        raise PromptError(f"concept {concept.name!r} ({concept.source}): prompt {longest + 1} "
                          f"({text[:60]!r}{'…' if len(text) > 60 else ''}) is {lengths[longest]} tokens, longer "
                          f"than the {lm.max_positions} positions {lm.spec.label} takes; shorten or split it")


def check_sae_settings(cfg: PipelineConfig, lm: LoadedModel) -> None:
    """Checkpoints exist; a TopK SAE to train keeps k within its width."""
    sae = cfg.sae
    for hook, path in sae.checkpoints:
        try:
            folder = resolve_checkpoint(path)
        except CheckpointError as error:
            raise CheckpointError(f"--sae {hook}={path}: {error}") from error
        if not exists(canonical(folder)):
            raise CheckpointError(f"--sae {hook}={path}: no SAE checkpoint at {path} (a folder, an fsspec URL, or "
                                  f"a SAELens release name RELEASE/SAE_ID)")
    trained = [hook for hook in cfg.extract.hooks if sae.checkpoint_for(hook) is None]
    width = sae.expansion * lm.d_model
    if trained and sae.architecture == "topk" and sae.k > width:
        raise ValueError(f"--k {sae.k} is more than the SAE's {width} latents (--expansion {sae.expansion} × "
                         f"d_model {lm.d_model}); choose k ≤ {width}")
