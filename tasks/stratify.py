"""Stratification tasks: one task per (hook, concept, space) runs its noise × replicate cells.

The tasks run on Dask workers (prefect-dask); each pins its BLAS and torch threads so that workers do
not oversubscribe the cores, and every cell draws its noise from a seed derived from (base seed,
hook, concept, σ, replicate), so results do not depend on which worker computed what.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from saema_core.noise import derive_seed, noise_scale
from saema_core.ranks import ESTIMATORS, MODES, affine_factor
from saema_core.sae.sparse import encode_csr
from saema_core.strata import support_strata
from saema_core.stratification import analyse_cell
from storage import activation_store as store
from storage.sae_checkpoints import load_sae
from tasks.allocator import encode_elements, keep_freed_memory
from tasks.threads import pinned_threads

SPACES = ("resid", "latent", "dense_ae")


@dataclass(frozen=True)
class StratifyParams:
    """The sweep of one stage run (validated by the flow's config)."""

    noise_levels: tuple[float, ...]
    replicates: int
    noise_scale: str
    base_seed: int
    threads: int = 1
    reference_noise: float | None = None
    """σ of the strata reference (its replicate 0); None = the first of `noise_levels`. A call that
    holds a chunk of a sweep's σ levels names the sweep's first level, so its strata are the sweep's."""


def prompt_tensor(out: str, model_name: str, hook: str, concept: str) -> tuple[np.ndarray, np.ndarray]:
    """A concept's activations as x (P, T, d) and mask (P, T), read from the activation store."""
    ds = store.open_activations(store.activation_store_url(out, model_name), hook, concept)
    n_prompts = int(ds.prompt_id.max() - ds.prompt_id.min() + 1)
    x = ds.resid.values.reshape(n_prompts, -1, ds.sizes["d_model"])
    return x, ds["mask"].values.reshape(n_prompts, -1)


def encoder_for(space: str, sae_path: str | None) -> Callable[[np.ndarray], np.ndarray | sp.csr_array]:
    """The map of a space: identity (resid), the SAE's encoder as CSR, encoded a bounded chunk of
    tokens at a time (`saema_core.sae.sparse`), or the dense AE's encoder (dense by nature; its
    latent-mode rank comes from the affine factor, see `affine_weights`)."""
    if space == "resid":
        return lambda x: x
    sae = load_sae(sae_path)
    if sae.cfg.architecture != "dense":
        budget = encode_elements()
        return lambda x: encode_csr(sae, x, budget)

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return sae.encode(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    encode.affine = affine_weights(sae)
    return encode


def affine_weights(sae) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(W, b, F) with encode(x) = x @ W + b for the dense AE (no activation, no input rescaling) and
    F its `affine_factor`, computed once for every cell; else None."""
    if sae.cfg.architecture != "dense" or sae.input_scale(torch.ones(1, sae.cfg.d_in)) is not None:
        return None
    with torch.inference_mode():
        W, b = sae.W_enc.double(), sae.b_enc.double()
        if sae.cfg.apply_b_dec_to_input:
            b = b - sae.b_dec.double() @ W
    return W.numpy(), b.numpy(), affine_factor(W.numpy(), b.numpy())


def _cell_rows(cell) -> dict[str, list]:
    """Per mode: the rank estimates and the counts of one cell."""
    return {"rank": [[cell.ranks[mode][e] for e in ESTIMATORS] for mode in MODES],
            "n_active": [cell.spectra[mode].n_active for mode in MODES],
            "n_tokens": [cell.spectra[mode].n_tokens for mode in MODES],
            "rank_bound": [cell.spectra[mode].rank_bound for mode in MODES],
            "ceiling": [cell.spectra[mode].shape[0] for mode in MODES]}


def _sweep(x, mask, encode, params: StratifyParams, hook: str, concept: str, space: str) -> dict:
    """Every (σ, replicate) cell. At σ = 0 every replicate is the same noiseless cell: computed once.
    A chunk of a longer sweep (`params.reference_noise` set) first computes the sweep's reference cell."""
    scale = noise_scale(x, mask, params.noise_scale, cell=f"{hook}/{concept}/{space}")

    def cell_at(sigma: float, r: int):
        seed = derive_seed(params.base_seed, hook, concept, sigma, r)
        return analyse_cell(x, mask, encode, sigma, scale, seed, cell=f"{hook}/{concept}/{space}/σ={sigma}/r={r}")

    rows: dict[str, list] = {}
    noiseless = None
    first = params.noise_levels[0]
    reference_sigma = first if params.reference_noise is None else params.reference_noise
    reference = None if reference_sigma == first else cell_at(reference_sigma, 0).supports
    for sigma in params.noise_levels:
        for r in range(params.replicates):
            if sigma == 0 and noiseless is not None:
                cell = noiseless
            else:
                cell = cell_at(sigma, r)
                noiseless = cell if sigma == 0 else noiseless
            reference = cell.supports if reference is None else reference
            result = support_strata(cell.supports, reference)
            values = {**_cell_rows(cell), **{name: getattr(result, name) for name in _STRATA}}
            for name, value in values.items():
                rows.setdefault(name, []).append(value)
    n_noise, n_rep = len(params.noise_levels), params.replicates
    arrays = {name: np.asarray(v, dtype=float).reshape(n_noise, n_rep, *np.shape(v[0])) for name, v in rows.items()}
    signal = float(np.sqrt(np.mean(np.square(x[mask], dtype=np.float64))))
    return {**arrays, "scale": scale, "signal_rms": signal, "n_analysed": int(mask.sum())}


_STRATA = ("n_supports", "mean_jaccard", "fraction_changed")


@task(name="stratify", task_run_name="stratify {model_name} {hook} {concept} {space}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[1, 5])
def stratify_cells(out: str, model_name: str, hook: str, concept: str, space: str,
                   sae_path: str | None, params: StratifyParams, content: str = "") -> dict:
    """Every (σ, replicate) cell of one (hook, concept, space): ranks, counts and support strata.

    The σ = 0, replicate 0 supports are the reference of the strata statistics (noise levels are
    sorted, so σ = 0 comes first when present). `content` fingerprints the activations and SAE read
    (part of the cache key, see tasks/caching.py).
    """
    keep_freed_memory()
    with pinned_threads(params.threads):
        x, mask = prompt_tensor(out, model_name, hook, concept)
        result = _sweep(x, mask, encoder_for(space, sae_path), params, hook, concept, space)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in result.items()}
