"""Causal-test tasks: the hook's fixed residual clusters, and one fine-tuned (β, seed) SAE per cell."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from saema_core.causal import SeparabilityAccumulator, SeparabilityTerm, fit_residual_clusters
from saema_core.sae.sparse import chunk_rows
from saema_core.sae_metrics import ReconstructionMetricsAccumulator
from saema_core.sae_training import TrainingConfig, train_sae
from storage import activation_store as store
from storage.activation_store import model_slug
from storage.locations import canonical, exists, join, read_bytes, write_bytes, write_text
from storage.models import ModelSpec
from storage.provenance import config_hash, provenance
from storage.sae_checkpoints import load_sae, save_sae
from tasks.allocator import encode_elements, keep_freed_memory
from tasks.caching import code_version
from tasks.progress import StageProgress
from tasks.sae import CE_SEQUENCES, cached_sae, ce_loss_values
from tasks.threads import pinned_threads
from tasks.training_tokens import first_training_tokens, training_batches

#: SAE architectures the trainer can fine-tune (`saema_core.sae_training`).
TRAINABLE = ("topk", "standard")
KMEANS_TOKENS = 16_384  # training-corpus tokens the residual clusters are fitted on


def residual_centroids(out: str, model_name: str, hook: str, n_clusters: int, seed: int,
                       holdout_fraction: float, model: ModelSpec | None = None) -> str:
    """Where the hook's k-means centroids of up to `KMEANS_TOKENS` training-corpus residuals (seeded)
    are stored — the local representations of the causal test, fixed before any SAE is fine-tuned.
    Fitted once per corpus and setting (the file name carries their content key). `model` recomputes
    the residuals of a streamed corpus."""
    url = store.activation_store_url(out, model_name)
    key = config_hash({"corpus": store.content_hash(url, hook), "n_clusters": n_clusters, "seed": seed,
                       "holdout": holdout_fraction, "tokens": KMEANS_TOKENS})[:16]
    path = join(out, "saes", model_slug(model_name), hook, "causal", f"residual-clusters-{key}.npy")
    if not exists(path):
        buffer = io.BytesIO()
        residuals = first_training_tokens(url, hook, holdout_fraction, KMEANS_TOKENS, model)
        np.save(buffer, fit_residual_clusters(residuals, n_clusters, seed), allow_pickle=False)
        write_bytes(path, buffer.getvalue())
    return path


def read_centroids(path: str) -> np.ndarray:
    """(n_clusters, d_model) float32 centroids written by `residual_centroids` (no pickles)."""
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def causal_sae_folder(out: str, model_name: str, hook: str, base_id: str, beta: float, seed: int,
                      init: str = "base") -> str:
    start = "" if init == "base" else f"-{init}"
    return canonical(join(out, "saes", model_slug(model_name), hook, "causal",
                          f"{base_id}{start}-beta{beta:+g}-s{seed}"))


def _train(url: str, hook: str, base, centroids, beta: float, seed: int, steps: int, batch_size: int,
           holdout_fraction: float, dead_tokens: int, from_scratch: bool, metadata: dict,
           model: ModelSpec | None):
    """Train with the separability term: from `base`'s weights, or from the seed's initialisation."""
    batches = (torch.from_numpy(b) for b in training_batches(url, hook, holdout_fraction, batch_size, seed, model))
    train_cfg = TrainingConfig(n_steps=steps, batch_size=batch_size, seed=seed, dead_tokens_threshold=dead_tokens)
    cfg = dataclasses.replace(base.cfg, metadata=metadata)
    with StageProgress(f"causal {hook} β {beta:+g} seed {seed}", total=steps) as progress:
        return train_sae(cfg, train_cfg, batches, init=None if from_scratch else base,
                         extra_loss=SeparabilityTerm(centroids, beta), progress=lambda step, stats: progress.advance(1))


def held_out_outcome(url: str, hook: str, sae, centroids, holdout_fraction: float) -> dict[str, float]:
    """Reconstruction (MSE, EV, L0) and separability (AEDP and its scale-free ratio) on held-out tokens."""
    _, held_out = store.corpus_chunks(url, hook, holdout_fraction)
    if not held_out:
        raise ValueError(f"{url} {hook}: no held-out corpus chunks to measure the causal test on")
    metrics = ReconstructionMetricsAccumulator(sae.cfg.d_sae)
    separability = SeparabilityAccumulator(centroids, sae.cfg.d_sae)
    with torch.inference_mode():
        for region in held_out:
            for x in torch.from_numpy(store.read_region(url, hook, region)).split(chunk_rows(sae.cfg.d_sae, encode_elements())):
                latents, reconstruction = sae(x)  # tokens × d_sae at once within a fixed budget
                metrics.update(x, reconstruction, latents)
                separability.update(x, latents)
    result = metrics.compute()
    aedp, ratio = separability.compute()
    return {"mse": float(result.mse), "explained_variance": float(result.explained_variance),
            "l0": float(result.l0), "n_tokens": float(result.n_tokens), "separability": aedp,
            "separability_ratio": ratio}


@task(name="causal-sae", task_run_name="causal {hook} β {beta} seed {seed}", cache_policy=NO_CACHE, retries=1)
def causal_cell(out: str, model_name: str, hook: str, base_path: str, base_id: str, centroids_path: str,
                beta: float, seed: int, steps: int, batch_size: int, holdout_fraction: float,
                ce_model: ModelSpec | None = None, ce_reference: tuple[float, float] | None = None,
                ce_sequences: int = CE_SEQUENCES, content: str = "",
                init: str = "base", dead_tokens: int = 100_000, model: ModelSpec | None = None) -> dict:
    """Train an SAE of the base SAE's shape `steps` steps with the separability term at `beta` (batch
    order, and with init "scratch" the initialisation, from `seed`; init "base" fine-tunes the base
    SAE), save it beside the base SAE, and measure it on the held-out corpus tokens.

    `ce_model`: compute `ce_loss_score` through this model's LM head (None: the hook has none), on
    `sae_eval`'s held-out sequences, whose clean and zero-ablation losses `ce_reference` brings along.
    `content` fingerprints what the cell reads (part of the cache key, see tasks/caching.py); `model`
    recomputes the training activations of a streamed corpus (`--stream-corpus`)."""
    keep_freed_memory()
    url = store.activation_store_url(out, model_name)
    base, centroids = load_sae(base_path), read_centroids(centroids_path)
    if base.cfg.architecture not in TRAINABLE or base.cfg.normalize_activations != "none":
        return {"skipped": f"cannot fine-tune a {base.cfg.architecture} SAE with normalize_activations="
                           f"{base.cfg.normalize_activations!r} (trainable: {', '.join(TRAINABLE)} reading raw "
                           f"activations)"}
    folder = causal_sae_folder(out, model_name, hook, base_id, beta, seed, init)
    from_scratch = init == "scratch"
    # Fine-tuning never marks a latent dead: the base SAE's counters are not carried over.
    dead_tokens = dead_tokens if from_scratch else max(steps * batch_size, 1)
    key = config_hash({"base": content, "beta": beta, "seed": seed, "steps": steps, "batch_size": batch_size,
                       "holdout": holdout_fraction, "init": init, "dead_tokens": dead_tokens, "code": code_version()})
    with pinned_threads(1):
        sae = cached_sae(folder, key)
        if sae is None:
            metadata = provenance(model_name=model_name, hook_name=hook, saema_training_key=key, causal_beta=beta,
                                  causal_seed=seed, causal_init=init, base_sae=base_id)
            result = _train(url, hook, base, centroids, beta, seed, steps, batch_size, holdout_fraction, dead_tokens,
                            from_scratch, metadata, model)
            sae = result.sae
            save_sae(sae, folder)
            write_text(join(folder, "training_history.json"), json.dumps(result.history.as_dict()))
        outcome = held_out_outcome(url, hook, sae, centroids, holdout_fraction)
        ce = (ce_loss_values(url, hook, store.corpus_chunks(url, hook, holdout_fraction)[1], sae, ce_model,
                              ce_sequences, ce_reference) if ce_model is not None else {"ce_loss_score": float("nan")})
    return {"skipped": "", **outcome, "ce_loss_score": float(ce["ce_loss_score"]), "path": folder}
