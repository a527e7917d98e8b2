"""Intervention tasks: one (hook, concept, objective, direction, α) cell and its random control."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from saema_core.intervention import InterventionConfig, bounded_sample, optimise_intervention, random_control
from storage import activation_store as store
from storage import latent_store
from storage.results import read_group
from storage.sae_checkpoints import load_sae
from tasks.allocator import keep_freed_memory
from tasks.threads import pinned_threads

TRAJECTORY_FIELDS = ("objective", "separability", "mse", "mse_zscored", "explained_variance", "displacement_norm")


def structure_labels(out: str, model_name: str, hook: str, concept: str, seed: int) -> np.ndarray:
    """The structure stage's cluster label of each analysed token in latent space (NaN padding kept)."""
    structure = read_group(out, "structure", dask=False)
    if structure is None:
        raise ValueError("the intervention needs the cluster labels of the structure stage; run it first")
    return structure.cluster_label.sel(model=model_name, hook=hook, concept=concept, space="latent",
                                       seed=seed).values


def inputs_fingerprint(out: str, model_name: str, hook: str, concept: str, sae_id: str, sae_hash: str,
                       seed: int) -> str:
    """What an intervention cell reads, as a cache-key input: activations, latents, SAE and labels."""
    acts = store.content_hash(store.activation_store_url(out, model_name), hook, concept)
    latents = latent_store.latents_key(latent_store.latent_store_url(out, model_name),
                                       latent_store.latent_group(concept, hook, sae_id))
    labels = hashlib.sha256(structure_labels(out, model_name, hook, concept, seed).tobytes()).hexdigest()[:16]
    return f"{acts}|{latents}|{sae_hash}|{labels}"


@functools.lru_cache(maxsize=8)
def cell_inputs(out: str, model_name: str, hook: str, concept: str, sae_path: str, sae_id: str,
                seed: int, content: str = "", sample: tuple[int, int, int] | None = None,
                ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, object]:
    """Latents Z, structure-stage cluster labels (latent space), residuals x and the SAE, restricted to
    `bounded_sample(labels, *sample)` (max clusters, max tokens per cluster, seed) when given.

    Cached per worker process; `content` is part of the key so a long-lived worker never reuses the
    inputs of an earlier run."""
    acts = store.open_activations(store.activation_store_url(out, model_name), hook, concept)
    x = np.ascontiguousarray(acts.resid.values[acts["mask"].values])
    csr, _ = latent_store.read_latents(latent_store.latent_store_url(out, model_name),
                                       latent_store.latent_group(concept, hook, sae_id))
    labels = np.nan_to_num(structure_labels(out, model_name, hook, concept, seed)[: x.shape[0]], nan=-1)
    keep = bounded_sample(labels, *sample) if sample else np.arange(x.shape[0])
    z = torch.from_numpy(csr[keep].toarray().astype(np.float32))
    return z, labels[keep].astype(np.int64), torch.from_numpy(x[keep]), load_sae(sae_path)


def n_clusters(labels: np.ndarray) -> int:
    return len(set(labels.tolist()) - {-1})


def _trajectory(t) -> dict:
    return {name: getattr(t, name).tolist() for name in TRAJECTORY_FIELDS}


@task(name="intervene",
      task_run_name="intervene {model_name} {hook} {concept} {base.objective} dir {direction} α {alpha}",
      cache_policy=NO_CACHE, retries=1)
def intervention_cell(out: str, model_name: str, hook: str, concept: str, sae_path: str, sae_id: str,
                      seed: int, base: InterventionConfig, direction: int, alpha: float,
                      control_seed: int, content: str = "", sample: tuple[int, int, int] | None = None) -> dict:
    """Optimise Δ for one (direction, α) and evaluate a random control of equal displacement.

    `content` fingerprints what the cell reads (part of the cache key, see tasks/caching.py)."""
    keep_freed_memory()
    with pinned_threads(1):
        z, labels, x, sae = cell_inputs(out, model_name, hook, concept, sae_path, sae_id, seed, content, sample)
        if n_clusters(labels) < 2:
            return {"skipped": f"{n_clusters(labels)} cluster(s) in latent space; the intervention needs ≥ 2"}
        config = replace(base, direction=direction, alpha=alpha)
        optimised = optimise_intervention(z, labels, sae.decode, x, config)
        control = random_control(z, labels, sae.decode, x, config, float(optimised.displacement_norm[-1]),
                                 control_seed)
    return {"skipped": "", "optimised": _trajectory(optimised), "control": _trajectory(control),
            "n_tokens": int(z.shape[0]), "n_clusters": n_clusters(labels)}
