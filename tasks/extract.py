"""Extraction tasks: one forward per batch captures every hook; batches stream into the store."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import ExtractConfig
from saema_core.hooks import capture_residuals
from storage import activation_store as store
from storage.batches import BatchPlan, TokenBatch, concept_batches, corpus_batches, corpus_plan
from storage.models import LoadedModel, load_model
from storage.prompts import Concept
from storage.provenance import provenance
from tasks.allocator import keep_freed_memory
from tasks.progress import StageProgress


@dataclass(frozen=True)
class ActivationRef:
    """A small, hashable reference to the activation groups of one concept (or the corpus)."""

    store_url: str
    concept: str | None
    hooks: tuple[str, ...]
    content_hash: str
    n_tokens: int
    computed: bool
    n_analysed: int = 0


def forward_residuals(lm: LoadedModel, input_ids: np.ndarray, attention_mask: np.ndarray,
                      hooks: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One forward of (rows, seq_len) token ids → {hook: (rows · seq_len, d_model) float32}."""
    inputs = {"input_ids": torch.from_numpy(input_ids).to(lm.device),
              "attention_mask": torch.from_numpy(attention_mask).to(lm.device)}
    captured = capture_residuals(lm.model, inputs, hooks)
    return {h: t.reshape(-1, t.shape[-1]).float().cpu().numpy() for h, t in captured.items()}


def _writers(cfg: ExtractConfig, lm: LoadedModel, url: str, plan: BatchPlan, concept: str | None,
             about: dict | None = None):
    writers = {}
    for hook in cfg.hooks:
        dtype = "float32" if concept is not None else cfg.corpus_dtype  # concept groups stay float32
        attrs = provenance(model=cfg.model.label, model_source=lm.source, model_revision=lm.revision, hook=hook,
                           dtype=dtype, model_dtype=cfg.model.dtype,
                           tokenizer=type(lm.tokenizer).__name__, architecture=lm.architecture,
                           split="corpus" if concept is None else "concepts",
                           concept=concept, corpus=cfg.corpus if concept is None else None, **(about or {}))
        writers[hook] = store.prepare_group(url, store.group_path(hook, concept), plan, lm.d_model,
                                            attrs, concept=concept or "", refresh=cfg.refresh, dtype=dtype)
    return writers


def _stream(lm: LoadedModel, writers: dict, batches: Iterable[TokenBatch],
            todo: dict[str, set[int]], label: str, streamed: int = 0) -> None:
    """Forward each pending batch once, capturing only the hooks that still lack it, and write it;
    the first `streamed` batches (`--stream-corpus`) get their token coordinates only, no forward.

    Writes are synchronous: a writer thread overlapping batch i's write with batch i + 1's forward
    measured the same on 2 cores, with torch on 2 threads or on 1 (BENCHMARKS.md).
    """
    keep_freed_memory()
    pending = set().union(*todo.values())
    with StageProgress(label, total=len(pending)) as progress:
        for batch in batches:
            hooks = tuple(h for h in writers if batch.index in todo[h])
            if not hooks:
                continue
            activations = (dict.fromkeys(hooks) if batch.index < streamed else
                           forward_residuals(lm, batch.input_ids, batch.attention_mask, hooks))
            store.write_batch([(writers[hook], values) for hook, values in activations.items()], batch)
            progress.advance(1)


def _todo(writers: dict, n_batches: int) -> dict[str, set[int]]:
    """Per hook, the batches not yet written (all of them for a new group)."""
    return {hook: set(range(n_batches)) - w.done() for hook, w in writers.items()}


def _identity(cfg: ExtractConfig, lm: LoadedModel) -> dict:
    return {"model": cfg.model.label, "model_source": lm.source, "model_revision": lm.revision, "d_model": lm.d_model,
            "n_layers": lm.n_layers}


@task(name="extract-concept", task_run_name="extract {concept.name}", cache_policy=NO_CACHE,
      retries=1, retry_delay_seconds=2)
def extract_concept(cfg: ExtractConfig, concept: Concept) -> ActivationRef:
    """Stream one concept's prompts through the model into its groups (skip complete batches)."""
    lm = load_model(cfg.model)
    url = store.activation_store_url(cfg.out, cfg.model.label)
    store.open_store(url, _identity(cfg, lm))
    plan, batches = concept_batches(lm.tokenizer, concept, cfg.batch_size)
    n_analysed = int(sum(batch.mask.sum() for batch in batches))
    about = {"concept_source": concept.source, "n_analysed": n_analysed,
             "min_concept_tokens": cfg.min_concept_tokens, "prompt_set": concept.prompt_set}
    writers = _writers(cfg, lm, url, plan, concept.name, about)
    todo = _todo(writers, plan.n_batches)
    _stream(lm, writers, batches, todo, f"extract {concept.name} ({plan.n_tokens} tokens)")
    computed = any(todo.values())
    return ActivationRef(url, concept.name, cfg.hooks, plan.content_hash, plan.n_tokens, computed, n_analysed)


@task(name="extract-corpus", task_run_name="extract corpus {cfg.corpus}", cache_policy=NO_CACHE,
      retries=1, retry_delay_seconds=2)
def extract_corpus(cfg: ExtractConfig, holdout_fraction: float = 0.05) -> ActivationRef:
    """Stream the training corpus through the model; memory stays bounded by one batch.

    With `cfg.stream_corpus` only the held-out chunks (`holdout_fraction`, the last ones) get
    activations; the training chunks keep their token coordinates, and training recomputes their
    activations by the model's forward (tasks.training_tokens)."""
    lm = load_model(cfg.model)
    url = store.activation_store_url(cfg.out, cfg.model.label)
    store.open_store(url, _identity(cfg, lm))
    plan = corpus_plan(lm.tokenizer, cfg.corpus, cfg.corpus_seq_len, cfg.corpus_batch_size,
                       cfg.corpus_max_tokens)
    if cfg.corpus_dtype != "float32":  # other bytes: SAEs trained on them are other SAEs
        plan = replace(plan, content_hash=f"{plan.content_hash}:{cfg.corpus_dtype}")
    streamed = plan.n_batches - store.held_out_chunks(plan.n_batches, holdout_fraction) if cfg.stream_corpus else 0
    if streamed:  # another split stores other chunks
        plan = replace(plan, content_hash=f"{plan.content_hash}:stream{plan.n_batches - streamed}")
    writers = _writers(cfg, lm, url, plan, None, {"streamed_batches": streamed} if streamed else None)
    todo = _todo(writers, plan.n_batches)
    pending = set().union(*todo.values())
    if pending:
        skip = set(range(plan.n_batches)) - pending
        batches = corpus_batches(lm.tokenizer, cfg.corpus, plan, skip=skip)
        _stream(lm, writers, batches, todo, f"extract corpus ({plan.n_tokens} tokens"
                + (f", activations of the last {plan.n_batches - streamed} of {plan.n_batches} chunks)" if streamed
                   else ")"), streamed)
    return ActivationRef(url, None, cfg.hooks, plan.content_hash, plan.n_tokens, bool(pending))
