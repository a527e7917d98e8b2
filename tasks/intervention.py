"""Intervention tasks: one (hook, concept, objective, direction) cell: every α, its controls, the pure move."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from saema_core.baselines import PAPER_STEP_SCALE, PaperSearch
from saema_core.intervention import (
    InterventionConfig,
    bounded_sample,
    optimise_intervention,
    random_control,
)
from saema_core.row_space import (
    Decomposition,
    active_subspace,
    decompose_move,
    linear_decoder,
    random_control_row,
    row_space_basis,
)
from storage import activation_store as store
from storage import latent_store
from storage.results import read_group
from storage.sae_checkpoints import load_sae
from tasks.allocator import keep_freed_memory
from tasks.threads import pinned_threads

TRAJECTORY_FIELDS = ("objective", "separability", "mse", "mse_zscored", "explained_variance", "displacement_norm")
ROW_CONTROL_SEED_OFFSET = 10_000  # the row-matched controls draw other directions than the total-matched ones


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
                ) -> tuple[sp.csr_array, np.ndarray, torch.Tensor, object]:
    """Sparse latents Z, structure-stage cluster labels (latent space), residuals x and the SAE,
    restricted to `bounded_sample(labels, *sample)` (max clusters, max tokens per cluster, seed) when
    given.

    Cached per worker process (the SAE once per hook, `shared_sae`); `content` is part of the key so a
    long-lived worker never reuses the inputs of an earlier run."""
    acts = store.open_activations(store.activation_store_url(out, model_name), hook, concept)
    x = np.ascontiguousarray(acts.resid.values[acts["mask"].values])
    csr, latents = latent_store.read_latents(latent_store.latent_store_url(out, model_name),
                                             latent_store.latent_group(concept, hook, sae_id))
    labels = np.nan_to_num(structure_labels(out, model_name, hook, concept, seed)[: x.shape[0]], nan=-1)
    keep = bounded_sample(labels, *sample) if sample else np.arange(x.shape[0])
    sae = shared_sae(sae_path, str(latents.attrs.get("sae_hash", "")))
    return sp.csr_array(csr[keep]), labels[keep].astype(np.int64), torch.from_numpy(x[keep]), sae


@functools.lru_cache(maxsize=2)
def shared_sae(sae_path: str, sae_hash: str) -> object:
    """The SAE at `sae_path`, loaded once per worker process and shared by every concept's cell (an
    SAE of 65 536 latents on d_model 2 304 is 1.2 GB); `sae_hash` keys the cache, so a checkpoint
    replaced at the same path between runs is loaded again."""
    return load_sae(sae_path)


def moving_inputs(csr: sp.csr_array, sae, objective: str) -> tuple[torch.Tensor, object]:
    """Z and the decoder's owner the moves work with: the active-latent subspace and the decoder on it
    (`saema_core.row_space.active_subspace`), or for the paper-literal search, which z-scores over
    all K latents, the full dense Z and the SAE."""
    if objective == "paper":
        return torch.from_numpy(csr.toarray().astype(np.float32)), sae
    return active_subspace(csr, sae.W_dec, sae.b_dec)


def n_clusters(labels: np.ndarray) -> int:
    return len(set(labels.tolist()) - {-1})


def _trajectory(t) -> dict:
    return {name: getattr(t, name).tolist() for name in TRAJECTORY_FIELDS}


def _decomposed(t, z, labels, decode, x, clamp: bool, basis) -> dict:
    """The trajectory and the row/null-space split of its final move (NaN parts without a basis)."""
    parts = (decompose_move(z, labels, decode, x, t.translations, clamp, basis)._asdict() if basis is not None
             else dict.fromkeys(Decomposition._fields, float("nan")))
    return {**_trajectory(t), **parts}


def _row_basis(decode, n_latents: int) -> tuple[object, str]:
    """The decoder's row-space basis, or None and why (a decoder that is not linear)."""
    try:
        return row_space_basis(linear_decoder(decode, n_latents)[0]), ""
    except ValueError as error:
        return None, str(error)


def _alpha_cell(z, labels, x, sae, config: InterventionConfig, control_seed: int, basis) -> dict:
    """The optimised move at one α and its two random controls (total and row-space norm matched)."""
    optimised = optimise_intervention(z, labels, sae.decode, x, config)
    moves = {"optimised": _decomposed(optimised, z, labels, sae.decode, x, config.clamp_nonnegative, basis)}
    control = random_control(z, labels, sae.decode, x, config, float(optimised.displacement_norm[-1]), control_seed,
                             path=False)
    moves["control"] = _decomposed(control, z, labels, sae.decode, x, config.clamp_nonnegative, basis)
    if basis is not None:
        row = random_control_row(z, labels, sae.decode, x, config, moves["optimised"]["row_norm"],
                                 control_seed + ROW_CONTROL_SEED_OFFSET, basis, path=False)
        moves["control_row"] = _decomposed(row, z, labels, sae.decode, x, config.clamp_nonnegative, basis)
    return moves


def _paper_runs(z, labels, x, sae, base: InterventionConfig, direction: int, alphas, seeds,
                step_scale: float) -> list[list[dict]]:
    """The paper-literal search for every (α, seed): ΔSep, raw and z-scored ΔMSE, accepted steps."""
    search = PaperSearch(z, labels, sae.decode, x)  # prepared once; each seed's draws shared by every α
    runs = []
    for alpha in alphas:
        row = []
        for seed in seeds:
            t = search.run(alpha, base.lam, direction, seed=seed, step_scale=step_scale)
            row.append({"delta_sep": t.delta_separability, "delta_mse": t.delta_mse,
                        "delta_mse_zscored": float(t.mse_zscored[-1] - t.mse_zscored[0]),
                        "accepted": int((np.diff(t.objective) != 0).sum())})
        runs.append(row)
    return runs


@task(name="intervene",
      task_run_name="intervene {model_name} {hook} {concept} {base.objective} dir {direction}",
      cache_policy=NO_CACHE, retries=1)
def intervention_cell(out: str, model_name: str, hook: str, concept: str, sae_path: str, sae_id: str,
                      seed: int, base: InterventionConfig, direction: int, alphas: tuple[float, ...],
                      control_seed: int, content: str = "", sample: tuple[int, int, int] | None = None,
                      paper_seeds: tuple[int, ...] = (), paper_step_scale: float = PAPER_STEP_SCALE) -> dict:
    """Every α of one (concept, objective, direction): the optimised move, its random controls matched
    on the total and on the row-space displacement, the row/null-space split of each; the pure
    separability move (λ = 0, once: Adam makes it α-free). Objective "paper": the paper-literal search
    for every (α, seed) instead.

    `content` fingerprints what the cell reads (part of the cache key, see tasks/caching.py)."""
    keep_freed_memory()
    with pinned_threads(1):
        csr, labels, x, full = cell_inputs(out, model_name, hook, concept, sae_path, sae_id, seed, content, sample)
        z, sae = moving_inputs(csr, full, base.objective)
        if n_clusters(labels) < 2:
            return {"skipped": f"{n_clusters(labels)} cluster(s) in latent space; the intervention needs ≥ 2"}
        common = {"skipped": "", "n_tokens": int(z.shape[0]), "n_clusters": n_clusters(labels),
                  "n_latents": int(z.shape[1])}
        if base.objective == "paper":
            return {**common, "paper": _paper_runs(z, labels, x, sae, base, direction, alphas, paper_seeds,
                                                   paper_step_scale)}
        basis, why = _row_basis(sae.decode, z.shape[1])
        moves = [_alpha_cell(z, labels, x, sae, replace(base, direction=direction, alpha=alpha), control_seed + i, basis)
                 for i, alpha in enumerate(alphas)]
        pure = optimise_intervention(z, labels, sae.decode, x, replace(base, direction=direction, alpha=1.0, lam=0.0))
    return {**common, "alphas": moves, "decomposition_reason": why,
            "pure": _decomposed(pure, z, labels, sae.decode, x, base.clamp_nonnegative, basis)}
